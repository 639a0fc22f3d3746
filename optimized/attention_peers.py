"""Which attention calls the optimized backend hands to a peer -- PyTorch's SDPA -- instead of its Triton
kernel: the kinds of call where the committed measurements put the kernel
behind the best peer. The rule is decided once per kind of call (device, dtype, mask, head dim, grouping)
and recorded, so `routes()` says what this process ran where.

Routed (H100, `benchmarks/results/attention-h100-80gb-hbm3-model-shapes.*`, ours / best peer, forward and
forward + backward):
  - unmasked full attention, head dim 64 (CLIP, Llava's vision tower): 0.39 / 0.41;
  - unmasked full attention, head dim 72 (SigLIP, Gemma3's vision tower): 0.51 / 0.42 (padding to 128
    measured worse, 0.30);
  - causal attention without padding, head dim 128, one KV head per query head (Llava's Llama text):
    0.79 / 0.79;
  - the same with grouped-query heads (Qwen2-VL, Qwen2.5-VL, Pixtral and Mistral 3 text; the headline
    `text_causal_gqa_d128`, 28 query heads on 4 KV heads): 0.91 / 0.83 of cuDNN. SDPA takes the groups
    itself (`enable_gqa`), without repeating K/V.
On the H200 (`benchmarks/results/attention-h200-routed.*`) the four routed kinds read 0.96-1.02 of the best
peer through the backend's op; `attention-h200-routed-check.*` shows why: the op launches exactly the kernels
SDPA's own choice launches, forward and backward, and the reading is the spread among timings of one kernel
(up to 2.8% even replayed from CUDA graphs) plus the route's ~3 us of host time on a host-bound call (CLIP).
Everything with structure (padding, segments, windows, spans, softcap) and other head dims stays on the
kernel: there it is ahead (Gemma3's sliding window 1.45 / 1.63) or SDPA would need a dense mask. SDPA's
causal mask is top-left aligned, the spec's bottom-right: only Sq == Sk is routed. The peers need a CUDA
device and 16-bit inputs; on the CPU (the interpreter's tests) nothing is routed.

The peer is SDPA with PyTorch's own choice of backend, as transformers calls it: in the table above that
choice was at least as fast as cuDNN pinned in all eight routed rows (341.1 vs 341.2 TFLOP/s forward at
d72, within noise; 181 vs 137 at d64, where entering `sdpa_kernel` per call is a visible share of a 577-token
call).
"""

from __future__ import annotations

import threading
import typing

import torch
import torch.nn.functional as F

from reference.ops.attention import AttentionSpec

PEER = "sdpa (PyTorch's choice of backend)"


class CallKind(typing.NamedTuple):
    """What the routing rule reads of one attention call. A tuple, not a frozen dataclass: it is built and
    hashed on every attention call, and the whole rule then costs 1.6 us instead of 1.8 (a 2-core CI
    host); on the H200's host the route added 1.3 us to a 42 us SDPA call (2026-12-03)."""

    device: str  # "cuda" or "cpu"
    dtype: torch.dtype
    mask: str  # "full", "causal" (Sq == Sk, nothing else) or "structured"
    head_dim: int
    grouped: bool  # fewer KV heads than query heads


# (mask, head dim, grouped) -> why the peer serves it (16-bit, CUDA).
ROUTED = {
    ("full", 64, False): "CLIP-like: the kernel measured 0.39x / 0.41x of SDPA",
    ("full", 72, False): "SigLIP-like: the kernel measured 0.51x / 0.42x of SDPA cuDNN",
    ("causal", 128, False): "Llama-like text: the kernel measured 0.79x / 0.79x of SDPA cuDNN",
    ("causal", 128, True): "grouped-query text: the kernel measured 0.91x / 0.83x of SDPA cuDNN",
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
        eligible = kind.device == "cuda" and kind.dtype in _PEER_DTYPES
        with _lock:
            _decided[kind] = ROUTED.get((kind.mask, kind.head_dim, kind.grouped)) if eligible else None
    return _decided[kind]


def routes() -> dict[CallKind, str | None]:
    """Every kind of call this process decided, and where it went (None: the Triton kernel)."""
    return dict(_decided)


def peer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """The call through SDPA, grouped-query heads passed as such (`enable_gqa`)."""
    scale = spec.resolved_scale(q.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, is_causal=spec.causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])
