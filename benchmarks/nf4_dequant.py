"""NF4 dequantization: bitsandbytes' dequantize_4bit, fastvision's Triton kernel and Unsloth's fast_dequantize.

    PYTHONPATH=$PWD python benchmarks/nf4_dequant.py [--out DIR] [--rounds N] [--calls N]   # a CUDA machine
    PYTHONPATH=$PWD python benchmarks/nf4_dequant.py --smoke --out DIR   # CPU, Triton's interpreter, tiny

Weights: 4096 x 4096 (Llava-1.5-7B's q/k/v/o), 11008 x 4096 (gate/up) and 4096 x 11008 (down), quantized by
bitsandbytes to NF4 at blocksize 64, with and without double quantization, bf16 output. Each contender is
timed with CUDA events around CALLS back-to-back calls (eager: host work included), after warm-up, and
keeps the median of ROUNDS rounds; then the same calls are replayed from a CUDA graph (GPU work alone: a
4096 x 4096 weight is ~14 us of it, less than a Python call's host work on the H200 box). The calls cycle
through enough copies of the weight that a cycle's bytes are >= 3x the L2 (50 MB on an H100 / H200): the
packed bytes come from HBM, as in a training step.

Effective TB/s = (packed bytes + absmax bytes read + output bytes written) / time, the same count for every
contender: per element 0.5 + 2 bytes, per block 4 bytes of fp32 absmax (nested: 1 byte, plus 4 per 256
blocks). `bit_exact_vs_bnb` checks each contender computed bnb's values.

Writes DIR/nf4-dequant-<card>.json and .md (card, versions, date). Unsloth is timed where it imports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:  # the interpreter must be on before Triton is first imported
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CASES = {
    "llava_qkvo_4096x4096": (4096, 4096),
    "llava_gate_up_11008x4096": (11008, 4096),
    "llava_down_4096x11008": (4096, 11008),
}
SMOKE_CASES = {"smoke_64x256": (64, 256), "smoke_48x192": (48, 192)}
BLOCKSIZE = 64  # bitsandbytes' and transformers' default for NF4
L2_BYTES = 50 * 2**20
TARGET_TB_S = 2.4  # the bar; bnb measured ~0.76 TB/s on the H100 at 4096 x 4096


def unsloth_dequantize():
    """Unsloth's fast_dequantize(W, quant_state), or None (with the reason printed) where it does not import."""
    try:
        from unsloth.kernels.utils import fast_dequantize
    except Exception as exc:  # ImportError, or Unsloth refusing this machine (no GPU, versions)
        print(f"unsloth: not timed ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
        return None
    return fast_dequantize


def contenders(with_unsloth: bool) -> dict:
    import bitsandbytes.functional as bnb_functional

    from optimized.kernels.nf4_dequant import dequantize_nf4

    found = {"bnb": bnb_functional.dequantize_4bit, "ours": dequantize_nf4}
    unsloth = unsloth_dequantize() if with_unsloth else None
    if unsloth is not None:
        found["unsloth"] = unsloth
    return found


def quantized(rows: int, cols: int, nested: bool, device, dtype, copies: int, seed: int = 0) -> list:
    import bitsandbytes.functional as bnb_functional

    gen = torch.Generator().manual_seed(seed)
    weights = []
    for _ in range(copies):
        w = (torch.randn(rows, cols, generator=gen) / cols**0.5).to(device, dtype)
        weights.append(
            bnb_functional.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=nested)
        )
    return weights


def bytes_moved(rows: int, cols: int, nested: bool, out_dtype: torch.dtype) -> int:
    n = rows * cols
    blocks = -(-n // BLOCKSIZE)
    absmax = blocks + 4 * -(-blocks // 256) if nested else 4 * blocks
    return n // 2 + absmax + n * out_dtype.itemsize


def _gpu_round_us(fn, weights, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        packed, state = weights[i % len(weights)]
        fn(packed, state)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def _cpu_round_us(fn, weights, calls: int) -> float:
    begin = time.perf_counter()
    for i in range(calls):
        packed, state = weights[i % len(weights)]
        fn(packed, state)
    return (time.perf_counter() - begin) * 1e6 / calls


def time_us(fn, weights, warmup: int, rounds: int, calls: int, gpu: bool) -> float:
    """The median over `rounds` of the mean µs a call of `calls` back-to-back calls, after `warmup` calls."""
    timer = _gpu_round_us if gpu else _cpu_round_us
    timer(fn, weights, warmup)
    return statistics.median(timer(fn, weights, calls) for _ in range(rounds))


def graph_us(fn, weights, rounds: int, calls: int) -> float | None:
    """GPU time alone: `calls` calls captured in one CUDA graph, replayed `rounds` times; the median round's
    µs a call. None where the call cannot be captured (a host sync, a non-current stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            fn(*weights[0])  # first calls (compiles, buffers) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(*weights[i % len(weights)])
    except Exception as exc:  # any capture failure: recorded, the eager timing stands
        print(f"graph capture failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        torch.cuda.synchronize()
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def measure(case: str, rows: int, cols: int, nested: bool, args, gpu: bool, found: dict) -> dict:
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    moved = bytes_moved(rows, cols, nested, dtype)
    copies = max(2, -(-3 * L2_BYTES // moved)) if gpu else 1
    weights = quantized(rows, cols, nested, device, dtype, copies)
    truth = found["bnb"](*weights[0])
    row = {
        "case": case,
        "shape": [rows, cols],
        "nested": nested,
        "dtype": str(dtype).removeprefix("torch."),
        "blocksize": BLOCKSIZE,
        "bytes_per_call": moved,
        "weight_copies": copies,
    }
    for name, fn in found.items():
        us = time_us(fn, weights, args.warmup, args.rounds, args.calls, gpu)
        gpu_us = graph_us(fn, weights, args.rounds, args.calls) if gpu else None
        row[f"{name}_us"], row[f"{name}_tb_s"] = round(us, 2), float(f"{moved / us / 1e6:.4g}")
        row[f"{name}_gpu_us"] = None if gpu_us is None else round(gpu_us, 2)
        row[f"{name}_gpu_tb_s"] = None if gpu_us is None else float(f"{moved / gpu_us / 1e6:.4g}")
        row[f"{name}_bit_exact_vs_bnb"] = bool(torch.equal(fn(*weights[0]), truth))
    for name in found:
        row[f"{name}_speedup_vs_bnb"] = round(row["bnb_us"] / row[f"{name}_us"], 3)
        both = row["bnb_gpu_us"] is not None and row[f"{name}_gpu_us"] is not None
        row[f"{name}_gpu_speedup_vs_bnb"] = round(row["bnb_gpu_us"] / row[f"{name}_gpu_us"], 3) if both else None
    del weights
    if gpu:
        torch.cuda.empty_cache()
    return row


def environment(gpu: bool) -> dict:
    import bitsandbytes
    import triton

    versions = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import unsloth

        versions["unsloth"] = unsloth.__version__
    except Exception:  # not installed here, or refusing this machine: recorded by its absence
        pass
    return {
        "device": torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter, smoke)",
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_markdown(report: dict, path: pathlib.Path) -> None:
    names = [n for n in ("bnb", "ours", "unsloth") if f"{n}_us" in report["rows"][0]]
    first = report["rows"][0]
    lines = [
        f"# NF4 dequantization, {report['device']} ({first['dtype']} output, blocksize {BLOCKSIZE})",
        "",
        "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"date: {report['date']}",
        "",
        "| case | nested | "
        + " | ".join(f"{n}: eager µs, GPU µs (GPU TB/s)" for n in names)
        + " | "
        + " | ".join(f"{n} / bnb (eager, GPU)" for n in names[1:])
        + " | bit-exact vs bnb |",
        "|" + "---|" * (3 + 2 * len(names) - 1),
    ]
    for r in report["rows"]:
        timed = " | ".join(f"{r[n + '_us']}, {r[n + '_gpu_us']} ({r[n + '_gpu_tb_s']})" for n in names)
        ratios = " | ".join(f"{r[n + '_speedup_vs_bnb']}x, {r[n + '_gpu_speedup_vs_bnb'] or '-'}x" for n in names[1:])
        exact = ", ".join(n for n in names[1:] if r[f"{n}_bit_exact_vs_bnb"]) or "none"
        lines.append(f"| {r['case']} | {r['nested']} | {timed} | {ratios} | {exact} |")
    lines += [
        "",
        "eager = back-to-back calls from Python (host work included: where it exceeds the GPU work, it is the"
        " time); GPU = the same calls replayed from a CUDA graph (GPU work alone).",
        f"TB/s = (packed + absmax bytes read + output bytes written) / GPU time; target >= {TARGET_TB_S}.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shapes, few calls")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed round")
    args = parser.parse_args(argv)
    gpu = not args.smoke
    if args.smoke:
        args.warmup, args.rounds, args.calls = 1, 3, 2
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --smoke)")
    found = contenders(with_unsloth=gpu)
    report = {**environment(gpu), "rows": []}
    card = "smoke" if args.smoke else torch.cuda.get_device_name().lower().replace(" ", "-")
    args.out.mkdir(parents=True, exist_ok=True)
    for case, (rows, cols) in (SMOKE_CASES if args.smoke else CASES).items():
        for nested in (False, True):
            row = measure(case, rows, cols, nested, args, gpu, found)
            print(json.dumps(row), flush=True)
            report["rows"].append(row)
    (args.out / f"nf4-dequant-{card}.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, args.out / f"nf4-dequant-{card}.md")
    return report


if __name__ == "__main__":
    main()
