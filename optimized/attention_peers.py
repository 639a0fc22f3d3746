"""Which attention calls the optimized backend hands to a peer -- PyTorch's SDPA pinned to cuDNN, then
flash -- instead of its Triton kernel: the kinds of call where the committed measurements put the kernel
behind the best peer. The rule is decided once per kind of call (device, dtype, mask, head dim, grouping)
and recorded, so `routes()` says what this process ran where.

Routed (H100, `benchmarks/results/attention-h100-80gb-hbm3-model-shapes.*`, ours / best peer, forward and
forward + backward):
  - unmasked full attention, head dim 64 (CLIP, Llava's vision tower): 0.39 / 0.41;
  - unmasked full attention, head dim 72 (SigLIP, Gemma3's vision tower): 0.51 / 0.42 (padding to 128
    measured worse, 0.30);
  - causal attention without padding, head dim 128, one KV head per query head (Llava's Llama text):
    0.79 / 0.79.
Everything with structure (padding, segments, windows, spans, softcap), grouped-query heads and other
head dims stays on the kernel: there it is ahead (Gemma3's sliding window 1.45 / 1.63) or SDPA would need
a dense mask. SDPA's causal mask is top-left aligned, the spec's bottom-right: only Sq == Sk is routed.
The peers need a CUDA device and 16-bit inputs; on the CPU (the interpreter's tests) nothing is routed.
"""

from __future__ import annotations

import dataclasses
import threading

import torch
import torch.nn.functional as F

from reference.ops.attention import AttentionSpec

PEER = "sdpa (cuDNN, then flash)"


@dataclasses.dataclass(frozen=True)
class CallKind:
    """What the routing rule reads of one attention call."""

    device: str  # "cuda" or "cpu"
    dtype: torch.dtype
    mask: str  # "full", "causal" (Sq == Sk, nothing else) or "structured"
    head_dim: int
    grouped: bool  # fewer KV heads than query heads


# (mask, head dim) -> why the peer serves it (ungrouped heads, 16-bit, CUDA).
ROUTED = {
    ("full", 64): "CLIP-like: the kernel measured 0.39x / 0.41x of SDPA",
    ("full", 72): "SigLIP-like: the kernel measured 0.51x / 0.42x of SDPA cuDNN",
    ("causal", 128): "Llama-like text: the kernel measured 0.79x / 0.79x of SDPA cuDNN",
}
_PEER_DTYPES = (torch.float16, torch.bfloat16)
_decided: dict[CallKind, str | None] = {}
_lock = threading.Lock()


def kind_of(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> CallKind:
    plain = spec.softcap is None and spec.window is None and spec.key_padding is None and \
        spec.cu_seqlens is None and spec.span_ids is None and spec.dense_mask is None
    if not plain:
        mask = "structured"
    elif not spec.causal:
        mask = "full"
    else:
        mask = "causal" if q.shape[-2] == k.shape[-2] else "structured"
    return CallKind(q.device.type, q.dtype, mask, q.shape[-1], k.shape[1] != q.shape[1])


def peer_for(kind: CallKind) -> str | None:
    """The reason the peer serves `kind`, or None for the kernel; decided once per kind, then recorded."""
    if kind not in _decided:
        eligible = kind.device == "cuda" and kind.dtype in _PEER_DTYPES and not kind.grouped
        with _lock:
            _decided[kind] = ROUTED.get((kind.mask, kind.head_dim)) if eligible else None
    return _decided[kind]


def routes() -> dict[CallKind, str | None]:
    """Every kind of call this process decided, and where it went (None: the Triton kernel)."""
    return dict(_decided)


def peer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """The call through SDPA, pinned to cuDNN then flash on a GPU (PyTorch picks on the CPU)."""
    scale = spec.resolved_scale(q.shape[-1])
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, is_causal=spec.causal, scale=scale)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=spec.causal, scale=scale)
