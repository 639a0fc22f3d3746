"""The autograd Function and the public entries: `attention` (the twin of `reference.ops.attention.attention`),
`attention_with_plan` (a given tile plan, for benchmarks and tests), `attention_forward` (no autograd) and
`kernel_thunk` (one kernel alone, for tile sweeps)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from optimized.kernels.attention.launchers import _forward_outputs, _launch_dkdv, _launch_dq, _launch_forward
from optimized.kernels.attention.lowering import _lower, _unit_last_stride, _validate
from optimized.kernels.attention.plans import TilePlan, Tiles, default_plan
from optimized.kernels.attention.recorded import (
    _aligned16,
    _record,
    _Recorded,
    _recorded_for,
    _recorded_structure,
    _signature,
    _structure_tensors,
)
from optimized.kernels.attention.route import _dense_readable, route
from reference.ops.attention import AttentionSpec


def _prepare(q, k, v, spec: AttentionSpec, plan: TilePlan | None, fold_scale: bool = True):
    """(q, k, v as the kernels read them, plan, lowered structure, the forward's Route)."""
    _validate(q, k, v, spec)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    call_route = route(q, k, v, spec, fold_scale)
    plan = plan or default_plan(q.shape[-1], q.device, spec, k.shape[2], q.dtype, call_route.forward_dense)
    return q, k, v, plan, _lower(spec, q.shape[0], k.shape[2], q.device), call_route


def attention_forward(q, k, v, spec: AttentionSpec, plan: TilePlan | None = None):
    """(out (B, Hq, Sq, D), lse (B, Hq, Sq) float32, natural log, -inf on rows with no key). No autograd."""
    q, k, v, plan, low, call_route = _prepare(q, k, v, spec, plan)
    return _launch_forward(q, k, v, spec, low, plan.fwd, call_route)[:2]


def kernel_thunk(q, k, v, grad_out, spec: AttentionSpec, which: str, tiles: Tiles) -> Callable[[], object]:
    """A thunk launching one kernel alone -- "fwd", "dq" or "dkdv" -- with `tiles`, on the call's lowered
    structure and the lse and delta of one forward and dQ on the default plan: what a tile sweep times."""
    q, k, v, plan, low, call_route = _prepare(q.detach(), k.detach(), v.detach(), spec, None)
    out, lse, _ = _launch_forward(q, k, v, spec, low, plan.fwd, call_route)
    call_route = call_route.for_backward(grad_out, out)
    _, delta, _ = _launch_dq(q, k, v, out, grad_out, lse, spec, low, plan.dq, call_route)
    if which == "fwd":
        return lambda: _launch_forward(q, k, v, spec, low, tiles, call_route)
    if which == "dkdv":
        return lambda: _launch_dkdv(q, k, v, grad_out, lse, delta, spec, low, tiles, call_route)
    return lambda: _launch_dq(q, k, v, out, grad_out, lse, spec, low, tiles, call_route)


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: AttentionSpec, plan: TilePlan | None, fold_scale: bool):
        signature = _signature(q, k, v, spec, plan, fold_scale)
        recorded = _recorded_for(signature)
        low = None
        if recorded is None:
            q, k, v, plan, low, call_route = _prepare(q, k, v, spec, plan, fold_scale)
            out, lse, relaunch = _launch_forward(q, k, v, spec, low, plan.fwd, call_route)
            recorded = _record(signature, _Recorded(plan, relaunch, call_route))
            structure = _structure_tensors(low)
        else:
            structure = _recorded_structure(spec, q.device)
            out, lse = _forward_outputs(q)
            recorded.forward(q, k, v, out, lse, *structure)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.low, ctx.recorded, ctx.structure = spec, low, recorded, structure
        ctx.route = recorded.route
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = _dense_readable(grad_out) if ctx.route.forward_dense else _unit_last_stride(grad_out)
        key = (grad_out.dtype, grad_out.stride(), _aligned16(grad_out))
        relaunches = ctx.recorded.backward.get(key)
        if relaunches is None:
            # The backward's route, decided once; the relaunches recorded under this key keep it (the key
            # fixes all TMA reads of grad_out, and the signature those of out).
            backward_route = ctx.route.for_backward(grad_out, out)
            low = ctx.low if ctx.low is not None else _lower(ctx.spec, q.shape[0], k.shape[2], q.device)
            plan = ctx.recorded.plan
            dq, delta, relaunch_dq = _launch_dq(q, k, v, out, grad_out, lse, ctx.spec, low, plan.dq, backward_route)
            dk, dv, relaunch_dkdv = _launch_dkdv(q, k, v, grad_out, lse, delta, ctx.spec, low, plan.dkdv,
                                                 backward_route)
            ctx.recorded.backward[key] = relaunch_dq, relaunch_dkdv
        else:
            dq, delta = torch.empty_like(q), torch.empty_like(lse)
            relaunches[0](q, k, v, out, grad_out, lse, delta, dq, *ctx.structure)
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            relaunches[1](q, k, v, grad_out, lse, delta, dk, dv, *ctx.structure)
        return dq, dk, dv, None, None, None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *, use_sdpa: bool = True
) -> torch.Tensor:
    """Attention of q (B, Hq, Sq, D) over k, v (B, Hkv, Sk, D) as `spec` says; returns (B, Hq, Sq, D).

    The kernel twin of `reference.ops.attention.attention`, differentiable in q, k, v. `use_sdpa` is
    accepted for signature parity and ignored: there is one path. The output has q's memory layout.
    `spec.dense_mask` is not supported (ValueError): the kernel reads structure, not S x S tensors.
    """
    del use_sdpa
    return _AttentionFunction.apply(q, k, v, spec, None, True)


def attention_with_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                        plan: TilePlan | None = None, *, fold_scale: bool = True) -> torch.Tensor:
    """`attention` on the given tile plan (None: default_plan's). fold_scale=False keeps the scale out of
    the forward's exp2 (FOLD_SCALE off, so the general kernel): benchmarks/attention_gpu_time.py times both."""
    return _AttentionFunction.apply(q, k, v, spec, plan, fold_scale)
