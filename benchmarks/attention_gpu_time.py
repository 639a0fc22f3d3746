"""Where a short attention call's time goes: GPU work or host work.

    PYTHONPATH=$PWD python benchmarks/attention_gpu_time.py

For a few `attention.py` cases and forward tile plans, with the forward's scale folding on and off, it
prints three times of one forward of our kernel: `do_bench` as `attention.py` measures it (L2 flushed,
host launch latency included whenever it exceeds the GPU work before it), the same call replayed from a
CUDA graph (GPU time alone), and the host time to issue it. A case whose do_bench time is well above its
graph time is host-bound in `attention.py`'s table.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import attention as bench  # noqa: E402
from attention_routed import graph_ms  # noqa: E402

from optimized.kernels import attention as kernel  # noqa: E402

CASES = ("pixtral_vision_blockdiag_d64", "qwen2vl_vision_varlen_d80", "text_causal_gqa_d128")


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    cases = {case.name: case for case in bench.CASES}
    for name in CASES:
        x = bench.make_inputs(cases[name])
        plan = kernel.default_plan(x.case.head_dim, x.q.device, x.spec, x.case.seq, x.q.dtype)
        for fold in (True, False):  # fold=False: no scale folding, so the general forward kernel
            for tiles in (plan.fwd, kernel.Tiles(128, 64, 8, 3), kernel.Tiles(128, 128, 8, 3),
                          kernel.Tiles(64, 64, 4, 3)):
                fn = bench.ours(kernel.TilePlan(tiles, plan.dkdv, plan.dq), fold_scale=fold)
                gpu = graph_ms(bench._step(fn, x, "fwd"))
                ms = bench.time_pass(fn, x, "fwd")
                host = bench.host_pass(fn, x, "fwd", 100)
                print(f"{name} fold={fold} {tuple(tiles)}: do_bench {ms * 1e3:.1f} us  graph {gpu * 1e3:.1f} us  "
                      f"host {host * 1e3:.1f} us", flush=True)


if __name__ == "__main__":
    main()
