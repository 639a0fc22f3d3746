"""Tile plans: each kernel's launch shape (block sizes, warps, stages) by device, dtype, head dim and spec,
and how a head dim is split into power-of-two column parts."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from optimized.kernels.launch import interpreted
from reference.ops.attention import AttentionSpec


class Tiles(NamedTuple):
    """One kernel's launch shape: rows per program (block_m), keys per step (block_n), warps, stages.
    For the dK/dV kernel block_n is the key tile a program owns and block_m the query step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class TilePlan(NamedTuple):
    fwd: Tiles
    dkdv: Tiles
    dq: Tiles


# The interpreter runs each tile step through numpy at a cost set by the step count more than the tile
# size: 64 x 64 tiles took the suite's text-attention parity test from 36.6 s (32 x 32) to 21.9 s on 2
# cores, and the CPU tests' 17-128 tokens still cross tile boundaries (the kernel tests draw other tile
# shapes, down to 16, on purpose).
_INTERPRETER_PLAN = TilePlan(Tiles(64, 64, 4, 1), Tiles(64, 64, 4, 1), Tiles(64, 64, 4, 1))

# fp32 on a GPU is a precision path, not a speed one: "ieee" dots have no tensor-core (wgmma) form, so
# Triton unrolls them into FMAs held in registers, and the bf16 plans' 128 x 64 tiles with 3 stages of
# 4-byte K/V (3 x 64 x 256 x 4 B = 192 KB for each of K and V at d256) pass the H100's 227 KB of shared
# memory. 32 x 32 tiles, one stage: <= 96 KB at d256, and small unrolled FMA blocks to compile.
_FP32_GPU_PLAN = TilePlan(Tiles(32, 32, 4, 1), Tiles(32, 32, 4, 1), Tiles(32, 32, 4, 1))

# H100 (sm_90) plans by the head-dim width the tensor cores see (D_MAIN + D_TAIL: 80 for d80 split as
# 64 + 16), the fastest of 4-5 candidates per kernel in `benchmarks/attention.py --sweep`
# (results/attention-h100-80gb-hbm3-sweep.json). Registers bound the shapes: the forward keeps a
# BLOCK_M x width fp32 accumulator (128 x 128 x 4 B = 64 KB: 64 registers a thread at 8 warps), the
# dK/dV kernel two BLOCK_N x width ones, so width 128 runs 8 warps and 256 takes 32-key query steps.
_GPU_PLANS = {
    32: TilePlan(Tiles(128, 64, 4, 3), Tiles(32, 128, 4, 3), Tiles(64, 64, 4, 3)),
    64: TilePlan(Tiles(128, 64, 4, 3), Tiles(32, 128, 4, 3), Tiles(64, 64, 4, 3)),
    80: TilePlan(Tiles(128, 64, 4, 3), Tiles(32, 128, 4, 3), Tiles(128, 32, 8, 3)),
    128: TilePlan(Tiles(128, 64, 8, 3), Tiles(64, 128, 8, 2), Tiles(128, 32, 8, 3)),
    256: TilePlan(Tiles(128, 64, 8, 2), Tiles(64, 32, 4, 2), Tiles(128, 32, 8, 2)),
}
# Dense specs (causal or full, nothing else) at these head dims run the dense kernels: 4 warps, two stages
# (96 KB of shared memory at d128), so two CTAs share an SM. On the causal GQA d128 case (H100,
# scratch sweeps of 8-10 shapes a kernel): dQ 64 x 64 1.30 ms (128 x 128 at 8 warps 1.36, 64 x 32 1.41),
# dK/dV 64 x 64 1.87 ms (64 x 128 at 8 warps 2.19, 32 x 64 at 3 stages 2.11). d64 from the sweep of
# llava_vision_full_d64 (4 x 577 tokens, 16 heads, full; results/attention-h100-80gb-hbm3-sweep-dense.json):
# forward 85 us (128 x 64 at 4 warps 101), dK/dV 104 us (32 x 128 121), dQ 92 us (64 x 64 112).
_DENSE_HEAD_DIMS = (16, 32, 64, 128)  # powers of two (no split) whose 128-row accumulator fits 4 warps
_DENSE_PLANS = {
    64: TilePlan(Tiles(128, 128, 8, 2), Tiles(64, 64, 4, 2), Tiles(128, 128, 8, 2)),
    128: TilePlan(Tiles(128, 64, 4, 2), Tiles(64, 64, 4, 2), Tiles(64, 64, 4, 2)),
}
# Packed segments of <= 96 tokens (Qwen2.5-VL's 64-patch windows): a 128-row query tile would span two
# segments and mask half of every product. Sweep on 81 x 64 tokens, d80: 34 us forward with this plan,
# 54 us with 128-row tiles.
_SHORT_SEGMENT = 96
_SHORT_SEGMENT_PLANS = {
    32: TilePlan(Tiles(64, 64, 4, 2), Tiles(32, 64, 4, 3), Tiles(64, 32, 4, 3)),
    64: TilePlan(Tiles(64, 64, 4, 2), Tiles(32, 64, 4, 3), Tiles(64, 32, 4, 3)),
    80: TilePlan(Tiles(64, 32, 4, 3), Tiles(32, 64, 4, 3), Tiles(64, 64, 4, 3)),
    128: TilePlan(Tiles(64, 64, 4, 2), Tiles(32, 64, 4, 3), Tiles(64, 32, 4, 3)),
    256: TilePlan(Tiles(64, 64, 4, 2), Tiles(32, 64, 4, 2), Tiles(64, 32, 4, 2)),
}


def default_plan(head_dim: int, device: torch.device, spec: AttentionSpec | None = None,
                 kv_len: int = 0, dtype: torch.dtype | None = None, dense: bool = False) -> TilePlan:
    """The tiles for a call; `dense`: its forward runs the dense kernel (Route.forward_dense)."""
    if interpreted(device):
        return _INTERPRETER_PLAN
    if dtype == torch.float32:
        return _FP32_GPU_PLAN
    if dense:
        return _DENSE_PLANS[min(w for w in _DENSE_PLANS if w >= head_dim)]
    plans = _SHORT_SEGMENT_PLANS if short_segments(spec, kv_len) else _GPU_PLANS
    return plans[min(w for w in plans if w >= head_width(head_dim))]


def head_width(head_dim: int) -> int:
    """The head-dim columns the tensor cores compute on (see _head_split)."""
    split = _head_split(head_dim)
    return split["D_MAIN"] + split["D_TAIL"] if split["SPLIT"] else split["D_MAIN"]


def short_segments(spec: AttentionSpec | None, kv_len: int) -> bool:
    """Packed segments averaging <= 96 tokens, judged from shapes alone (no device sync)."""
    if spec is None or spec.cu_seqlens is None or spec.cu_seqlens.numel() < 2:
        return False
    return kv_len <= _SHORT_SEGMENT * (spec.cu_seqlens.numel() - 1)


def _block_d(head_dim: int) -> int:
    # tl.arange needs a power of two and tl.dot a K of at least 16.
    return max(16, 1 << (head_dim - 1).bit_length())


# Head dims run padded to the next power of two instead of split (benchmarks/attention.py --pad-head-dim
# measures both; see _head_split).
PADDED_HEAD_DIMS: set[int] = set()


def pad_head_dims(head_dims) -> None:
    """Run these head dims padded to the next power of two from now on, instead of split (see _head_split)."""
    PADDED_HEAD_DIMS.update(int(d) for d in head_dims)


def _head_split(head_dim: int) -> dict:
    """The head dim as a power-of-two main part plus a power-of-two tail (>= 16, masked past HEAD_DIM)
    where that is less work than padding: 80 = 64 + 16 and 72 = 64 + 16 (of 128 padded), 96 = 64 + 32."""
    return _split_head(head_dim, head_dim in PADDED_HEAD_DIMS)


@functools.cache  # three calls a forward and backward: the host time of a short vision call counts
def _split_head(head_dim: int, padded: bool) -> dict:
    main = max(16, 1 << (head_dim.bit_length() - 1))
    tail = _block_d(head_dim - main) if head_dim > main else 0
    if tail == 0 or main + tail >= _block_d(head_dim) or padded:
        return dict(D_MAIN=_block_d(head_dim), D_TAIL=16, SPLIT=False)  # D_TAIL sizes a placeholder
    return dict(D_MAIN=main, D_TAIL=tail, SPLIT=True)
