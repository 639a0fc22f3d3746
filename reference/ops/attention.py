"""The attention spec and its plain-PyTorch implementation: the twin of `optimized/kernels/attention/`.

Every attention the five families compute is one `AttentionSpec`: which (query, key) pairs attend is
described by structure (causal, window, padding, segments, spans), never by an S x S tensor, so a kernel
can derive it tile by tile. This module turns the structure into a boolean mask and calls PyTorch.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionSpec:
    """Which (query, key) pairs attend, and how scores are scaled.

    Shapes: q (B, Hq, Sq, D); k and v (B, Hkv, Sk, D) with Hq % Hkv == 0, Sq <= Sk. Query head h reads
    KV head h // (Hq // Hkv). Query i sits at key position i + Sk - Sq (bottom-right alignment, so a
    decode step with Sq=1 sees every cached key).

    A pair (i, j) attends when every present condition holds:
      - key_padding[b, j] (True = real key), for left or right padding;
      - i and j lie in the same packed segment of `cu_seqlens` (B == 1, Sq == Sk);
      - not causal, or j <= pos(i), or span_ids[b, pos(i)] == span_ids[b, j] >= 0 (bidirectional span);
      - window is None, or j > pos(i) - window (W keys including the query);
      - dense_mask[b, h, i, j], an escape hatch for masks given to us as tensors (reference only).
    A query row with no key to attend to returns 0.
    """

    scale: float | None = None  # None: 1/sqrt(D)
    causal: bool = False
    window: int | None = None
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap), after scaling
    key_padding: torch.Tensor | None = None  # (B, Sk) bool
    cu_seqlens: torch.Tensor | None = None  # (N+1,) int32, cumulative segment lengths
    span_ids: torch.Tensor | None = None  # (B, Sk) int, -1 outside any span
    dense_mask: torch.Tensor | None = None  # (B, 1 or Hq, Sq, Sk) bool

    def with_scale(self, scale: float | None) -> AttentionSpec:
        return dataclasses.replace(self, scale=scale)

    def resolved_scale(self, head_dim: int) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(head_dim)

    @property
    def is_structured(self) -> bool:
        """True when the mask is pure structure, with no dense tensor a kernel cannot read."""
        return self.dense_mask is None


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(N+1,) cumulative lengths -> (total,) segment index per position."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)


def build_mask(spec: AttentionSpec, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """The (B, 1 or H, Sq, Sk) boolean mask the spec describes; True = attend."""
    q_pos = torch.arange(q_len, device=device) + (kv_len - q_len)
    kv_pos = torch.arange(kv_len, device=device)
    allowed = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if spec.causal:
        below = kv_pos[None, :] <= q_pos[:, None]
        if spec.span_ids is not None:
            q_span = spec.span_ids[:, q_pos].to(device)
            k_span = spec.span_ids.to(device)
            same_span = (q_span[:, :, None] == k_span[:, None, :]) & (q_span[:, :, None] >= 0)
            below = below[None] | same_span
        allowed = allowed & below.reshape(-1, 1, q_len, kv_len)
    if spec.window is not None:
        allowed = allowed & (kv_pos[None, :] > q_pos[:, None] - spec.window)
    if spec.key_padding is not None:
        allowed = allowed & spec.key_padding.to(device=device, dtype=torch.bool)[:, None, None, :]
    if spec.cu_seqlens is not None:
        segment = segment_ids_from_cu_seqlens(spec.cu_seqlens.to(device), kv_len)
        allowed = allowed & (segment[q_pos][:, None] == segment[None, :])
    if spec.dense_mask is not None:
        allowed = allowed & spec.dense_mask.to(device=device, dtype=torch.bool)
    return allowed


def _scores(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * spec.resolved_scale(q.shape[-1])
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    return scores


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *, use_sdpa: bool = True
) -> torch.Tensor:
    """Attention of q (B, Hq, Sq, D) over k, v (B, Hkv, Sk, D) as `spec` says; returns (B, Hq, Sq, D).

    `use_sdpa=False` is the explicit matmul-softmax path (the contract's `supports_sdpa=False`).
    """
    batch, q_heads, q_len, _ = q.shape
    kv_len = k.shape[-2]
    if q_heads != k.shape[1]:  # GQA: head h reads KV head h // group, as transformers' repeat_kv does
        group = q_heads // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = build_mask(spec, batch, q_len, kv_len, q.device)
    if use_sdpa and spec.softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.resolved_scale(q.shape[-1]))
    else:
        # finfo.min, not -inf: a fully masked row then softmaxes to a finite uniform row (zeroed here and
        # below) instead of NaN, whose backward would put NaN into dq, dk and dv (0 * NaN = NaN).
        scores = _scores(q, k, spec).masked_fill(~mask, torch.finfo(q.dtype).min)
        # Softmax in fp32 as transformers' eager path does.
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).masked_fill(~mask, 0.0).to(q.dtype)
        out = torch.matmul(probs, v)
    # Rows with no key to attend to: 0, never NaN or a uniform average (SDPA and eager differ here).
    return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
