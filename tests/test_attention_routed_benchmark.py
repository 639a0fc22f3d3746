"""benchmarks/attention_routed.py's judgement, on synthetic measurements (the timed run needs a GPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("attention_routed", BENCHMARKS / "attention_routed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(benchmark, wall, gpu, kernels=None):
    kernels = kernels or {"backend": ["cudnn_fwd"], "sdpa_default": ["cudnn_fwd"], "sdpa_flash": ["flash_fwd"]}
    host = {"backend": 12.5, "sdpa_default": 11.0, "sdpa_flash": 14.0}
    return benchmark.verdict("c", "fwd", kernels, wall, gpu, host, 1.0)


def test_the_wall_ratio_pairs_each_round_with_its_own_best_peer():
    benchmark = _benchmark()
    # The host slows down in round 2 for everyone: unpaired medians would blur it, paired ratios do not.
    wall = [{"backend": 1.0, "sdpa_default": 1.0, "sdpa_flash": 1.2},
            {"backend": 2.0, "sdpa_default": 1.9, "sdpa_flash": 2.5},
            {"backend": 1.0, "sdpa_default": 1.1, "sdpa_flash": 1.3}]
    ratio, best = benchmark.paired_ratio(wall)
    assert ratio == 1.0 and best == "sdpa_default"
    assert benchmark.paired_ratio(wall[1:2]) == (0.95, "sdpa_default")


def test_a_row_says_same_kernels_gpu_ratio_and_host_cost_over_the_called_peer():
    benchmark = _benchmark()
    row = _row(benchmark, [{"backend": 1.0, "sdpa_default": 0.98, "sdpa_flash": 1.5}],
               {"backend": 0.5, "sdpa_default": 0.5, "sdpa_flash": None})
    assert row["same_kernels_as_called"] and row["gpu_best_peer"] == "sdpa_default"
    assert row["gpu_ratio"] == 1.0 and row["meets_gpu"]
    assert row["wall_ratio"] == 0.98 and not row["meets_wall"]
    assert row["host_us_over_called"] == 1.5
    other = _row(benchmark, [{"backend": 1.0, "sdpa_default": 1.0, "sdpa_flash": 1.0}],
                 {"backend": 0.6, "sdpa_default": 0.5, "sdpa_flash": 0.7},
                 {"backend": ["triton_attn"], "sdpa_default": ["cudnn_fwd"], "sdpa_flash": ["flash_fwd"]})
    assert not other["same_kernels_as_called"] and not other["meets_gpu"] and other["meets_wall"]


def test_the_table_has_a_line_per_row_with_both_verdicts():
    benchmark = _benchmark()
    rows = [_row(benchmark, [{"backend": 1.0, "sdpa_default": 0.9, "sdpa_flash": 1.5}],
                 {"backend": 0.5, "sdpa_default": 0.55, "sdpa_flash": 0.6})]
    report = {"device": "card", "versions": {"torch": "x"}, "date": "d", "rows": rows}
    table = benchmark.markdown(report)
    assert "| c | fwd | yes | 0.9 | sdpa_default | 1.1 | sdpa_default | 12.5 / 11.0 | 1.0 | NO | yes |" in table
