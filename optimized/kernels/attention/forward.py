"""The general forward kernel: FlashAttention-2 (online softmax in base 2, one program per (batch * query
head, query tile)) over the key tiles `_tile_plan` keeps, with the per-pair mask only where a tile needs it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from optimized.kernels.attention.masks import (
    _LN2,
    _allowed,
    _dot_acc,
    _dot_nt,
    _key_info,
    _load_head,
    _phase_range,
    _row_bounds,
    _scores,
    _store_head,
    _tile_order,
    _tile_plan,
)


@triton.jit
def _softmax_step(s, m_i, l_i, qk_scale, MASKED: tl.constexpr, FOLD_SCALE: tl.constexpr):
    """One key tile of the online softmax: (p, alpha, m, l) from the tile's scores s (raw q.k when
    FOLD_SCALE, else already in log2 units) and the running max m_i and sum l_i; the caller rescales its
    accumulator by alpha and adds p @ v.

    A row whose keys so far are all masked keeps m = -inf (alpha 1), and subtracts 0 instead: every p is
    0. (Setting m = 0 there would underflow every later p of a row whose scores are < -103.)"""
    if FOLD_SCALE:
        m_tile = tl.max(s, 1) * qk_scale
    else:
        m_tile = tl.max(s, 1)
    m_new = tl.maximum(m_i, m_tile)
    alpha = tl.math.exp2(m_i - m_new)
    m_sub = m_new
    if MASKED:
        alpha = tl.where(m_new == float("-inf"), 1.0, alpha)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    if FOLD_SCALE:
        p = tl.math.exp2(s * qk_scale - m_sub[:, None])
    else:
        p = tl.math.exp2(s - m_sub[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attn_fwd_tiles(
    acc, acc_tail, l_i, m_i, q, q_tail, k_base, v_base, stride_kn, stride_vn, start, end,
    pos, lo, hi, q_span, span_row, pad_row, Sk, qk_scale, cap_in, cap_out,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SPANS: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
):
    """Online softmax over key tiles [start, end): FlashAttention-2's inner loop, in base 2.

    FOLD_SCALE (scale > 0, no softcap): the row max is taken on the raw q.k and scaled per row, so
    exp2(qk * scale - m) is one FMA and the tile is never multiplied on its own: 399 -> 434 TFLOP/s on
    the causal GQA d128 case (H100). FlashAttention-4's lazy rescaling (move m only when it grows by
    more than 8) measured slower here (401 at best): its data-dependent branch stops Triton from
    software-pipelining the loop."""
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # An unmasked tile lies inside [0, Sk): its loads need no row check.
        k, k_tail = _load_head(k_base, offs_n, stride_kn, Sk, MASKED, HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
        qk = _dot_nt(q, q_tail, k, k_tail, SPLIT, DOT_PRECISION)
        if FOLD_SCALE:
            s = qk
        else:
            s, _ = _scores(qk, qk_scale, cap_in, cap_out, HAS_SOFTCAP)
        if MASKED:
            k_span, k_real = _key_info(span_row, pad_row, offs_n, Sk, HAS_SPANS, HAS_PADDING)
            ok = _allowed(offs_n[None, :], pos[:, None], lo[:, None], hi[:, None], q_span[:, None],
                          k_span[None, :], k_real[None, :], CAUSAL, HAS_SPANS, HAS_PADDING)
            s = tl.where(ok, s, float("-inf"))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, MASKED, FOLD_SCALE)
        v, v_tail = _load_head(v_base, offs_n, stride_vn, Sk, MASKED, HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
        acc, acc_tail = _dot_acc(p, v, v_tail, acc * alpha[:, None], acc_tail * alpha[:, None], SPLIT,
                                 DOT_PRECISION)
    return acc, acc_tail, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, cu_seqlens, pad_info, pad_keys, span_ids, span_range,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    Hq, Sq, Sk, window, n_seg, seg_steps, qk_scale, cap_in, cap_out,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_SPANS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr, BY_HEAD: tl.constexpr,
):
    pid_bh, pid_m = _tile_order(Sq, BLOCK_M, BY_HEAD)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP  # query head h reads KV head h // (Hq / Hkv), as transformers' repeat_kv
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Sq
    pos = offs_m + (Sk - Sq)
    lo, hi_mask, hi_full, hi_tile, q_span = _row_bounds(
        b, pos, row_ok, Sk, window, cu_seqlens, n_seg, seg_steps, pad_info, span_ids, span_range,
        CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PADDING, HAS_SPANS)
    start, mid_lo, mid_hi, end = _tile_plan(lo, hi_full, hi_tile, Sk, b, pad_info, HAS_PADDING, BLOCK_N)

    b64 = b.to(tl.int64)
    q, q_tail = _load_head(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh, offs_m, stride_qm, Sq, True,
                           HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_MAIN], dtype=tl.float32)
    acc_tail = tl.zeros([BLOCK_M, D_TAIL], dtype=tl.float32)
    for phase in tl.static_range(3):
        lo_n, hi_n = _phase_range(phase, start, mid_lo, mid_hi, end)
        acc, acc_tail, l_i, m_i = _attn_fwd_tiles(
            acc, acc_tail, l_i, m_i, q, q_tail, k_base, v_base, stride_kn, stride_vn, lo_n, hi_n,
            pos, lo, hi_mask, q_span, span_ids + b64 * Sk, pad_keys + b64 * Sk, Sk, qk_scale, cap_in,
            cap_out, phase != 1, CAUSAL, HAS_SPANS, HAS_PADDING, HAS_SOFTCAP, HEAD_DIM, D_MAIN, D_TAIL,
            SPLIT, BLOCK_N, DOT_PRECISION, FOLD_SCALE)

    # A row with no key (l = 0), or one known empty (which the unmasked phase may have fed): 0 out and
    # lse = -inf, FlashAttention's convention; the backward turns that lse into zero probabilities.
    empty = (l_i == 0.0) | (lo >= hi_tile)
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    out_tail = tl.where(empty[:, None], 0.0, acc_tail / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    _store_head(Out + b64 * stride_ob + h.to(tl.int64) * stride_oh, offs_m, stride_om, out, out_tail, Sq,
                HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
    tl.store(Lse + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=row_ok)
