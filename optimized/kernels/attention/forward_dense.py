"""Forward of a dense spec: causal or full, nothing else (a text model's packed or unpadded batch). Tiles
arrive through TMA descriptors; the only mask is the causal diagonal and the sequence end.
"""

from __future__ import annotations

import triton
import triton.language as tl

from optimized.kernels.attention.forward import _softmax_step
from optimized.kernels.attention.masks import _LN2, _store_tile, _tile_order


@triton.jit
def _dense_mask(scores, start_n, pos, Sk, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """-inf where key start_n + j is past Sk (TMA read zeros there) or, causally, after row i's position."""
    keys = start_n + tl.arange(0, BLOCK_N)
    ok = keys[None, :] < Sk
    if CAUSAL:
        ok = ok & (keys[None, :] <= pos[:, None])
    return tl.where(ok, scores, float("-inf"))


@triton.jit
def _dense_fwd_tiles(acc, l_i, m_i, q, desc_k, desc_v, b, kvh, start, end, first_pos, Sk, qk_scale,
                     MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """_attn_fwd_tiles with K/V tiles fetched by TMA and the scale folded; MASKED tiles are the causal
    diagonal and the key tail past Sk (which TMA fills with zeros). The rows' positions are derived here
    from the tile's first one, so no per-row vector stays live across the unmasked loop."""
    pos = first_pos + tl.arange(0, BLOCK_M)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_v.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, k.T, input_precision=DOT_PRECISION)
        if MASKED:
            qk = _dense_mask(qk, start_n, pos, Sk, CAUSAL, BLOCK_N)
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, qk_scale, MASKED, True)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _dense_key_range(first, Sk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_end, end) for the query tile whose first row sits at key position `first`: key tiles below
    full_end are attended by every row (no mask), those in [full_end, end) need the causal / tail mask."""
    if CAUSAL:  # keys below first + 1 are seen by every row
        full_end = tl.minimum(tl.maximum(first + 1, 0) // BLOCK_N * BLOCK_N, Sk // BLOCK_N * BLOCK_N)
        end = tl.minimum(first + BLOCK_M, Sk)
    else:
        full_end = Sk // BLOCK_N * BLOCK_N
        end = Sk
    return full_end, end


@triton.jit
def _attn_fwd_dense_kernel(
    desc_q, desc_k, desc_v, Out, Lse, stride_ob, stride_oh, stride_om, Hq, Sq, Sk, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BY_HEAD: tl.constexpr,
):
    """_attn_fwd_kernel for a dense spec: the same outputs with only the accumulator, the softmax state
    and the tiles in registers. Tiles arrive by TMA (no per-thread addresses), so at 4 warps a 128 x 128
    fp32 accumulator fits under the 255-register cap and two CTAs share an SM, one's softmax overlapping
    the other's matmuls: 489-500 TF/s on the causal GQA d128 case (benchmarks/attention.py, H100), where
    the general kernel at 4 warps spills 58 registers (343 TF/s) and at 8 warps runs 438."""
    pid_bh, pid_m = _tile_order(Sq, BLOCK_M, BY_HEAD)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP
    first = pid_m * BLOCK_M + Sk - Sq  # the tile's first query position
    full_end, end = _dense_key_range(first, Sk, CAUSAL, BLOCK_M, BLOCK_N)
    q = desc_q.load([b, h, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _dense_fwd_tiles(acc, l_i, m_i, q, desc_k, desc_v, b, kvh, 0, full_end, first, Sk,
                                     qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _dense_fwd_tiles(acc, l_i, m_i, q, desc_k, desc_v, b, kvh, full_end, end, first, Sk,
                                     qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    empty = l_i == 0.0  # no such row while _validate keeps Sq <= Sk; kept as the general kernel has it
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    _store_tile(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, offs_m, stride_om, out, Sq, HEAD_DIM)
    tl.store(Lse + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)
