"""The general backward kernels. They recompute the probabilities from the saved log-sum-exp in two
deterministic kernels: dQ (one program per query tile; it also writes delta = rowsum(dO * O)), then dK/dV
(one program per key tile of a KV head, looping over the query heads of its GQA group, so K/V are never
repeated). The same row bounds as the forward, read from the key side (`_query_plan`), skip masked tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from optimized.kernels.attention.masks import (
    _LOG2E,
    _allowed,
    _dot_acc,
    _dot_nt,
    _key_info,
    _load_head,
    _phase_range,
    _row_bounds,
    _scores,
    _segment_bounds,
    _store_head,
    _tile_order,
    _tile_plan,
)


@triton.jit
def _load_lse2(lse_ptr, offs, ok):
    """Saved natural lse -> log2 units. A row with nothing to attend has lse = -inf; +inf instead makes
    every recomputed probability exp2(s - inf) = 0, so such a row gets exactly zero gradients."""
    lse = tl.load(lse_ptr + offs, mask=ok, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)


@triton.jit
def _attn_bwd_kv_tiles(
    dk, dk_tail, dv, dv_tail, k, k_tail, v, v_tail, q_base, do_base, lse_ptr, delta_ptr,
    stride_qm, stride_dom, offs_n, k_span, k_real, start, end, b, Sq, Sk, window, qk_scale, cap_in,
    cap_out, cu_seqlens, n_seg, seg_steps, pad_info, span_ids, span_range,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    HAS_PADDING: tl.constexpr, HAS_SPANS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one key tile over query tiles [start, end). Keys x queries orientation: P^T and dS^T
    come out of the dots in the shape the dV and dK products consume, with no register transpose."""
    for start_m in range(start, end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Sq
        # An unmasked query tile lies inside [0, Sq): its loads need no row check.
        q, q_tail = _load_head(q_base, offs_m, stride_qm, Sq, MASKED, HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
        lse2 = _load_lse2(lse_ptr, offs_m, row_ok)
        sT, tT = _scores(_dot_nt(k, k_tail, q, q_tail, SPLIT, DOT_PRECISION), qk_scale, cap_in, cap_out,
                         HAS_SOFTCAP)
        if MASKED:
            pos = offs_m + (Sk - Sq)
            lo, hi_mask, _, _, q_span = _row_bounds(
                b, pos, row_ok, Sk, window, cu_seqlens, n_seg, seg_steps, pad_info, span_ids, span_range,
                CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PADDING, HAS_SPANS)
            ok = _allowed(offs_n[:, None], pos[None, :], lo[None, :], hi_mask[None, :], q_span[None, :],
                          k_span[:, None], k_real[:, None], CAUSAL, HAS_SPANS, HAS_PADDING)
            sT = tl.where(ok, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        do, do_tail = _load_head(do_base, offs_m, stride_dom, Sq, MASKED, HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
        dv, dv_tail = _dot_acc(pT, do, do_tail, dv, dv_tail, SPLIT, DOT_PRECISION)
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        dsT = pT * (_dot_nt(v, v_tail, do, do_tail, SPLIT, DOT_PRECISION) - delta[None, :])
        if HAS_SOFTCAP:  # d(cap * tanh(x / cap)) / dx = 1 - tanh^2
            dsT = dsT * (1.0 - tT * tT)
        dk, dk_tail = _dot_acc(dsT, q, q_tail, dk, dk_tail, SPLIT, DOT_PRECISION)
    return dk, dk_tail, dv, dv_tail


@triton.jit
def _query_plan(b, n0, n1, Sq, Sk, window, cu_seqlens, n_seg, seg_steps, pad_info, span_range,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                HAS_PADDING: tl.constexpr, HAS_SPANS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """_tile_plan seen from the key tile [n0, n1): the query tiles to visit, [start, mid_lo) and
    [mid_hi, end) masked, [mid_lo, mid_hi) attending every key of the tile. Works in key positions
    p = i + (Sk - Sq): [p_lo, p_hi) may attend some key of the tile, [f_lo, f_hi) attends all."""
    off = Sk - Sq
    p_lo = off
    p_hi = Sk
    f_lo = off
    f_hi = Sk
    if CAUSAL:  # some key <= p needs p >= n0; all of them needs p >= n1 - 1
        first = n0
        if HAS_SPANS:  # earlier members of a span in the tile see it too: its first position
            offs_n = n0 + tl.arange(0, BLOCK_N)
            span_lo = tl.load(span_range + 2 * b * Sk + offs_n, mask=offs_n < n1, other=Sk)
            first = tl.minimum(first, tl.min(span_lo, 0))
        p_lo = tl.maximum(p_lo, first)
        f_lo = tl.maximum(f_lo, n1 - 1)
    if HAS_WINDOW:  # key j is seen by p < j + W
        p_hi = tl.minimum(p_hi, n1 - 1 + window)
        f_hi = tl.minimum(f_hi, n0 + window)
    if HAS_SEGMENTS:
        first_start, first_end = _segment_bounds(cu_seqlens, n_seg, seg_steps, n0, Sk)
        _, last_end = _segment_bounds(cu_seqlens, n_seg, seg_steps, n1 - 1, Sk)
        p_lo = tl.maximum(p_lo, first_start)
        p_hi = tl.minimum(p_hi, last_end)
    if HAS_PADDING:  # no real key in the tile: no query to visit
        first_key = tl.load(pad_info + b * 3)
        end_key = tl.load(pad_info + b * 3 + 1)
        p_hi = tl.where((n1 <= first_key) | (n0 >= end_key), p_lo, p_hi)
    f_lo = tl.maximum(f_lo, p_lo) - off
    f_hi = tl.minimum(f_hi, p_hi) - off
    start = ((p_lo - off) // BLOCK_M) * BLOCK_M
    end = tl.maximum(p_hi - off, start)
    mid_lo = tl.cdiv(f_lo, BLOCK_M) * BLOCK_M
    mid_hi = (f_hi // BLOCK_M) * BLOCK_M
    none_full = mid_hi <= mid_lo
    if HAS_SEGMENTS:  # the tile straddles two segments
        none_full = none_full | (first_end < n1)
    if HAS_PADDING:  # some key of the tile is padding, or the row has holes
        none_full = none_full | (n0 < first_key) | (n1 > end_key) | (tl.load(pad_info + b * 3 + 2) != 0)
    mid_lo = tl.where(none_full, end, mid_lo)
    mid_hi = tl.where(none_full, end, mid_hi)
    return start, mid_lo, mid_hi, end


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, cu_seqlens, pad_info, pad_keys, span_ids, span_range,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    Hq, Hkv, Sq, Sk, window, n_seg, seg_steps, qk_scale, sm_scale, cap_in, cap_out,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_SPANS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (batch, KV head, key tile); under causality tile 0 has the most queries and,
    # being first in launch order, starts first. (Key tiles of one head adjacent, as the forward orders
    # its query tiles, measured 2.25 -> 2.75 ms on the causal GQA d128 case: with ~4 waves of very
    # unequal programs, the heaviest tiles must all start first.)
    pid_bkv = tl.program_id(0)
    b = pid_bkv // Hkv
    kvh = pid_bkv % Hkv
    n0 = tl.program_id(1) * BLOCK_N
    n1 = tl.minimum(n0 + BLOCK_N, Sk)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    b64 = b.to(tl.int64)
    k, k_tail = _load_head(K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh, offs_n, stride_kn, Sk, True,
                           HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
    v, v_tail = _load_head(V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh, offs_n, stride_vn, Sk, True,
                           HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
    k_span, k_real = _key_info(span_ids + b64 * Sk, pad_keys + b64 * Sk, offs_n, Sk, HAS_SPANS, HAS_PADDING)
    start, mid_lo, mid_hi, end = _query_plan(
        b, n0, n1, Sq, Sk, window, cu_seqlens, n_seg, seg_steps, pad_info, span_range,
        CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PADDING, HAS_SPANS, BLOCK_N, BLOCK_M)

    dk = tl.zeros([BLOCK_N, D_MAIN], dtype=tl.float32)
    dk_tail = tl.zeros([BLOCK_N, D_TAIL], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_MAIN], dtype=tl.float32)
    dv_tail = tl.zeros([BLOCK_N, D_TAIL], dtype=tl.float32)
    for g in range(GROUP):  # the query heads reading this KV head sum here: K/V are never repeated
        h = (kvh * GROUP + g).to(tl.int64)
        row_base = (b64 * Hq + h) * Sq
        for phase in tl.static_range(3):
            lo_m, hi_m = _phase_range(phase, start, mid_lo, mid_hi, end)
            dk, dk_tail, dv, dv_tail = _attn_bwd_kv_tiles(
                dk, dk_tail, dv, dv_tail, k, k_tail, v, v_tail, Q + b64 * stride_qb + h * stride_qh,
                dOut + b64 * stride_dob + h * stride_doh, Lse + row_base, Delta + row_base,
                stride_qm, stride_dom, offs_n, k_span, k_real, lo_m, hi_m, b, Sq, Sk, window, qk_scale,
                cap_in, cap_out, cu_seqlens, n_seg, seg_steps, pad_info, span_ids, span_range,
                phase != 1, CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PADDING, HAS_SPANS, HAS_SOFTCAP,
                HEAD_DIM, D_MAIN, D_TAIL, SPLIT, BLOCK_M, DOT_PRECISION)

    # dS was taken with respect to the scaled score
    _store_head(dK + b64 * stride_dkb + kvh.to(tl.int64) * stride_dkh, offs_n, stride_dkn, dk * sm_scale,
                dk_tail * sm_scale, Sk, HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
    _store_head(dV + b64 * stride_dvb + kvh.to(tl.int64) * stride_dvh, offs_n, stride_dvn, dv, dv_tail, Sk,
                HEAD_DIM, D_MAIN, D_TAIL, SPLIT)


@triton.jit
def _attn_bwd_q_tiles(
    dq, dq_tail, q, q_tail, do, do_tail, lse2, delta, k_base, v_base, stride_kn, stride_vn, start, end,
    pos, lo, hi, q_span, span_row, pad_row, Sk, qk_scale, cap_in, cap_out,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SPANS: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of one query tile over key tiles [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, k_tail = _load_head(k_base, offs_n, stride_kn, Sk, MASKED, HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
        v, v_tail = _load_head(v_base, offs_n, stride_vn, Sk, MASKED, HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
        s, t = _scores(_dot_nt(q, q_tail, k, k_tail, SPLIT, DOT_PRECISION), qk_scale, cap_in, cap_out,
                       HAS_SOFTCAP)
        if MASKED:
            k_span, k_real = _key_info(span_row, pad_row, offs_n, Sk, HAS_SPANS, HAS_PADDING)
            ok = _allowed(offs_n[None, :], pos[:, None], lo[:, None], hi[:, None], q_span[:, None],
                          k_span[None, :], k_real[None, :], CAUSAL, HAS_SPANS, HAS_PADDING)
            s = tl.where(ok, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        ds = p * (_dot_nt(do, do_tail, v, v_tail, SPLIT, DOT_PRECISION) - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq, dq_tail = _dot_acc(ds, k, k_tail, dq, dq_tail, SPLIT, DOT_PRECISION)
    return dq, dq_tail


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, Out, dOut, Lse, Delta, dQ, cu_seqlens, pad_info, pad_keys, span_ids, span_range,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    Hq, Sq, Sk, window, n_seg, seg_steps, qk_scale, sm_scale, cap_in, cap_out,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_SPANS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, BY_HEAD: tl.constexpr,
):
    # Runs before the dK/dV kernel and also writes delta_i = sum_d dO_id * O_id (the softmax Jacobian
    # term both subtract) for it: one read of O here instead of a separate launch.
    pid_bh, pid_m = _tile_order(Sq, BLOCK_M, BY_HEAD)  # longest query tiles first, as in the forward
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Sq
    pos = offs_m + (Sk - Sq)
    lo, hi_mask, hi_full, hi_tile, q_span = _row_bounds(
        b, pos, row_ok, Sk, window, cu_seqlens, n_seg, seg_steps, pad_info, span_ids, span_range,
        CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PADDING, HAS_SPANS)
    start, mid_lo, mid_hi, end = _tile_plan(lo, hi_full, hi_tile, Sk, b, pad_info, HAS_PADDING, BLOCK_N)

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q, q_tail = _load_head(Q + b64 * stride_qb + h64 * stride_qh, offs_m, stride_qm, Sq, True, HEAD_DIM,
                           D_MAIN, D_TAIL, SPLIT)
    do, do_tail = _load_head(dOut + b64 * stride_dob + h64 * stride_doh, offs_m, stride_dom, Sq, True,
                             HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
    o, o_tail = _load_head(Out + b64 * stride_ob + h64 * stride_oh, offs_m, stride_om, Sq, True, HEAD_DIM,
                           D_MAIN, D_TAIL, SPLIT)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if SPLIT:
        delta += tl.sum(o_tail.to(tl.float32) * do_tail.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Sq + offs_m, delta, mask=row_ok)
    lse2 = _load_lse2(Lse + pid_bh.to(tl.int64) * Sq, offs_m, row_ok)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, D_MAIN], dtype=tl.float32)
    dq_tail = tl.zeros([BLOCK_M, D_TAIL], dtype=tl.float32)
    for phase in tl.static_range(3):
        lo_n, hi_n = _phase_range(phase, start, mid_lo, mid_hi, end)
        dq, dq_tail = _attn_bwd_q_tiles(
            dq, dq_tail, q, q_tail, do, do_tail, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo_n,
            hi_n, pos, lo, hi_mask, q_span, span_ids + b64 * Sk, pad_keys + b64 * Sk, Sk, qk_scale, cap_in,
            cap_out, phase != 1, CAUSAL, HAS_SPANS, HAS_PADDING, HAS_SOFTCAP, HEAD_DIM, D_MAIN, D_TAIL,
            SPLIT, BLOCK_N, DOT_PRECISION)
    _store_head(dQ + b64 * stride_dqb + h64 * stride_dqh, offs_m, stride_dqm, dq * sm_scale,
                dq_tail * sm_scale, Sq, HEAD_DIM, D_MAIN, D_TAIL, SPLIT)
