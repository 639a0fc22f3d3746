"""benchmarks/nf4_dequant.py --smoke: the whole benchmark on the CPU, in Triton's interpreter, into a temporary
directory (the timed run needs a GPU). Tiny shapes and 3 rounds of 2 calls: ~5 s here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("nf4_dequant_benchmark", ROOT / "benchmarks" / "nf4_dequant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_smoke_run_times_bnb_and_the_kernel_and_writes_its_report(tmp_path):
    benchmark = _benchmark()
    report = benchmark.main(["--smoke", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "nf4-dequant-smoke.json").read_text())
    assert written == report and {"device", "versions", "date"} <= set(written)
    assert {"torch", "triton", "bitsandbytes"} <= set(written["versions"])
    rows = written["rows"]
    assert [(r["case"], r["nested"]) for r in rows] == [(c, n) for c in benchmark.SMOKE_CASES for n in (False, True)]
    for row in rows:
        assert row["bnb_us"] > 0 and row["ours_us"] > 0 and row["ours_tb_s"] > 0
        assert row["ours_bit_exact_vs_bnb"], row  # the kernel computed bnb's values
        assert row["bytes_per_call"] == benchmark.bytes_moved(*row["shape"], row["nested"], benchmark.torch.float32)
    table = (tmp_path / "nf4-dequant-smoke.md").read_text()
    assert table.count("| smoke_") == len(rows) and "bit-exact vs bnb" in table


def test_bytes_moved_counts_packed_absmax_and_output():
    benchmark = _benchmark()
    n = 4096 * 4096
    plain = benchmark.bytes_moved(4096, 4096, False, benchmark.torch.bfloat16)
    nested = benchmark.bytes_moved(4096, 4096, True, benchmark.torch.bfloat16)
    assert plain == n // 2 + 4 * (n // 64) + 2 * n  # 8 MiB + 1 MiB + 32 MiB
    assert nested == n // 2 + n // 64 + 4 * (n // 64 // 256) + 2 * n
