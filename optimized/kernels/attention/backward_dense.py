"""Backward of a dense spec (causal or full, nothing else): the dQ and dK/dV kernels reading q, k, v, O and
dO through TMA descriptors, as the dense forward does.
"""

from __future__ import annotations

import triton
import triton.language as tl

from optimized.kernels.attention.backward import _load_lse2
from optimized.kernels.attention.forward_dense import _dense_key_range, _dense_mask
from optimized.kernels.attention.masks import _store_tile, _tile_order


@triton.jit
def _dense_dq_tiles(dq, q, do, lse2, delta, desc_k, desc_v, b, kvh, start, end, first_pos, Sk, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """_attn_bwd_q_tiles with K/V tiles fetched by TMA; MASKED tiles as in _dense_fwd_tiles."""
    pos = first_pos + tl.arange(0, BLOCK_M)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_v.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        s = tl.dot(q, k.T, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = _dense_mask(s, start_n, pos, Sk, CAUSAL, BLOCK_N)
        p = tl.math.exp2(s - lse2[:, None])
        ds = p * (tl.dot(do, v.T, input_precision=DOT_PRECISION) - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_dense_kernel(
    desc_q, desc_k, desc_v, desc_o, desc_do, Lse, Delta, dQ, stride_dqb, stride_dqh, stride_dqm, Hq, Sq, Sk,
    qk_scale, sm_scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BY_HEAD: tl.constexpr,
):
    """_attn_bwd_dq_kernel for a dense spec, its tiles read by TMA: 1.30-1.34 against 1.36-1.39 ms on the
    causal GQA d128 case (H100, same box each; 64 x 64 tiles at 4 warps both)."""
    pid_bh, pid_m = _tile_order(Sq, BLOCK_M, BY_HEAD)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Sq
    q = desc_q.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_DIM)
    do = desc_do.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_DIM)
    o = desc_o.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Sq + offs_m, delta, mask=row_ok)
    lse2 = _load_lse2(Lse + pid_bh.to(tl.int64) * Sq, offs_m, row_ok)
    first = m0 + Sk - Sq
    full_end, end = _dense_key_range(first, Sk, CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dense_dq_tiles(dq, q, do, lse2, delta, desc_k, desc_v, b, kvh, 0, full_end, first, Sk, qk_scale,
                         False, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION)
    dq = _dense_dq_tiles(dq, q, do, lse2, delta, desc_k, desc_v, b, kvh, full_end, end, first, Sk, qk_scale,
                         True, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION)
    _store_tile(dQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh, offs_m, stride_dqm, dq * sm_scale,
                Sq, HEAD_DIM)


@triton.jit
def _dense_dkdv_step(dk, dv, k, v, desc_q, desc_do, lse_ptr, delta_ptr, b, h, start_m, offs_n, Sq, Sk, qk_scale,
                     MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """dK, dV of one key tile from query tile start_m of head h. MASKED applies the causal mask; queries
    past Sq read zeros and their lse of -inf gives them p = 0."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Sq
    q = desc_q.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    do = desc_do.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    lse2 = _load_lse2(lse_ptr, offs_m, row_ok)
    sT = tl.dot(k, q.T, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:  # query i at key position i + Sk - Sq sees key j <= that
        sT = tl.where(offs_n[:, None] <= (offs_m + (Sk - Sq))[None, :], sT, float("-inf"))
    pT = tl.math.exp2(sT - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
    dsT = pT * (tl.dot(v, do.T, input_precision=DOT_PRECISION) - delta[None, :])
    return tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION), dv


@triton.jit
def _dense_dkdv_diagonal(dk, dv, k, v, desc_q, desc_do, Lse, Delta, b, kvh, Hq, offs_n, start, end, Sq, Sk,
                         qk_scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """The masked query tiles [start, end) of a causal key tile, head by head."""
    for g in range(GROUP):
        h = kvh * GROUP + g
        row_base = (b * Hq + h).to(tl.int64) * Sq
        for start_m in range(start, end, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk, dv = _dense_dkdv_step(dk, dv, k, v, desc_q, desc_do, Lse + row_base, Delta + row_base, b, h,
                                      start_m, offs_n, Sq, Sk, qk_scale, True, HEAD_DIM, BLOCK_M, DOT_PRECISION)
    return dk, dv


@triton.jit
def _dense_dkdv_full(dk, dv, k, v, desc_q, desc_do, Lse, Delta, b, kvh, Hq, offs_n, start, Sq, Sk, qk_scale,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """The query tiles from `start` on, which see every key of the tile, of every head of the GQA group in
    one loop: the software pipeline then runs across heads instead of draining at each head's end, which
    short loops (a causal key tile near the sequence's end: one step a head) feel most."""
    steps = tl.cdiv(Sq - start, BLOCK_M)
    for step in range(0, GROUP * steps):
        g = step // steps
        h = kvh * GROUP + g
        row_base = (b * Hq + h).to(tl.int64) * Sq
        dk, dv = _dense_dkdv_step(dk, dv, k, v, desc_q, desc_do, Lse + row_base, Delta + row_base, b, h,
                                  start + (step - g * steps) * BLOCK_M, offs_n, Sq, Sk, qk_scale, False, HEAD_DIM,
                                  BLOCK_M, DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_dense_kernel(
    desc_q, desc_k, desc_v, desc_do, Lse, Delta, dK, dV, stride_dkb, stride_dkh, stride_dkn, stride_dvb,
    stride_dvh, stride_dvn, Hq, Hkv, Sq, Sk, qk_scale, sm_scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """_attn_bwd_dkdv_kernel for a dense spec, its tiles read by TMA: K and V stay in shared memory as
    wgmma operands instead of registers, so a 64-key tile at 4 warps (two CTAs an SM) spills 14 registers
    where the general kernel's 128-key one at 8 warps spills 52. 1.87-2.01 against 2.24-2.30 ms on the
    causal GQA d128 case (H100, same box each); without the head-major loop of _dense_dkdv_full, 1.97
    where it ran 1.87."""
    pid_bkv = tl.program_id(0)  # key tiles in the general kernel's order: tile 0, the heaviest, first
    b = pid_bkv // Hkv
    kvh = pid_bkv % Hkv
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = desc_k.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_DIM)  # keys past Sk read 0; their rows are not stored
    v = desc_v.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_DIM)
    start = 0
    full_start = 0  # queries from here on see every key of the tile
    if CAUSAL:
        start = tl.maximum(n0 - (Sk - Sq), 0) // BLOCK_M * BLOCK_M
        full_start = tl.minimum(tl.maximum(tl.cdiv(n0 + BLOCK_N - 1 - (Sk - Sq), BLOCK_M) * BLOCK_M, start), Sq)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk, dv = _dense_dkdv_diagonal(dk, dv, k, v, desc_q, desc_do, Lse, Delta, b, kvh, Hq, offs_n, start,
                                  full_start, Sq, Sk, qk_scale, GROUP, HEAD_DIM, BLOCK_M, DOT_PRECISION)
    dk, dv = _dense_dkdv_full(dk, dv, k, v, desc_q, desc_do, Lse, Delta, b, kvh, Hq, offs_n, full_start, Sq, Sk,
                              qk_scale, GROUP, HEAD_DIM, BLOCK_M, DOT_PRECISION)
    b64 = b.to(tl.int64)
    _store_tile(dK + b64 * stride_dkb + kvh.to(tl.int64) * stride_dkh, offs_n, stride_dkn, dk * sm_scale, Sk,
                HEAD_DIM)
    _store_tile(dV + b64 * stride_dvb + kvh.to(tl.int64) * stride_dvh, offs_n, stride_dvn, dv, Sk, HEAD_DIM)
