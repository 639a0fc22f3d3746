"""Launchers: each kernel's grid and arguments for a call, launched through `optimized.kernels.launch` (no
Triton dispatch after a shape's first call), each returning a relaunch the recorded launches repeat on new
tensors. Which kernel -- dense or general -- is the call's Route (see `route`), never decided here."""

from __future__ import annotations

import functools

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from optimized.kernels.attention.backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
from optimized.kernels.attention.backward_dense import _attn_bwd_dkdv_dense_kernel, _attn_bwd_dq_dense_kernel
from optimized.kernels.attention.forward import _attn_fwd_kernel
from optimized.kernels.attention.forward_dense import _attn_fwd_dense_kernel
from optimized.kernels.attention.lowering import _args, _dot_precision, _strides, _Structure
from optimized.kernels.attention.masks import LOG2E
from optimized.kernels.attention.plans import Tiles
from optimized.kernels.attention.route import Route
from optimized.kernels.launch import cdiv
from optimized.kernels.launch import launch_bound as _launch_bound
from reference.ops.attention import AttentionSpec


def kernels() -> tuple:
    """The six jitted kernels a call can launch, general and dense: forward, dK/dV, dQ (for listing what
    Triton compiled of each, as benchmarks/attention.py does)."""
    return (_attn_fwd_kernel, _attn_fwd_dense_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dkdv_dense_kernel,
            _attn_bwd_dq_kernel, _attn_bwd_dq_dense_kernel)


def _forward_outputs(q):
    out = torch.empty_like(q)  # q's layout: a (B, S, H, D) view in gives a (B, S, H, D) buffer out
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    return out, lse


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _by_head(spec: AttentionSpec, programs: int, device: torch.device) -> bool:
    """_tile_order's BY_HEAD: unless a causal mask without window makes the tiles unequal and the grid is
    under 8 waves of one program per SM, where the longest tiles must all start first."""
    if not spec.causal or spec.window is not None or device.type != "cuda":
        return True
    return programs >= 8 * _multiprocessors(device)


def _tma_heads(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A (B, H, S, D) tensor as TMA tiles of `rows` positions of one head."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


def _launch_dense_forward(q, k, v, spec, tiles: Tiles):
    """_launch_forward for a dense spec (Route.forward_dense)."""
    batch, q_heads, q_len, head_dim = q.shape
    out, lse = _forward_outputs(q)

    def descriptors(q, k, v):
        return _tma_heads(q, tiles.block_m), _tma_heads(k, tiles.block_n), _tma_heads(v, tiles.block_n)

    programs = batch * q_heads * cdiv(q_len, tiles.block_m)
    relaunch = _launch_bound(
        _attn_fwd_dense_kernel, (programs,), *descriptors(q, k, v), out, lse, *_strides(out), q_heads, q_len,
        k.shape[2], qk_scale=spec.resolved_scale(head_dim) * LOG2E, GROUP=q_heads // k.shape[1],
        HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, CAUSAL=spec.causal,
        DOT_PRECISION=_dot_precision(q),
        BY_HEAD=_by_head(spec, programs, q.device), num_warps=tiles.num_warps, num_stages=tiles.num_stages)

    def relaunch_dense(q, k, v, out, lse, *structure):
        relaunch(*descriptors(q, k, v), out, lse)

    return out, lse, relaunch_dense


def _launch_forward(q, k, v, spec, low: _Structure, tiles: Tiles, route: Route):
    """(out, lse, relaunch); relaunch(q, k, v, out, lse, *structure) repeats it on new tensors."""
    if route.forward_dense:
        return _launch_dense_forward(q, k, v, spec, tiles)
    batch, q_heads, q_len, _ = q.shape
    out, lse = _forward_outputs(q)
    structure, scalars, meta = _args(q, k, spec, low, tiles)
    programs = batch * q_heads * cdiv(q_len, tiles.block_m)
    relaunch = _launch_bound(
        _attn_fwd_kernel, (programs,), q, k, v, out, lse, *structure, *_strides(q), *_strides(k),
        *_strides(v), *_strides(out), q_heads, q_len, k.shape[2], **scalars, **meta,
        FOLD_SCALE=route.fold_scale, BY_HEAD=_by_head(spec, programs, q.device))
    return out, lse, relaunch


def _launch_dense_dkdv(q, k, v, grad_out, lse, delta, spec, tiles: Tiles):
    """_launch_dkdv for a dense spec (Route.dkdv_dense)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    dk, dv = torch.empty_like(k), torch.empty_like(v)

    def descriptors(q, k, v, grad_out):
        return (_tma_heads(q, tiles.block_m), _tma_heads(k, tiles.block_n), _tma_heads(v, tiles.block_n),
                _tma_heads(grad_out, tiles.block_m))

    scale = spec.resolved_scale(head_dim)
    relaunch = _launch_bound(
        _attn_bwd_dkdv_dense_kernel, (batch * kv_heads, cdiv(kv_len, tiles.block_n)),
        *descriptors(q, k, v, grad_out), lse, delta, dk, dv, *_strides(dk), *_strides(dv), q_heads, kv_heads,
        q_len, kv_len, qk_scale=scale * LOG2E, sm_scale=scale, GROUP=q_heads // kv_heads, HEAD_DIM=head_dim,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, CAUSAL=spec.causal,
        DOT_PRECISION=_dot_precision(q), num_warps=tiles.num_warps,
        num_stages=tiles.num_stages)

    def relaunch_dense(q, k, v, grad_out, lse, delta, dk, dv, *structure):
        relaunch(*descriptors(q, k, v, grad_out), lse, delta, dk, dv)

    return dk, dv, relaunch_dense


def _launch_dkdv(q, k, v, grad_out, lse, delta, spec, low: _Structure, tiles: Tiles, route: Route):
    """(dk, dv, relaunch); relaunch(q, k, v, grad_out, lse, delta, dk, dv, *structure)."""
    if route.dkdv_dense:
        return _launch_dense_dkdv(q, k, v, grad_out, lse, delta, spec, tiles)
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    structure, scalars, meta = _args(q, k, spec, low, tiles)
    grid = (batch * kv_heads, cdiv(kv_len, tiles.block_n))
    relaunch = _launch_bound(
        _attn_bwd_dkdv_kernel, grid,
        q, k, v, grad_out, lse, delta, dk, dv, *structure, *_strides(q), *_strides(k), *_strides(v),
        *_strides(grad_out), *_strides(dk), *_strides(dv), q_heads, kv_heads, q_len, kv_len,
        sm_scale=spec.resolved_scale(q.shape[-1]), **scalars, **meta)
    return dk, dv, relaunch


def _launch_dense_dq(q, k, v, out, grad_out, lse, spec, tiles: Tiles):
    """_launch_dq for a dense spec (Route.dq_dense)."""
    batch, q_heads, q_len, head_dim = q.shape
    dq, delta = torch.empty_like(q), torch.empty_like(lse)

    def descriptors(q, k, v, out, grad_out):
        rows, keys = tiles.block_m, tiles.block_n
        return (_tma_heads(q, rows), _tma_heads(k, keys), _tma_heads(v, keys), _tma_heads(out, rows),
                _tma_heads(grad_out, rows))

    scale = spec.resolved_scale(head_dim)
    programs = batch * q_heads * cdiv(q_len, tiles.block_m)
    relaunch = _launch_bound(
        _attn_bwd_dq_dense_kernel, (programs,), *descriptors(q, k, v, out, grad_out), lse, delta, dq,
        *_strides(dq), q_heads, q_len, k.shape[2], qk_scale=scale * LOG2E, sm_scale=scale,
        GROUP=q_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        CAUSAL=spec.causal, DOT_PRECISION=_dot_precision(q),
        BY_HEAD=_by_head(spec, programs, q.device), num_warps=tiles.num_warps, num_stages=tiles.num_stages)

    def relaunch_dense(q, k, v, out, grad_out, lse, delta, dq, *structure):
        relaunch(*descriptors(q, k, v, out, grad_out), lse, delta, dq)

    return dq, delta, relaunch_dense


def _launch_dq(q, k, v, out, grad_out, lse, spec, low: _Structure, tiles: Tiles, route: Route):
    """(dq, delta, relaunch): delta feeds the dK/dV kernel, which must run after this one.
    relaunch(q, k, v, out, grad_out, lse, delta, dq, *structure)."""
    if route.dq_dense:
        return _launch_dense_dq(q, k, v, out, grad_out, lse, spec, tiles)
    batch, q_heads, q_len, _ = q.shape
    dq = torch.empty_like(q)
    delta = torch.empty_like(lse)
    structure, scalars, meta = _args(q, k, spec, low, tiles)
    programs = batch * q_heads * cdiv(q_len, tiles.block_m)
    relaunch = _launch_bound(
        _attn_bwd_dq_kernel, (programs,),
        q, k, v, out, grad_out, lse, delta, dq, *structure, *_strides(q), *_strides(k), *_strides(v),
        *_strides(out), *_strides(grad_out), *_strides(dq), q_heads, q_len, k.shape[2],
        sm_scale=spec.resolved_scale(q.shape[-1]), **scalars, **meta, BY_HEAD=_by_head(spec, programs, q.device))
    return dq, delta, relaunch
