"""Routed attention against the peer it is routed to: same kernels, paired times, GPU time and host time.

    python benchmarks/attention_routed.py [--out DIR] [--cases a,b] [--rounds N]

`attention.py` judges the backend's op against the best of four timings of SDPA. Where the op is routed
(`optimized/attention_peers.py`) it *is* one of those calls, so its row reads below the best by the spread
among timings of one kernel (0.95-0.98 on the H200, 2026-12-02), and a 577-token call by its host drift
(0.77). This benchmark asks the question that leaves: what does routing cost? For every case the rule
routes, forward and forward + backward, in one process:

  kernels    the CUDA kernels each contender launches (profiler), and whether the backend's equal its peer's;
  wall       ROUNDS rounds, backend and every SDPA peer timed in turn by `do_bench` as `attention.py` does;
             per round the backend over the best peer of that round; the median of those ratios;
  gpu        the same calls replayed from CUDA graphs: GPU time alone, no host work;
  host       microseconds the host takes to issue one call (Python, dispatch, autograd).

Writes DIR/attention-<card>-routed-check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import attention as bench  # noqa: E402

ROUNDS = 7
PEERS = ("sdpa_default", "sdpa_cudnn", "sdpa_flash", "transformers")  # the calls a routed op could be
HOST_CALLS = 50  # issued back to back
CALLED = "sdpa_default"  # what `attention_peers.peer_attention` calls: SDPA with PyTorch's choice


def graph_ms(step) -> float:
    """Median ms of `step` replayed from a CUDA graph: no host work in the timed region."""
    side = torch.cuda.Stream()  # warm-up off the capture stream, as torch.cuda.graphs asks for autograd
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    try:
        return bench.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    finally:
        del graph
        torch.cuda.empty_cache()


def kernels_launched(step) -> list[str]:
    """The names of the CUDA kernels one call of `step` launches, in order."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    return [e.name for e in events]


def contenders(x) -> dict:
    built = {"backend": bench.backend, **bench.peers(x)}
    return {name: fn for name, fn in built.items() if name in ("backend", *PEERS) and not isinstance(fn, Exception)}


def paired_ratio(rounds: list[dict[str, float]]) -> tuple[float, str]:
    """Median over rounds of backend ms over the best peer's ms in the same round (> 1: the backend is
    faster), and the peer that was best most often."""
    ratios, best = [], []
    for times in rounds:
        peer = min((n for n in times if n != "backend"), key=times.get)
        ratios.append(times[peer] / times["backend"])
        best.append(peer)
    return statistics.median(ratios), max(set(best), key=best.count)


def measure(x, which: str, rounds: int) -> dict:
    fns = contenders(x)
    steps = {name: bench._step(fn, x, which) for name, fn in fns.items()}
    kernels = {name: kernels_launched(step) for name, step in steps.items()}
    wall = [{name: bench.time_pass(fn, x, which) for name, fn in fns.items()} for _ in range(rounds)]
    host = {name: bench.host_pass(fn, x, which, HOST_CALLS) * 1e3 for name, fn in fns.items()}
    gpu = {}
    for name, step in steps.items():  # last: the first H200 run ran out of memory issuing calls after them
        try:
            gpu[name] = graph_ms(step)
        except Exception as exc:  # e.g. a call that syncs the host cannot be captured
            gpu[name] = None
            print(f"{x.case.name} {which} {name}: no CUDA graph ({bench._reason(exc)})", flush=True)
    return verdict(x.case.name, which, kernels, wall, gpu, host, x.case.minimum[bench.PASSES.index(which)])


def verdict(case: str, which: str, kernels: dict, wall: list[dict], gpu: dict, host: dict, minimum: float) -> dict:
    """One row: the facts and the judgement, from measurements (pure: tested on the CPU)."""
    ratio, best = paired_ratio(wall)
    gpu_peers = {n: ms for n, ms in gpu.items() if n != "backend" and ms is not None}
    gpu_best = min(gpu_peers, key=gpu_peers.get) if gpu_peers else None
    gpu_ratio = gpu_peers[gpu_best] / gpu["backend"] if gpu_best and gpu.get("backend") else None
    return {"case": case, "pass": which, "same_kernels_as_called": kernels["backend"] == kernels.get(CALLED),
            "kernels": kernels,
            "wall_ms_median": {n: round(statistics.median(r[n] for r in wall), 4) for n in wall[0]},
            "wall_ratio": round(ratio, 3), "wall_best_peer": best,
            "gpu_ms": {n: None if ms is None else round(ms, 4) for n, ms in gpu.items()},
            "gpu_ratio": None if gpu_ratio is None else round(gpu_ratio, 3), "gpu_best_peer": gpu_best,
            "host_us": {n: round(us, 1) for n, us in host.items()},
            "host_us_over_called": round(host["backend"] - host[CALLED], 1) if CALLED in host else None,
            "rounds": len(wall), "minimum": minimum,
            "meets_wall": ratio >= minimum, "meets_gpu": gpu_ratio is not None and gpu_ratio >= minimum}


def markdown(report: dict) -> str:
    lines = [f"# Routed attention vs the peer it calls, {report['device']} (bf16)", "",
             "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), f"date: {report['date']}",
             "", "| case | pass | same kernels as sdpa_default | wall ratio (paired) | best peer (wall) | GPU ratio "
             "| best peer (GPU) | host us: backend / sdpa_default | minimum | meets wall | meets GPU |",
             "|" + "---|" * 11]
    for r in report["rows"]:
        host = f"{r['host_us']['backend']} / {r['host_us'].get(CALLED)}"
        lines.append(f"| {r['case']} | {r['pass']} | {'yes' if r['same_kernels_as_called'] else 'NO'} | "
                     f"{r['wall_ratio']} | {r['wall_best_peer']} | {r['gpu_ratio']} | {r['gpu_best_peer']} | {host} | "
                     f"{r['minimum']} | {'yes' if r['meets_wall'] else 'NO'} | {'yes' if r['meets_gpu'] else 'NO'} |")
    lines += ["", "ratio = best peer's ms / the backend's ms (> 1: the backend is faster). wall: the median over "
              f"rounds of the per-round ratio, each round timing every contender in turn with do_bench (L2 flushed, "
              f"host launch latency included). GPU: CUDA-graph replay, no host work. host: issuing one call. "
              f"Peers: {', '.join(PEERS)}; the kernels each launched are in the JSON."]
    return "\n".join(lines) + "\n"


def routed_cases() -> list:
    """The benchmark's cases the routing rule sends to the peer."""
    found = []
    for case in bench.CASES + bench.MODEL_CASES:
        probe = bench.make_inputs(bench.dataclasses.replace(case, batch=1, seq=16))
        if bench.route_of(probe) != "kernel":
            found.append(case)
    return found


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=bench.RESULTS)
    parser.add_argument("--cases", default=None, help="comma-separated (default: every routed case)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args(argv)
    cases = [c for c in routed_cases() if args.cases is None or c.name in args.cases.split(",")]
    card = torch.cuda.get_device_name().lower().replace("nvidia", "").strip().replace(" ", "-")
    report = {**bench.environment(), "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        x = bench.make_inputs(case)
        for which in bench.PASSES:
            row = measure(x, which, args.rounds)
            print(json.dumps({k: row[k] for k in ("case", "pass", "same_kernels_as_called", "wall_ratio",
                                                  "gpu_ratio", "host_us_over_called")}), flush=True)
            report["rows"].append(row)
            (args.out / f"attention-{card}-routed-check.json").write_text(json.dumps(report, indent=1))
            (args.out / f"attention-{card}-routed-check.md").write_text(markdown(report))
        del x
        torch.cuda.empty_cache()
    return report


if __name__ == "__main__":
    main()
