"""Attention benchmark: the Triton kernel and its peers, side by side in one process on one GPU.

    python benchmarks/attention.py [--out DIR] [--cases a,b] [--sweep] [--jobs N]

For each case and pass (forward; forward + backward) it times, with `triton.testing.do_bench` (median,
L2 flushed between runs): ours (`optimized.kernels.attention.attention`); PyTorch SDPA with each backend
pinned (cuDNN, flash, efficient) and its default dispatch; compiled `flex_attention` with the
equivalent block mask; and the way transformers computes the case today (its `sdpa_attention_forward`,
with the per-image / per-window Python loops or dense masks the families use). They are timed in turn,
ROUNDS times over, and each keeps its median round. A peer that cannot run
a case is recorded as null with the reason. Masks and block masks are built outside the timed region,
as transformers builds them once per forward; the per-image loops' `.tolist()` sync is per layer, so it
is timed. Inputs are (B, S, H, D) memory viewed as (B, H, S, D), as transformers passes them.

FLOPs count attended pairs only, the same for everyone: 4 * Hq * D per pair forward, 3.5x that for
forward + backward (FlashAttention's convention: backward = 2.5x forward).

Writes DIR/attention-<card>.json and .md; --sweep first times each kernel alone over candidate tile
plans (DIR/attention-<card>-sweep.json) and then uses the fastest plan per kernel. Compiling is the slow
part (~3 s a Triton variant, ~30 s a flex graph), so --jobs N compiles every variant in N worker
processes first; the timed runs then load them from the on-disk caches.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import multiprocessing
import os
import pathlib
import platform
import statistics
import sys
import time
import types
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from optimized import attention_peers, ops  # noqa: E402
from optimized.kernels import attention as kernel  # noqa: E402
from reference.ops.attention import AttentionSpec, build_mask  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PAD_ENV = "FASTVISION_BENCH_PADDED_HEAD_DIMS"
DTYPE = torch.bfloat16
BWD_FACTOR = 3.5  # forward + backward, with backward = 2.5 x forward


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq: int
    q_heads: int
    kv_heads: int
    head_dim: int
    kind: str  # causal | sliding | span | segments | full
    family_way: str  # how transformers runs it: sdpa_causal | sdpa_dense_bool | sdpa_dense_float | per_segment
    #                  | sdpa_unmasked
    window: int | None = None
    span: tuple[int, int] | None = None  # (start, length) of the bidirectional block
    segments: tuple[int, ...] = ()
    minimum: tuple[float, float] = (1.0, 1.0)  # ours / best peer, forward and forward + backward
    target: float = 1.0

    def spec(self, device) -> AttentionSpec:
        if self.kind == "full":
            return AttentionSpec()
        if self.kind == "causal":
            return AttentionSpec(causal=True)
        if self.kind == "sliding":
            return AttentionSpec(causal=True, window=self.window)
        if self.kind == "span":
            ids = torch.full((self.batch, self.seq), -1, dtype=torch.int32, device=device)
            ids[:, self.span[0]:self.span[0] + self.span[1]] = 0
            return AttentionSpec(causal=True, span_ids=ids)
        cu = torch.tensor([0, *itertools.accumulate(self.segments)], dtype=torch.int32, device=device)
        return AttentionSpec(cu_seqlens=cu)


CASES = [
    Case("text_causal_gqa_d128", 4, 4096, 28, 4, 128, "causal", "sdpa_causal"),
    Case("gemma3_sliding_d256", 1, 8192, 8, 4, 256, "sliding", "sdpa_dense_bool", window=1024, target=1.5),
    Case("gemma3_image_span_d256", 1, 4096, 8, 4, 256, "span", "sdpa_dense_bool", span=(1024, 256),
         target=1.3),
    Case("qwen2vl_vision_varlen_d80", 1, 4096, 16, 16, 80, "segments", "per_segment", segments=(1024,) * 4,
         target=1.5),
    Case("pixtral_vision_blockdiag_d64", 1, 4096, 16, 16, 64, "segments", "sdpa_dense_float",
         segments=(1024,) * 4, target=1.5),
    Case("qwen25vl_vision_windows_d80", 1, 81 * 64, 16, 16, 80, "segments", "per_segment",
         segments=(64,) * 81, target=3.0),
]
# Not in the table: the shapes one training step of benchmarks/model.py runs (batch 4 x ~2,000
# tokens, the representative checkpoints' heads), to see where a whole step's attention time goes.
MODEL_CASES = [
    Case("llava_text_causal_d128", 4, 2048, 32, 32, 128, "causal", "sdpa_causal"),
    Case("gemma3_text_sliding_d256", 4, 2048, 8, 4, 256, "sliding", "sdpa_dense_bool", window=1024),
    Case("gemma3_vision_full_d72", 4, 4096, 16, 16, 72, "full", "sdpa_unmasked"),
    Case("llava_vision_full_d64", 4, 577, 16, 16, 64, "full", "sdpa_unmasked"),
]
PASSES = ("fwd", "fwd_bwd")


# ------------------------------------------------------------------------------------------------
# Inputs and the peers
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
    case: Case
    q: torch.Tensor  # (B, Hq, S, D) views of (B, S, Hq, D) leaves
    k: torch.Tensor
    v: torch.Tensor
    leaves: tuple
    grad: torch.Tensor  # (B, Hq, S, D)
    spec: AttentionSpec
    mask: torch.Tensor  # (B, 1, S, S) bool, True = attend (for the dense-mask peers)
    pairs: int  # attended (query, key) pairs per head, summed over the batch


def make_inputs(case: Case, device="cuda", seed=0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)

    def leaf(heads):
        return torch.randn(case.batch, case.seq, heads, case.head_dim, generator=gen, device=device,
                           dtype=DTYPE).requires_grad_(True)

    leaves = (leaf(case.q_heads), leaf(case.kv_heads), leaf(case.kv_heads))
    q, k, v = (t.transpose(1, 2) for t in leaves)
    spec = case.spec(device)
    mask = build_mask(spec, case.batch, case.seq, case.seq, device)
    grad = torch.randn(q.shape, generator=gen, device=device, dtype=DTYPE)
    return Inputs(case, q, k, v, leaves, grad, spec, mask, int(mask.sum()))


def _sdpa(backend):
    """SDPA as a caller with the structure in hand uses it: is_causal for pure causal, else the mask.
    GQA goes through enable_gqa; where a backend refuses that, K/V are repeated inside the timed call
    (transformers' repeat_kv) and the row's notes say so."""
    from torch.nn.attention import sdpa_kernel

    def call(x: Inputs, q, k, v, gqa):
        causal, unmasked = x.case.kind == "causal", x.case.kind in ("causal", "full")
        with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None if unmasked else x.mask,
                                                  is_causal=causal, enable_gqa=gqa)

    def run(x: Inputs, q, k, v):
        group = q.shape[1] // k.shape[1]
        if group > 1 and run.native_gqa:
            try:
                return call(x, q, k, v, True)
            except RuntimeError as exc:
                run.native_gqa = False
                run.notes.append(f"enable_gqa refused ({_reason(exc)}); K/V repeated in the timed call")
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return call(x, q, k, v, False)

    run.native_gqa, run.notes = True, []
    return run


def _flex_mask_mod(x: Inputs):
    case = x.case
    if case.kind == "full":
        return lambda b, h, qi, ki: qi >= 0
    if case.kind == "causal":
        return lambda b, h, qi, ki: qi >= ki
    if case.kind == "sliding":
        return lambda b, h, qi, ki: (qi >= ki) & (qi - ki < case.window)
    if case.kind == "span":
        ids = x.spec.span_ids
        return lambda b, h, qi, ki: (qi >= ki) | ((ids[b, qi] == ids[b, ki]) & (ids[b, qi] >= 0))
    doc = torch.repeat_interleave(torch.arange(len(case.segments), device=x.q.device),
                                  torch.tensor(case.segments, device=x.q.device))
    return lambda b, h, qi, ki: doc[qi] == doc[ki]


_FLEX = {}


def _flex(x: Inputs):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        # Every case and grad mode is a recompile; past dynamo's default limit of 8, flex would silently
        # fall back to its unfused eager path and be timed as such.
        for name, limit in (("recompile_limit", 64), ("cache_size_limit", 64),
                            ("accumulated_recompile_limit", 512), ("accumulated_cache_size_limit", 512)):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, limit)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(_flex_mask_mod(x), x.case.batch if x.case.kind == "span" else None, None,
                                   x.case.seq, x.case.seq, device=x.q.device)
    gqa = x.case.q_heads != x.case.kv_heads
    return lambda x_, q, k, v: _FLEX["fn"](q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _transformers(x: Inputs):
    """transformers 5.x's own attention path for the family (see the notes' section 1)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    case = x.case
    module = types.SimpleNamespace(num_key_value_groups=case.q_heads // case.kv_heads,
                                   is_causal=case.kind not in ("segments", "full"),
                                   training=False)
    scale = 1.0 / math.sqrt(case.head_dim)
    if case.family_way in ("sdpa_causal", "sdpa_unmasked"):  # mask None: is_causal or not, GQA by enable_gqa
        return lambda x_, q, k, v: sdpa_attention_forward(module, q, k, v, None, scaling=scale)[0]
    if case.family_way == "sdpa_dense_bool":  # Gemma3: create_masks_for_vision_model's bool mask
        return lambda x_, q, k, v: sdpa_attention_forward(module, q, k, v, x.mask, scaling=scale)[0]
    if case.family_way == "sdpa_dense_float":  # Pixtral: generate_block_attention_mask, finfo.min off-block
        additive = torch.zeros(x.mask.shape, dtype=DTYPE, device=x.mask.device)
        additive.masked_fill_(~x.mask, torch.finfo(DTYPE).min)
        return lambda x_, q, k, v: sdpa_attention_forward(module, q, k, v, additive, scaling=scale,
                                                          is_causal=False)[0]
    cu = x.spec.cu_seqlens

    def per_segment(x_, q, k, v):  # Qwen2-VL / Qwen2.5-VL VisionAttention without a "flash" key
        lengths = (cu[1:] - cu[:-1]).tolist()
        splits = [torch.split(t, lengths, dim=2) for t in (q, k, v)]
        outs = [sdpa_attention_forward(module, qi, ki, vi, None, scaling=scale, is_causal=False)[0]
                for qi, ki, vi in zip(*splits)]
        return torch.cat(outs, dim=1)
    return per_segment


def peers(x: Inputs) -> dict:
    """name -> fn(x, q, k, v) -> out; or name -> Exception when it cannot even be built."""
    from torch.nn.attention import SDPBackend

    found = {"sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
             "sdpa_efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION), "sdpa_default": _sdpa(None)}
    for name, build in (("flex", _flex), ("transformers", _transformers)):
        try:
            found[name] = build(x)
        except Exception as exc:  # recorded as null with its reason
            found[name] = exc
    return found


def ours(plan=None, fold_scale: bool = True):
    def run(x: Inputs, q, k, v):
        return kernel.attention_with_plan(q, k, v, x.spec, plan, fold_scale=fold_scale)
    return run


def backend(x: Inputs, q, k, v):
    """The optimized backend's op as a training step calls it: the kernel, or the peer its rule routes to."""
    return ops.attention(q, k, v, x.spec)


def route_of(x: Inputs) -> str:
    return attention_peers.peer_for(attention_peers.kind_of(x.q, x.k, x.spec)) or "kernel"


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def _as_bhsd(out, x: Inputs):
    return out if out.shape == x.q.shape else out.transpose(1, 2)  # transformers returns (B, S, H, D)


def _step(fn, x: Inputs, which: str):
    if which == "fwd":
        def step():
            with torch.no_grad():
                fn(x, x.q, x.k, x.v)
    else:
        def step():
            out = _as_bhsd(fn(x, x.q, x.k, x.v), x)
            torch.autograd.grad(out, x.leaves, x.grad)
    return step


def time_pass(fn, x: Inputs, which: str) -> float:
    """Median milliseconds of one pass, host launch latency included (the GPU waits for it)."""
    step = _step(fn, x, which)
    step()
    torch.cuda.synchronize()
    return do_bench(step, warmup=25, rep=100, return_mode="median")


def host_pass(fn, x: Inputs, which: str, repeat: int = 20) -> float:
    """Mean host milliseconds to issue one pass: Python, autograd and launch overhead alone."""
    step = _step(fn, x, which)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        step()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / repeat * 1e3


def tflops(x: Inputs, which: str, ms: float) -> float:
    flops = 4.0 * x.case.q_heads * x.case.head_dim * x.pairs * (1.0 if which == "fwd" else BWD_FACTOR)
    return flops / (ms * 1e-3) / 1e12


# Ours and every peer are timed in turn, ROUNDS times over, and each keeps its median round. The vision
# cases' steps are ~0.3 ms and bound by host speed, which drifts within a run (ours forward + backward on
# Qwen2-VL: 0.29 ms of host time a step in one process, 0.62 in another on the same kind of H100 box):
# timed once each, minutes apart, ours and a peer could meet different hosts.
ROUNDS = 5


def measure_case(x: Inputs, plan) -> list[dict]:
    ours_fn = ours(plan)
    rows = {p: {"case": x.case.name, "pass": p, "peers": {}, "notes": {}, "max_abs_diff_vs_ours": {}}
            for p in PASSES}
    contestants = {"ours": ours_fn, "backend": backend}
    for name, fn in peers(x).items():
        for row in rows.values():  # the peers' order, timed or not
            row["peers"][name] = None
            if isinstance(fn, Exception):
                row["notes"][name] = _reason(fn)
        if not isinstance(fn, Exception):
            contestants[name] = fn
    times = _timed_rounds(x, contestants, rows)
    for which, row in rows.items():
        row["ours_tflops"] = tflops(x, which, statistics.median(times["ours", which]))
        row["ours_host_ms"] = round(host_pass(ours_fn, x, which), 4)
        row["backend_tflops"] = tflops(x, which, statistics.median(times["backend", which]))
        for name, fn in contestants.items():
            if name not in ("ours", "backend"):
                ms = times[name, which]
                row["peers"][name] = None if ms is None else tflops(x, which, statistics.median(ms))
                if getattr(fn, "notes", None):
                    row["notes"][name] = "; ".join(filter(None, [row["notes"].get(name), *fn.notes]))
    for which, row in rows.items():
        timed = {k: v for k, v in row["peers"].items() if v is not None}
        row["best_peer"] = max(timed, key=timed.get) if timed else None
        row["ratio"] = round(row["ours_tflops"] / timed[row["best_peer"]], 3) if timed else None
        row["route"] = route_of(x)
        row["backend_ratio"] = round(row["backend_tflops"] / timed[row["best_peer"]], 3) if timed else None
        row["minimum"] = x.case.minimum[PASSES.index(which)]
        # The rule: the backend as shipped (kernel or routed peer) against the best peer.
        row["meets_minimum"] = row["backend_ratio"] is not None and row["backend_ratio"] >= row["minimum"]
        row["ours_tflops"], row["backend_tflops"] = round(row["ours_tflops"], 1), round(row["backend_tflops"], 1)
        row["peers"] = {k: None if v is None else round(v, 1) for k, v in row["peers"].items()}
        row["rounds"] = ROUNDS
    return list(rows.values())


def _timed_rounds(x: Inputs, contestants: dict, rows: dict) -> dict:
    """{(name, pass): [ms of each round]}, or None for a peer that failed (its reason goes in the notes).
    The first round also records each peer's largest output difference from ours."""
    with torch.no_grad():
        reference_out = contestants["ours"](x, x.q, x.k, x.v)
    times = {(name, which): [] for name in contestants for which in PASSES}
    for round_index in range(ROUNDS):
        for name, fn in contestants.items():
            for which in PASSES:
                if times[name, which] is None:
                    continue
                try:
                    if round_index == 0 and name != "ours" and which == "fwd":
                        with torch.no_grad():
                            out = _as_bhsd(fn(x, x.q, x.k, x.v), x)
                        diff = (out.float() - reference_out.float()).abs().max()
                        rows[which]["max_abs_diff_vs_ours"][name] = round(float(diff), 4)
                    times[name, which].append(time_pass(fn, x, which))
                except Exception as exc:  # e.g. flash takes no mask, cuDNN no d256 backward
                    if name in ("ours", "backend"):
                        raise
                    times[name, which] = None
                    rows[which]["notes"][name] = _reason(exc, _why_not(fn, x))
                torch.cuda.empty_cache()
    return times


def _reason(exc: Exception, detail: str = "") -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (" ".join(line.strip() for line in text[:3]) + (f" ({detail})" if detail else ""))[:400]


def _why_not(fn, x: Inputs) -> str:
    """SDPA says why a pinned backend refused ("No available kernel") only in warnings: collect them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.suppress(Exception), torch.no_grad():
            fn(x, x.q, x.k, x.v)
    texts = [str(w.message).split(" (Triggered")[0] for w in caught]
    return "; ".join(dict.fromkeys(t for t in texts if "not used because" not in t))


# ------------------------------------------------------------------------------------------------
# Tile sweep: each kernel alone over candidate plans
# ------------------------------------------------------------------------------------------------

T = kernel.Tiles
CANDIDATES = {  # head width -> kernel -> tiles; the kernel's default plan is always tried too
    64: {"fwd": [T(128, 64, 4, 3), T(128, 128, 8, 3), T(64, 64, 4, 3), T(128, 64, 4, 4)],
         "dkdv": [T(64, 128, 8, 3), T(64, 64, 4, 3), T(32, 128, 4, 3), T(64, 128, 4, 2)],
         "dq": [T(128, 64, 8, 3), T(64, 64, 4, 3), T(128, 32, 4, 3), T(64, 128, 4, 2)]},
    80: {"fwd": [T(128, 64, 8, 3), T(128, 64, 4, 3), T(128, 128, 8, 3), T(64, 64, 4, 3)],
         "dkdv": [T(64, 128, 8, 2), T(32, 128, 4, 3), T(64, 64, 4, 3), T(32, 128, 8, 3)],
         "dq": [T(128, 32, 8, 3), T(128, 64, 8, 2), T(64, 64, 4, 3), T(128, 64, 4, 3)]},
    128: {"fwd": [T(128, 64, 8, 3), T(128, 64, 4, 3), T(128, 128, 8, 3), T(128, 128, 8, 2)],
          "dkdv": [T(64, 128, 8, 2), T(64, 64, 4, 3), T(32, 128, 8, 3), T(64, 64, 8, 2)],
          "dq": [T(128, 64, 8, 2), T(64, 64, 4, 3), T(128, 32, 8, 3), T(64, 128, 8, 2)]},
    256: {"fwd": [T(128, 64, 8, 2), T(64, 64, 4, 2), T(128, 32, 8, 2), T(64, 32, 4, 3)],
          "dkdv": [T(32, 64, 4, 2), T(64, 64, 8, 2), T(32, 64, 8, 2), T(64, 32, 4, 2)],
          "dq": [T(64, 64, 8, 2), T(64, 32, 4, 2), T(128, 32, 8, 2), T(32, 64, 4, 2)]},
}
DENSE_CANDIDATES = {  # the dense kernels (kernel.uses_dense_kernel): 4 warps at 2 stages fit two CTAs an SM
    64: {"fwd": [T(128, 64, 4, 2), T(128, 64, 4, 3), T(128, 128, 8, 2), T(64, 64, 4, 2)],
         "dkdv": [T(64, 64, 4, 2), T(64, 128, 4, 2), T(32, 128, 4, 3), T(64, 128, 8, 2), T(64, 64, 4, 3)],
         "dq": [T(64, 64, 4, 2), T(64, 64, 4, 3), T(128, 64, 4, 2), T(128, 64, 8, 2), T(128, 128, 8, 2)]},
    # 8 warps at 128 x 64: two warp groups of 64 rows, 64 accumulator registers a thread where 4 warps
    # hold 128 and spill (255 registers, 28 spilled, H100 compile report)
    128: {"fwd": [T(128, 64, 4, 2), T(128, 64, 4, 3), T(128, 128, 8, 2), T(64, 64, 4, 2), T(128, 64, 8, 2),
                  T(128, 64, 8, 3), T(128, 128, 8, 3)],
          "dkdv": [T(64, 64, 4, 2), T(64, 128, 8, 2), T(32, 64, 4, 3), T(32, 128, 8, 2), T(64, 128, 8, 3),
                   T(64, 64, 8, 2)],
          "dq": [T(64, 64, 4, 2), T(128, 128, 8, 2), T(64, 32, 4, 3), T(128, 64, 8, 2), T(128, 64, 8, 3)]},
}
SHORT_SEGMENTS = {"fwd": [T(64, 64, 4, 3), T(64, 64, 4, 2), T(64, 32, 4, 3), T(128, 64, 8, 3)],
                  "dkdv": [T(64, 64, 4, 3), T(32, 64, 4, 3), T(64, 64, 8, 2)],
                  "dq": [T(64, 64, 4, 3), T(64, 32, 4, 3), T(64, 64, 8, 2)]}


def _dense(case: Case) -> bool:
    """Whether the case's calls take the dense kernels (decided on a small stand-in of its layout)."""
    probe = torch.empty(1, 16, max(case.q_heads, case.kv_heads), case.head_dim, device="cuda",
                        dtype=DTYPE).transpose(1, 2)
    return kernel.uses_dense_kernel(probe, probe, probe, case.spec("cuda"))


def candidates(case: Case) -> dict:
    dense = _dense(case)
    default = kernel.default_plan(case.head_dim, torch.device("cuda"), case.spec("cpu"), case.seq, DTYPE, dense)
    short = kernel.short_segments(case.spec("cpu"), case.seq)
    width = kernel.head_width(case.head_dim)
    if dense:
        table = DENSE_CANDIDATES[min(w for w in DENSE_CANDIDATES if w >= width)]
    else:
        table = SHORT_SEGMENTS if short else CANDIDATES[min(w for w in CANDIDATES if w >= width)]
    return {name: list(dict.fromkeys([getattr(default, name), *table[name]])) for name in table}


def _kernel_runner(x: Inputs, which: str, tiles):
    """A thunk launching one kernel of ours alone, on the lowered structure and saved lse/delta."""
    return kernel.kernel_thunk(x.q, x.k, x.v, x.grad, x.spec, which, tiles)


def sweep_case(x: Inputs) -> tuple[dict, kernel.TilePlan]:
    results, best = {}, {}
    for which, tiles_list in candidates(x.case).items():
        results[which] = []
        for tiles in tiles_list:
            try:
                ms = do_bench(_kernel_runner(x, which, tiles), warmup=25, rep=100, return_mode="median")
                results[which].append({"tiles": list(tiles), "ms": round(ms, 4)})
            except Exception as exc:  # out of shared memory / registers for this shape
                results[which].append({"tiles": list(tiles), "ms": None, "error": _reason(exc)})
        timed = [r for r in results[which] if r["ms"] is not None]
        best[which] = kernel.Tiles(*min(timed, key=lambda r: r["ms"])["tiles"])
    return results, kernel.TilePlan(**best)


# ------------------------------------------------------------------------------------------------
# Parallel compile, reports, main
# ------------------------------------------------------------------------------------------------


def _pad_from_env() -> None:
    kernel.pad_head_dims(int(d) for d in os.environ.get(PAD_ENV, "").split(",") if d)


def _warm(case_name: str, what: str, tiles) -> str:
    """Worker: compile one variant into the on-disk caches by running it once; no timing here."""
    _pad_from_env()
    case = next(c for c in CASES + MODEL_CASES if c.name == case_name)
    x = make_inputs(case)
    try:
        if what == "flex":  # inference and training graphs are compiled separately
            fn = _flex(x)
            with torch.no_grad():
                fn(x, x.q, x.k, x.v)
            torch.autograd.grad(fn(x, x.q, x.k, x.v), x.leaves, x.grad)
        elif what == "ours":
            torch.autograd.grad(ours()(x, x.q, x.k, x.v), x.leaves, x.grad)
        else:
            _kernel_runner(x, what, kernel.Tiles(*tiles))()
        torch.cuda.synchronize()
        return f"{case_name} {what} {tiles or ''} ok"
    except Exception as exc:
        return f"{case_name} {what} {tiles or ''} failed: {_reason(exc)}"


def warm_caches(cases, sweep: bool, jobs: int) -> None:
    tasks = [(c.name, "flex", None) for c in cases] + [(c.name, "ours", None) for c in cases]
    if sweep:
        tasks += [(c.name, which, tuple(t)) for c in cases for which, ts in candidates(c).items() for t in ts]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        for line in pool.map(_warm, *zip(*tasks)):
            print("warm:", line, flush=True)


def environment() -> dict:
    import transformers

    return {"device": torch.cuda.get_device_name(), "versions": {
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_markdown(report: dict, path: pathlib.Path) -> None:
    names = ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_default", "flex", "transformers"]
    lines = [f"# Attention, {report['device']} (bf16, TFLOP/s over attended pairs)", "",
             "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"date: {report['date']}", "",
             "| case | pass | kernel | " + " | ".join(names) + " | best peer | kernel ratio | route | backend "
             "| backend ratio | minimum | meets |",
             "|" + "---|" * (len(names) + 10)]
    for r in report["rows"]:
        cells = [str(r["peers"].get(n)) if r["peers"].get(n) is not None else "n/a" for n in names]
        meets = "yes" if r["meets_minimum"] else "NO"
        route = "kernel" if r["route"] == "kernel" else "peer"
        lines.append(f"| {r['case']} | {r['pass']} | {r['ours_tflops']} | " + " | ".join(cells)
                     + f" | {r['best_peer']} | {r['ratio']} | {route} | {r['backend_tflops']} | {r['backend_ratio']}"
                     f" | {r['minimum']} | {meets} |")
    lines += ["", "kernel = the Triton kernel alone; backend = `optimized.ops.attention`, the op a step calls: "
              "the kernel, or SDPA where `optimized/attention_peers.py` routes the kind of call (route; the JSON "
              "says why). meets = backend ratio >= minimum.",
              "n/a = the peer cannot run the case; reasons are in the JSON's `notes`.",
              "Plans (block_m, block_n, warps, stages) per kernel are in the JSON's `plan`."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--cases", default=",".join(c.name for c in CASES),
                        help="comma-separated; also: " + ",".join(c.name for c in MODEL_CASES))
    parser.add_argument("--sweep", action="store_true", help="time candidate tile plans first")
    parser.add_argument("--jobs", type=int, default=0, help="compile in N processes first (0: no)")
    parser.add_argument("--pad-head-dim", type=int, nargs="*", default=[],
                        help="run these head dims padded to a power of two instead of split (kernel.pad_head_dims)")
    parser.add_argument("--warm-only", action="store_true", help="only fill the compile caches (--jobs)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES + MODEL_CASES if c.name in args.cases.split(",")]
    os.environ[PAD_ENV] = ",".join(map(str, args.pad_head_dim))  # spawned compile workers read it too
    _pad_from_env()
    if args.jobs:
        warm_caches(cases, args.sweep, args.jobs)
    if args.warm_only:
        return
    card = torch.cuda.get_device_name().lower().replace("nvidia", "").strip().replace(" ", "-")
    report, sweeps = {**environment(), "rows": []}, {}
    args.out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        x = make_inputs(case)
        plan = None
        if args.sweep:
            sweeps[case.name], plan = sweep_case(x)
            (args.out / f"attention-{card}-sweep.json").write_text(json.dumps(sweeps, indent=1))
        rows = measure_case(x, plan)
        for row in rows:
            row["plan"] = _plan_dict(x, plan)
            print(json.dumps({k: row[k] for k in ("case", "pass", "ours_tflops", "best_peer", "ratio", "route",
                                                  "backend_ratio")}), flush=True)
        report["rows"] += rows
        (args.out / f"attention-{card}.json").write_text(json.dumps(report, indent=1))
        write_markdown(report, args.out / f"attention-{card}.md")
        del x
        torch.cuda.empty_cache()
    (args.out / f"attention-{card}-compiled.json").write_text(json.dumps(compiled_report(), indent=1))


def compiled_report() -> list[dict]:
    """Registers, spills, shared memory and wgmma count of every compiled variant of our kernels: what
    the compiler made of each plan (best effort: these are Triton internals)."""
    found = []
    for fn in kernel.kernels():
        for caches in getattr(fn, "device_caches", {}).values():
            for compiled in caches[0].values():
                try:
                    meta, constants = compiled.metadata, getattr(compiled.src, "constants", {})
                    named = {fn.arg_names[k[0]] if isinstance(k, tuple) else str(k): v for k, v in constants.items()}
                    blocks = {k: v for k, v in named.items() if k.startswith(("BLOCK", "HEAD", "D_", "SPLIT"))}
                    found.append({"kernel": fn.__name__, "blocks": blocks, "num_warps": meta.num_warps,
                                  "num_stages": meta.num_stages, "regs": compiled.n_regs,
                                  "spills": compiled.n_spills, "shared_bytes": meta.shared,
                                  "wgmma_in_ptx": compiled.asm.get("ptx", "").count("wgmma.mma_async")})
                except Exception as exc:
                    found.append({"kernel": fn.__name__, "error": _reason(exc)})
    return found


def _plan_dict(x: Inputs, plan) -> dict:
    """The plan the kernels ran: the given one, else the default one for the call (dense or not)."""
    dense = kernel.uses_dense_kernel(x.q, x.k, x.v, x.spec)
    plan = plan or kernel.default_plan(x.case.head_dim, x.q.device, x.spec, x.case.seq, x.q.dtype, dense)
    return {name: list(tiles) for name, tiles in plan._asdict().items()} | {"dense_kernels": dense}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
