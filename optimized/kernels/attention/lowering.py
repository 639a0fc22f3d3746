"""The spec lowered to what the kernels read (`_lower`), the inputs' checks (`_validate`) and the scalars and
compile-time flags every kernel takes (`_args`)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from optimized.kernels.attention.masks import LOG2E, _padding_info_kernel, _span_range_kernel
from optimized.kernels.attention.plans import Tiles, _head_split
from optimized.kernels.launch import cdiv
from optimized.kernels.launch import launch as _launch
from reference.ops.attention import AttentionSpec


class _Structure(NamedTuple):
    """The spec lowered to what the kernels read: small tensors, at most one launch per feature (padding,
    spans), built once per forward and reused by the backward."""

    cu_seqlens: torch.Tensor  # (N+1,) int32 segment boundaries, searched in-kernel
    pad_info: torch.Tensor  # (B, 3) int32: first real key, last real key + 1, has holes
    pad_keys: torch.Tensor  # (B, Sk) uint8 key_padding, read per key tile where a tile is masked
    span_ids: torch.Tensor  # (B, Sk) integer ids, -1 outside spans
    span_range: torch.Tensor  # (B, 2, Sk) int32: first and last + 1 position of each position's span
    scalars: dict  # window, segment count and binary-search steps
    flags: dict  # the kernels' CAUSAL / HAS_* constexprs


_PLACEHOLDERS: dict = {}


def _placeholder(device) -> torch.Tensor:
    """A tensor for pointer arguments whose feature is off (never read); cached: no launch per call."""
    key = str(device)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _PLACEHOLDERS[key]


def _padding_bounds(key_padding: torch.Tensor, batch: int, kv_len: int, device):
    if tuple(key_padding.shape) != (batch, kv_len):
        raise ValueError(f"key_padding must be (B, Sk) = {(batch, kv_len)}, got {tuple(key_padding.shape)}")
    real = key_padding.to(device=device)
    real = (real if real.dtype == torch.bool else real != 0).contiguous().view(torch.uint8)  # no copy
    info = torch.empty(batch, 3, dtype=torch.int32, device=device)
    _launch(_padding_info_kernel, (batch,), real, info, kv_len, BLOCK=1024)
    return info, real


def _span_bounds(span_ids: torch.Tensor, batch: int, kv_len: int, device):
    if tuple(span_ids.shape) != (batch, kv_len):
        raise ValueError(f"span_ids must be (B, Sk) = {(batch, kv_len)}, got {tuple(span_ids.shape)}")
    ids = span_ids.to(device=device).contiguous()
    ranges = torch.empty(batch, 2, kv_len, dtype=torch.int32, device=device)
    _launch(_span_range_kernel, (batch, cdiv(kv_len, 64)), ids, ranges, kv_len, BLOCK_P=64, BLOCK_K=64)
    return ids, ranges


def _lower(spec: AttentionSpec, batch: int, kv_len: int, device) -> _Structure:
    dummy = _placeholder(device)
    cu_seqlens, pad_info, pad_keys, span_ids, span_range = dummy, dummy, dummy, dummy, dummy
    n_seg = 0
    if spec.cu_seqlens is not None:
        cu_seqlens = spec.cu_seqlens.to(device=device, dtype=torch.int32).contiguous()  # no-op from HF
        n_seg = cu_seqlens.numel() - 1
    if spec.key_padding is not None:
        pad_info, pad_keys = _padding_bounds(spec.key_padding, batch, kv_len, device)
    has_spans = spec.causal and spec.span_ids is not None  # without causality a span adds nothing
    if has_spans:
        span_ids, span_range = _span_bounds(spec.span_ids, batch, kv_len, device)
    # Any |W| >= Sk means the same as Sk (every key in, or none): clamping keeps pos - W + 1 in int32.
    window = 0 if spec.window is None else max(-kv_len, min(int(spec.window), kv_len))
    scalars = dict(window=window, n_seg=n_seg, seg_steps=max(1, n_seg).bit_length() + 1)
    flags = dict(CAUSAL=spec.causal, HAS_WINDOW=spec.window is not None,
                 HAS_SEGMENTS=spec.cu_seqlens is not None, HAS_PADDING=spec.key_padding is not None,
                 HAS_SPANS=has_spans, HAS_SOFTCAP=spec.softcap is not None)
    return _Structure(cu_seqlens, pad_info, pad_keys, span_ids, span_range, scalars, flags)


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> None:
    if spec.dense_mask is not None:
        raise ValueError("the Triton attention kernel does not take spec.dense_mask (an S x S tensor); "
                         "describe the mask by structure (causal, window, key_padding, cu_seqlens, "
                         "span_ids) or use reference.ops.attention")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be (B, Hq, Sq, D) and k, v (B, Hkv, Sk, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    (batch, q_heads, q_len, head_dim), (_, kv_heads, kv_len, _) = q.shape, k.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or kv_heads == 0 or q_heads % kv_heads or q_len > kv_len:
        raise ValueError(f"need equal B and D, Hq % Hkv == 0 and Sq <= Sk; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one of float16, bfloat16, float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if head_dim > 256:
        raise ValueError(f"head dim {head_dim} > 256: the accumulators would not fit in registers")
    if spec.softcap is not None and spec.softcap <= 0:
        raise ValueError(f"softcap must be positive, got {spec.softcap}")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # Any batch/head/token strides are fine (transformers passes transposed views); the head dim must
    # be contiguous for 16-byte vector loads, so only then is a copy made.
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)


def _dot_precision(q: torch.Tensor) -> str:
    """fp32 inputs (the interpreter tests) get exact fp32 products, not TF32's 10-bit mantissa."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _args(q, k, spec: AttentionSpec, low: _Structure, tiles: Tiles):
    """Scalars and compile-time flags every attention kernel takes."""
    head_dim = q.shape[-1]
    scale = spec.resolved_scale(head_dim)
    cap = spec.softcap if spec.softcap is not None else 1.0
    scalars = dict(**low.scalars, qk_scale=scale * LOG2E, cap_in=2.0 * scale / cap * LOG2E,
                   cap_out=cap * LOG2E)
    meta = dict(GROUP=q.shape[1] // k.shape[1], HEAD_DIM=head_dim, **_head_split(head_dim),
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
                num_stages=tiles.num_stages, DOT_PRECISION=_dot_precision(q), **low.flags)
    return (low.cu_seqlens, low.pad_info, low.pad_keys, low.span_ids, low.span_range), scalars, meta
