"""Recorded launches: a call signature's first call records its launches (`_Recorded`), and a later call
with that signature goes straight to them on its own tensors (see `_AttentionFunction`)."""

from __future__ import annotations

import torch

from optimized.kernels.attention.lowering import _placeholder, _Structure
from optimized.kernels.attention.plans import TilePlan
from optimized.kernels.attention.route import Route
from reference.ops.attention import AttentionSpec


class _Recorded:
    """The launches of one call signature (`_signature`), recorded by its first call. A vision tower
    calls attention with the same shapes in every layer and step, and each call's GPU work can be
    under 60 us: a later call skips validation, planning and the kernel-argument keys, and goes
    straight to the recorded launches (see `_AttentionFunction`)."""

    __slots__ = ("plan", "forward", "backward", "route")

    def __init__(self, plan: TilePlan, forward, route: Route):
        self.plan = plan
        self.forward = forward
        self.route = route  # the forward's; each recorded backward holds the for_backward of its grad_out key
        self.backward: dict = {}  # grad_out's (dtype, strides, alignment) -> (relaunch dq, relaunch dkdv)


_RECORDED: dict = {}
_RECORDED_MAX = 1024  # cleared past this, as launch's runners are


def _aligned16(t: torch.Tensor) -> int:
    return t.data_ptr() & 15


def _signature(q, k, v, spec: AttentionSpec, plan: TilePlan | None, fold_scale: bool):
    """Everything the launches read besides tensor addresses and contents -- dtypes, shapes, strides,
    16-byte alignment, the spec's scalars, the plan, the scale folding -- or None where a call needs more than launches:
    key padding and spans launch their own kernels, and inputs with a strided head dim or a cu_seqlens
    not int32 and contiguous on q's device are copied first."""
    cu = spec.cu_seqlens
    if spec.key_padding is not None or spec.span_ids is not None or spec.dense_mask is not None:
        return None
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    if cu is not None:
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.stride(0) != 1 or cu.device != q.device:
            return None
        cu = (cu.numel(), _aligned16(cu))
    return (q.device, q.dtype, k.dtype, v.dtype, q.shape, k.shape, v.shape, q.stride(), k.stride(),
            v.stride(), _aligned16(q), _aligned16(k), _aligned16(v), cu, spec.scale, spec.causal, spec.window,
            spec.softcap, plan, fold_scale)


def _recorded_for(signature) -> _Recorded | None:
    """The launches recorded for `signature`, if any (None: a signature of None records nothing)."""
    return None if signature is None else _RECORDED.get(signature)


def _record(signature, recorded: _Recorded) -> _Recorded:
    if signature is not None:
        if len(_RECORDED) >= _RECORDED_MAX:
            _RECORDED.clear()
        _RECORDED[signature] = recorded
    return recorded


def _structure_tensors(low: _Structure) -> tuple:
    return low.cu_seqlens, low.pad_info, low.pad_keys, low.span_ids, low.span_range


def _recorded_structure(spec: AttentionSpec, device) -> tuple:
    """_structure_tensors of a spec with a signature: only cu_seqlens can be present."""
    dummy = _placeholder(device)
    return (dummy if spec.cu_seqlens is None else spec.cu_seqlens), dummy, dummy, dummy, dummy
