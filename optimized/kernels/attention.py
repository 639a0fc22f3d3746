"""Flash attention in Triton for every `AttentionSpec`: the twin of `reference/ops/attention.py`.

The mask is never a tensor here. Each query row i (at key position pos = i + Sk - Sq) attends to a key
interval [lo, hi) built from the spec's structure -- padding [first, last + 1) of its batch row, its
packed segment, the window, causality -- plus two per-key refinements a tile applies when it straddles a
boundary: key padding with holes, and Gemma3 bidirectional spans (a causal row also sees the keys of
its own span). From the rows' intervals each program derives which key tiles to visit at all (the rest
are skipped), which of them every row attends fully (no mask arithmetic) and which need the per-pair
mask. The same bounds, read from the key side, drive the dK/dV kernel.

Layout follows the Triton tutorial: `@triton.jit` helpers and kernels, launchers, the autograd
Function, the public `attention`. Forward is FlashAttention-2 (online softmax in base 2, one program per
(batch * query head, query tile)); backward recomputes the probabilities from the saved log-sum-exp in
two deterministic kernels: dQ (one program per query tile; it also writes delta = rowsum(dO * O)), then
dK/dV (one program per key tile of a KV head, looping over the query heads of its GQA group, so K/V are
never repeated). A head dim that is not a power of two runs as two power-of-two column parts (80 = 64 +
16) instead of being padded. A dense spec (causal or full, nothing else: a text model's unpadded batch)
runs leaner kernels that read their tiles through TMA descriptors (`_attn_fwd_dense_kernel`,
`_attn_bwd_dq_dense_kernel`, `_attn_bwd_dkdv_dense_kernel`). After a
shape's first call, launches skip Triton's dispatch (`_launch`), and a repeated call signature goes
straight to its recorded launches (`_Recorded`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from optimized.kernels.launch import launch as _launch
from optimized.kernels.launch import launch_bound as _launch_bound
from reference.ops.attention import AttentionSpec

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): exp2 is the native instruction (MUFU.EX2)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# Mask structure, shared by the three kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _segment_bounds(cu_seqlens, n_seg, seg_steps, pos, Sk):
    """Start and end of the packed segment holding each position of `pos` (any shape).

    Segment c is [cu[c], cu[c+1]); as with the reference's searchsorted, positions before cu[1] are in
    segment 0 (which then starts at 0) and positions at or past cu[-1] in one more segment ending at Sk.
    c = #{cu[1:] <= pos}, by a binary search of seg_steps = ceil(log2(n_seg + 1)) + 1 steps over a few
    hundred bytes that stay in L1: no per-position table, no extra launch."""
    lo = tl.zeros_like(pos)
    hi = tl.zeros_like(pos) + n_seg
    for _ in range(seg_steps):  # invariant: c is in [lo, hi]
        mid = (lo + hi + 1) // 2
        below = tl.load(cu_seqlens + mid, mask=mid >= 1, other=0) <= pos
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    start = tl.where(lo == 0, 0, tl.load(cu_seqlens + lo, mask=lo >= 1, other=0))
    end = tl.where(lo >= n_seg, Sk, tl.load(cu_seqlens + lo + 1, mask=lo < n_seg, other=0))
    return start, end


@triton.jit
def _row_bounds(
    b, pos, row_ok, Sk, window, cu_seqlens, n_seg, seg_steps, pad_info, span_ids, span_range,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    HAS_PADDING: tl.constexpr, HAS_SPANS: tl.constexpr,
):
    """Per query row: key interval [lo, hi_mask) the per-pair mask tests against, hi_full (every key
    below it and >= lo is attended, ignoring padding holes), hi_tile (no key at or above it is
    attended), and the row's span id. Rows outside the sequence get lo = Sk: nothing to attend."""
    lo = tl.zeros_like(pos)
    hi = tl.zeros_like(pos) + Sk
    if HAS_PADDING:  # [first real key, last real key + 1) of this batch row
        lo = tl.maximum(lo, tl.load(pad_info + b * 3))
        hi = tl.minimum(hi, tl.load(pad_info + b * 3 + 1))
    if HAS_SEGMENTS:  # the packed segment holding pos
        seg_start, seg_end = _segment_bounds(cu_seqlens, n_seg, seg_steps, pos, Sk)
        lo = tl.maximum(lo, seg_start)
        hi = tl.minimum(hi, seg_end)
    if HAS_WINDOW:  # W keys including the query: j > pos - W
        lo = tl.maximum(lo, pos - window + 1)
    hi_mask = hi
    hi_full = hi
    hi_tile = hi
    q_span = tl.zeros_like(pos) - 1
    if CAUSAL:
        hi_full = tl.minimum(hi, pos + 1)
        if HAS_SPANS:  # a span member also sees its span's later keys: span_range[b, 1, pos] = span end
            q_span = tl.load(span_ids + b * Sk + pos, mask=row_ok, other=-1)
            span_end = tl.load(span_range + (2 * b + 1) * Sk + pos, mask=row_ok, other=0)
            hi_tile = tl.minimum(hi, tl.maximum(pos + 1, span_end))
        else:
            hi_mask = hi_full
            hi_tile = hi_full
    lo = tl.where(row_ok, lo, Sk)
    return lo, hi_mask, hi_full, hi_tile, q_span


@triton.jit
def _allowed(kk, pos, lo, hi, q_span, k_span, k_real, CAUSAL: tl.constexpr, HAS_SPANS: tl.constexpr,
             HAS_PADDING: tl.constexpr):
    """The per-pair mask; arguments arrive broadcastable to (queries, keys) or (keys, queries)."""
    ok = (kk >= lo) & (kk < hi)
    if CAUSAL:
        if HAS_SPANS:
            ok = ok & ((kk <= pos) | ((k_span == q_span) & (q_span >= 0)))
    if HAS_PADDING:
        ok = ok & (k_real != 0)
    return ok


@triton.jit
def _tile_plan(lo, hi_full, hi_tile, Sk, b, pad_info, HAS_PADDING: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles a query tile visits: [start, mid_lo) masked, [mid_lo, mid_hi) unmasked, [mid_hi, end)
    masked. Rows with nothing to attend (lo >= hi_tile) are left out of every bound; the kernels zero
    them at the end."""
    keep = lo < hi_tile
    first = tl.min(tl.where(keep, lo, Sk), 0)
    end = tl.max(tl.where(keep, hi_tile, 0), 0)
    full_lo = tl.max(tl.where(keep, lo, 0), 0)
    full_hi = tl.min(tl.where(keep, hi_full, Sk), 0)
    start = (first // BLOCK_N) * BLOCK_N
    mid_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    mid_hi = (full_hi // BLOCK_N) * BLOCK_N
    none_full = (mid_hi <= mid_lo) | (end <= first)
    if HAS_PADDING:  # padding with holes: every tile reads the bool row
        none_full = none_full | (tl.load(pad_info + b * 3 + 2) != 0)
    mid_lo = tl.where(none_full, end, mid_lo)
    mid_hi = tl.where(none_full, end, mid_hi)
    return start, mid_lo, mid_hi, end


@triton.jit
def _load_rows(base, rows, stride, n_rows, CHECK_ROWS: tl.constexpr, COL0: tl.constexpr, WIDTH: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Columns [COL0, COL0 + WIDTH) of rows of a (n_rows, HEAD_DIM) matrix with unit column stride,
    zero-filled. Masks appear only where needed: a full tile inside the head dim loads unmasked."""
    cols = COL0 + tl.arange(0, WIDTH)
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if CHECK_ROWS:
        if COL0 + WIDTH <= HEAD_DIM:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        if COL0 + WIDTH <= HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _load_head(base, rows, stride, n_rows, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, SPLIT: tl.constexpr):
    """A row tile as (rows, D_MAIN) and (rows, D_TAIL) parts: tl.arange and tl.dot need powers of two,
    and d80 as 64 + 16 columns does 62.5% of the tensor-core work of d80 padded to 128. Without SPLIT
    the second part is a placeholder that no product reads."""
    main = _load_rows(base, rows, stride, n_rows, CHECK_ROWS, 0, D_MAIN, HEAD_DIM)
    if SPLIT:
        tail = _load_rows(base, rows, stride, n_rows, CHECK_ROWS, D_MAIN, D_TAIL, HEAD_DIM)
    else:
        tail = main
    return main, tail


@triton.jit
def _store_head(base, rows, stride, main, tail, n_rows, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr,
                D_TAIL: tl.constexpr, SPLIT: tl.constexpr):
    cols = tl.arange(0, D_MAIN)
    ok = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * stride + cols[None, :], main.to(base.dtype.element_ty), mask=ok)
    if SPLIT:
        cols = D_MAIN + tl.arange(0, D_TAIL)
        ok = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
        tl.store(base + rows[:, None] * stride + cols[None, :], tail.to(base.dtype.element_ty), mask=ok)


@triton.jit
def _store_tile(base, rows, stride, tile, n_rows, HEAD_DIM: tl.constexpr):
    """_store_head of a power-of-two head dim held in one part (the dense kernels)."""
    _store_head(base, rows, stride, tile, tile, n_rows, HEAD_DIM, HEAD_DIM, 16, False)


@triton.jit
def _dot_nt(a, a_tail, b, b_tail, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b^T over the head dim, both operands split as _load_head makes them."""
    acc = tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
    if SPLIT:
        acc = tl.dot(a_tail, tl.trans(b_tail), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _dot_acc(p, b, b_tail, acc, acc_tail, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += p @ b for both head-dim parts of b (p in b's dtype for the tensor cores)."""
    acc = tl.dot(p.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    if SPLIT:
        acc_tail = tl.dot(p.to(b.dtype), b_tail, acc_tail, input_precision=DOT_PRECISION)
    return acc, acc_tail


@triton.jit
def _scores(qk, qk_scale, cap_in, cap_out, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> scores in log2 units, and tanh of the capped argument (for the backward).

    Softcap: s = cap * tanh(qk * scale / cap); tanh(y) = 1 - 2 / (exp(2y) + 1) is exact at both tails
    (exp2 overflows to inf -> 1, underflows to 0 -> -1). cap_in = 2 * scale / cap * LOG2E folds the
    2y and the base change; cap_out = cap * LOG2E."""
    if HAS_SOFTCAP:
        t = 1.0 - 2.0 / (tl.math.exp2(qk * cap_in) + 1.0)
        s = t * cap_out
    else:
        s = qk * qk_scale
        t = s
    return s, t


@triton.jit
def _padding_info_kernel(keys, info, Sk, BLOCK: tl.constexpr):
    """info[b] = (first real key, last real key + 1, has holes) of key_padding row b."""
    b = tl.program_id(0).to(tl.int64)
    first = tl.zeros([BLOCK], dtype=tl.int32) + Sk
    end = tl.zeros([BLOCK], dtype=tl.int32)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, Sk, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        real = tl.load(keys + b * Sk + offs, mask=offs < Sk, other=0) != 0
        first = tl.minimum(first, tl.where(real, offs, Sk))
        end = tl.maximum(end, tl.where(real, offs + 1, 0))
        count += real.to(tl.int32)
    first_key = tl.min(first, 0)
    end_key = tl.max(end, 0)
    tl.store(info + b * 3, first_key)
    tl.store(info + b * 3 + 1, end_key)
    tl.store(info + b * 3 + 2, (end_key - first_key != tl.sum(count, 0)).to(tl.int32))


@triton.jit
def _span_range_kernel(ids, ranges, Sk, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """ranges[b, 0, p], ranges[b, 1, p] = first and last + 1 position sharing p's span id (p, p + 1 for
    -1). Ids need not be contiguous, so every key is compared -- in registers, never as an S x S
    tensor -- and only by blocks holding a span member (Gemma3: 256 image tokens in 4096)."""
    b = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    row = ids + b * Sk
    mine = tl.load(row + pos, mask=pos < Sk, other=-1)
    first = pos
    last = pos + 1
    scan_end = tl.where(tl.max(mine, 0) >= 0, Sk, 0)
    for start in range(0, scan_end, BLOCK_K):
        keys = start + tl.arange(0, BLOCK_K)
        theirs = tl.load(row + keys, mask=keys < Sk, other=-1)
        same = (mine[:, None] == theirs[None, :]) & (mine[:, None] >= 0)
        first = tl.minimum(first, tl.min(tl.where(same, keys[None, :], Sk), 1))
        last = tl.maximum(last, tl.max(tl.where(same, keys[None, :] + 1, 0), 1))
    tl.store(ranges + 2 * b * Sk + pos, first, mask=pos < Sk)
    tl.store(ranges + (2 * b + 1) * Sk + pos, last, mask=pos < Sk)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_order(Sq, BLOCK_M: tl.constexpr, BY_HEAD: tl.constexpr):
    """(batch * head, query tile) of this program on a 1-D grid, query tiles last first.

    BY_HEAD: one head's tiles adjacent, so programs running together read the same K/V. Else one tile
    index of every head adjacent, so under a causal mask all the longest programs start first. BY_HEAD
    measured faster on the causal GQA d128 case (3,584 programs; H100): this forward 415 -> 438 TF/s, a
    reduced 4-warp one 410-440 -> 480-520, dQ 1.61 -> 1.57 ms; but slower where a causal grid is ~2
    waves (Gemma3's span case, 256 programs: 311 -> 248), the last wave then holding long tiles."""
    n_tiles = tl.cdiv(Sq, BLOCK_M)
    pid = tl.program_id(0)
    if BY_HEAD:
        return pid // n_tiles, n_tiles - 1 - pid % n_tiles
    n_heads = tl.num_programs(0) // n_tiles
    return pid % n_heads, n_tiles - 1 - pid // n_heads


@triton.jit
def _phase_range(phase: tl.constexpr, start, mid_lo, mid_hi, end):
    """Tiles of phase 0 and 2 need the per-pair mask; phase 1 is attended in full (see _tile_plan)."""
    if phase == 0:
        lo = start
        hi = mid_lo
    elif phase == 1:
        lo = mid_lo
        hi = mid_hi
    else:
        lo = mid_hi
        hi = end
    return lo, hi


@triton.jit
def _key_info(span_row, pad_row, offs_n, Sk, HAS_SPANS: tl.constexpr, HAS_PADDING: tl.constexpr):
    """Span id and realness of keys offs_n: the two per-key mask terms (placeholders when absent)."""
    k_span = tl.zeros_like(offs_n)
    k_real = tl.zeros_like(offs_n)
    if HAS_SPANS:
        k_span = tl.load(span_row + offs_n, mask=offs_n < Sk, other=-1)
    if HAS_PADDING:
        k_real = tl.load(pad_row + offs_n, mask=offs_n < Sk, other=0)
    return k_span, k_real


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


# ----------------------------------------------------------------------------------------------
# Forward of a dense spec: causal or full, nothing else (a text model's packed or unpadded batch)
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Backward of a dense spec
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

class Tiles(NamedTuple):
    """One kernel's launch shape: rows per program (block_m), keys per step (block_n), warps, stages.
    For the dK/dV kernel block_n is the key tile a program owns and block_m the query step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class TilePlan(NamedTuple):
    fwd: Tiles
    dkdv: Tiles
    dq: Tiles


# The interpreter runs each tile step through numpy (~1-4 ms a step at 32 x 32): small tiles keep the
# CPU tests fast while still crossing many tile boundaries at 17-128 tokens.
_INTERPRETER_PLAN = TilePlan(Tiles(32, 32, 4, 1), Tiles(32, 32, 4, 1), Tiles(32, 32, 4, 1))

# fp32 on a GPU is a precision path, not a speed one: "ieee" dots have no tensor-core (wgmma) form, so
# Triton unrolls them into FMAs held in registers, and the bf16 plans' 128 x 64 tiles with 3 stages of
# 4-byte K/V (3 x 64 x 256 x 4 B = 192 KB for each of K and V at d256) pass the H100's 227 KB of shared
# memory. 32 x 32 tiles, one stage: <= 96 KB at d256, and small unrolled FMA blocks to compile.
_FP32_GPU_PLAN = TilePlan(Tiles(32, 32, 4, 1), Tiles(32, 32, 4, 1), Tiles(32, 32, 4, 1))

# H100 (sm_90) plans by the head-dim width the tensor cores see (D_MAIN + D_TAIL: 80 for d80 split as
# 64 + 16), the fastest of 4-5 candidates per kernel in `benchmarks/attention.py --sweep`
# (results/attention-h100-80gb-hbm3-sweep.json). Registers bound the shapes: the forward keeps a
# BLOCK_M x width fp32 accumulator (128 x 128 x 4 B = 64 KB: 64 registers a thread at 8 warps), the
# dK/dV kernel two BLOCK_N x width ones, so width 128 runs 8 warps and 256 takes 32-key query steps.
_GPU_PLANS = {
    32: TilePlan(Tiles(128, 64, 4, 3), Tiles(32, 128, 4, 3), Tiles(64, 64, 4, 3)),
    64: TilePlan(Tiles(128, 64, 4, 3), Tiles(32, 128, 4, 3), Tiles(64, 64, 4, 3)),
    80: TilePlan(Tiles(128, 64, 4, 3), Tiles(32, 128, 4, 3), Tiles(128, 32, 8, 3)),
    128: TilePlan(Tiles(128, 64, 8, 3), Tiles(64, 128, 8, 2), Tiles(128, 32, 8, 3)),
    256: TilePlan(Tiles(128, 64, 8, 2), Tiles(64, 32, 4, 2), Tiles(128, 32, 8, 2)),
}
# Dense specs (causal or full, nothing else) at these head dims run the dense kernels: 4 warps, two stages
# (96 KB of shared memory at d128), so two CTAs share an SM. On the causal GQA d128 case (H100,
# scratch sweeps of 8-10 shapes a kernel): dQ 64 x 64 1.30 ms (128 x 128 at 8 warps 1.36, 64 x 32 1.41),
# dK/dV 64 x 64 1.87 ms (64 x 128 at 8 warps 2.19, 32 x 64 at 3 stages 2.11). d64 from the sweep of
# llava_vision_full_d64 (4 x 577 tokens, 16 heads, full; results/attention-h100-80gb-hbm3-sweep-dense.json):
# forward 85 us (128 x 64 at 4 warps 101), dK/dV 104 us (32 x 128 121), dQ 92 us (64 x 64 112).
_DENSE_HEAD_DIMS = (16, 32, 64, 128)  # powers of two (no split) whose 128-row accumulator fits 4 warps
_DENSE_PLANS = {
    64: TilePlan(Tiles(128, 128, 8, 2), Tiles(64, 64, 4, 2), Tiles(128, 128, 8, 2)),
    128: TilePlan(Tiles(128, 64, 4, 2), Tiles(64, 64, 4, 2), Tiles(64, 64, 4, 2)),
}
# Packed segments of <= 96 tokens (Qwen2.5-VL's 64-patch windows): a 128-row query tile would span two
# segments and mask half of every product. Sweep on 81 x 64 tokens, d80: 34 us forward with this plan,
# 54 us with 128-row tiles.
_SHORT_SEGMENT = 96
_SHORT_SEGMENT_PLANS = {
    32: TilePlan(Tiles(64, 64, 4, 2), Tiles(32, 64, 4, 3), Tiles(64, 32, 4, 3)),
    64: TilePlan(Tiles(64, 64, 4, 2), Tiles(32, 64, 4, 3), Tiles(64, 32, 4, 3)),
    80: TilePlan(Tiles(64, 32, 4, 3), Tiles(32, 64, 4, 3), Tiles(64, 64, 4, 3)),
    128: TilePlan(Tiles(64, 64, 4, 2), Tiles(32, 64, 4, 3), Tiles(64, 32, 4, 3)),
    256: TilePlan(Tiles(64, 64, 4, 2), Tiles(32, 64, 4, 2), Tiles(64, 32, 4, 2)),
}


def default_plan(head_dim: int, device: torch.device, spec: AttentionSpec | None = None,
                 kv_len: int = 0, dtype: torch.dtype | None = None, dense: bool = False) -> TilePlan:
    """The tiles for a call; `dense`: its forward runs the dense kernel (see uses_dense_kernel)."""
    if device.type != "cuda":
        return _INTERPRETER_PLAN
    if dtype == torch.float32:
        return _FP32_GPU_PLAN
    if dense:
        return _DENSE_PLANS[min(w for w in _DENSE_PLANS if w >= head_dim)]
    plans = _SHORT_SEGMENT_PLANS if short_segments(spec, kv_len) else _GPU_PLANS
    return plans[min(w for w in plans if w >= head_width(head_dim))]


def head_width(head_dim: int) -> int:
    """The head-dim columns the tensor cores compute on (see _head_split)."""
    split = _head_split(head_dim)
    return split["D_MAIN"] + split["D_TAIL"] if split["SPLIT"] else split["D_MAIN"]


def short_segments(spec: AttentionSpec | None, kv_len: int) -> bool:
    """Packed segments averaging <= 96 tokens, judged from shapes alone (no device sync)."""
    if spec is None or spec.cu_seqlens is None or spec.cu_seqlens.numel() < 2:
        return False
    return kv_len <= _SHORT_SEGMENT * (spec.cu_seqlens.numel() - 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a JIT function: microseconds a call from Python


def _block_d(head_dim: int) -> int:
    # tl.arange needs a power of two and tl.dot a K of at least 16.
    return max(16, 1 << (head_dim - 1).bit_length())


# Head dims run padded to the next power of two instead of split (benchmarks/attention.py --pad-head-dim
# measures both; see _head_split).
PADDED_HEAD_DIMS: set[int] = set()


def _head_split(head_dim: int) -> dict:
    """The head dim as a power-of-two main part plus a power-of-two tail (>= 16, masked past HEAD_DIM)
    where that is less work than padding: 80 = 64 + 16 and 72 = 64 + 16 (of 128 padded), 96 = 64 + 32."""
    return _split_head(head_dim, head_dim in PADDED_HEAD_DIMS)


@functools.cache  # three calls a forward and backward: the host time of a short vision call counts
def _split_head(head_dim: int, padded: bool) -> dict:
    main = max(16, 1 << (head_dim.bit_length() - 1))
    tail = _block_d(head_dim - main) if head_dim > main else 0
    if tail == 0 or main + tail >= _block_d(head_dim) or padded:
        return dict(D_MAIN=_block_d(head_dim), D_TAIL=16, SPLIT=False)  # D_TAIL sizes a placeholder
    return dict(D_MAIN=main, D_TAIL=tail, SPLIT=True)


class _Structure(NamedTuple):
    """The spec lowered to what the kernels read: small tensors, at most one launch per feature (padding,
    spans), built once per forward and reused by the backward."""

    cu_seqlens: torch.Tensor  # (N+1,) int32 segment boundaries, searched in-kernel
    pad_info: torch.Tensor  # (B, 3) int32: first real key, last real key + 1, has holes
    pad_keys: torch.Tensor  # (B, Sk) uint8 key_padding, read per key tile where a tile is masked
    span_ids: torch.Tensor  # (B, Sk) integer ids, -1 outside spans
    span_range: torch.Tensor  # (B, 2, Sk) int32: first and last + 1 position of each position's span
    scalars: dict  # window, segment count and binary-search steps
    flags: dict  # the kernels' CAUSAL / HAS_* constexprs


_PLACEHOLDERS: dict = {}


def _placeholder(device) -> torch.Tensor:
    """A tensor for pointer arguments whose feature is off (never read); cached: no launch per call."""
    key = str(device)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _PLACEHOLDERS[key]


def _padding_bounds(key_padding: torch.Tensor, batch: int, kv_len: int, device):
    if tuple(key_padding.shape) != (batch, kv_len):
        raise ValueError(f"key_padding must be (B, Sk) = {(batch, kv_len)}, got {tuple(key_padding.shape)}")
    real = key_padding.to(device=device)
    real = (real if real.dtype == torch.bool else real != 0).contiguous().view(torch.uint8)  # no copy
    info = torch.empty(batch, 3, dtype=torch.int32, device=device)
    _launch(_padding_info_kernel, (batch,), real, info, kv_len, BLOCK=1024)
    return info, real


def _span_bounds(span_ids: torch.Tensor, batch: int, kv_len: int, device):
    if tuple(span_ids.shape) != (batch, kv_len):
        raise ValueError(f"span_ids must be (B, Sk) = {(batch, kv_len)}, got {tuple(span_ids.shape)}")
    ids = span_ids.to(device=device).contiguous()
    ranges = torch.empty(batch, 2, kv_len, dtype=torch.int32, device=device)
    _launch(_span_range_kernel, (batch, _cdiv(kv_len, 64)), ids, ranges, kv_len, BLOCK_P=64, BLOCK_K=64)
    return ids, ranges


def _lower(spec: AttentionSpec, batch: int, kv_len: int, device) -> _Structure:
    dummy = _placeholder(device)
    cu_seqlens, pad_info, pad_keys, span_ids, span_range = dummy, dummy, dummy, dummy, dummy
    n_seg = 0
    if spec.cu_seqlens is not None:
        cu_seqlens = spec.cu_seqlens.to(device=device, dtype=torch.int32).contiguous()  # no-op from HF
        n_seg = cu_seqlens.numel() - 1
    if spec.key_padding is not None:
        pad_info, pad_keys = _padding_bounds(spec.key_padding, batch, kv_len, device)
    has_spans = spec.causal and spec.span_ids is not None  # without causality a span adds nothing
    if has_spans:
        span_ids, span_range = _span_bounds(spec.span_ids, batch, kv_len, device)
    # Any |W| >= Sk means the same as Sk (every key in, or none): clamping keeps pos - W + 1 in int32.
    window = 0 if spec.window is None else max(-kv_len, min(int(spec.window), kv_len))
    scalars = dict(window=window, n_seg=n_seg, seg_steps=max(1, n_seg).bit_length() + 1)
    flags = dict(CAUSAL=spec.causal, HAS_WINDOW=spec.window is not None,
                 HAS_SEGMENTS=spec.cu_seqlens is not None, HAS_PADDING=spec.key_padding is not None,
                 HAS_SPANS=has_spans, HAS_SOFTCAP=spec.softcap is not None)
    return _Structure(cu_seqlens, pad_info, pad_keys, span_ids, span_range, scalars, flags)


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> None:
    if spec.dense_mask is not None:
        raise ValueError("the Triton attention kernel does not take spec.dense_mask (an S x S tensor); "
                         "describe the mask by structure (causal, window, key_padding, cu_seqlens, "
                         "span_ids) or use reference.ops.attention")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be (B, Hq, Sq, D) and k, v (B, Hkv, Sk, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    (batch, q_heads, q_len, head_dim), (_, kv_heads, kv_len, _) = q.shape, k.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or kv_heads == 0 or q_heads % kv_heads or q_len > kv_len:
        raise ValueError(f"need equal B and D, Hq % Hkv == 0 and Sq <= Sk; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one of float16, bfloat16, float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if head_dim > 256:
        raise ValueError(f"head dim {head_dim} > 256: the accumulators would not fit in registers")
    if spec.softcap is not None and spec.softcap <= 0:
        raise ValueError(f"softcap must be positive, got {spec.softcap}")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # Any batch/head/token strides are fine (transformers passes transposed views); the head dim must
    # be contiguous for 16-byte vector loads, so only then is a copy made.
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)


def _dot_precision(q: torch.Tensor) -> str:
    """fp32 inputs (the interpreter tests) get exact fp32 products, not TF32's 10-bit mantissa."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _args(q, k, spec: AttentionSpec, low: _Structure, tiles: Tiles):
    """Scalars and compile-time flags every attention kernel takes."""
    head_dim = q.shape[-1]
    scale = spec.resolved_scale(head_dim)
    cap = spec.softcap if spec.softcap is not None else 1.0
    scalars = dict(**low.scalars, qk_scale=scale * LOG2E, cap_in=2.0 * scale / cap * LOG2E,
                   cap_out=cap * LOG2E)
    meta = dict(GROUP=q.shape[1] // k.shape[1], HEAD_DIM=head_dim, **_head_split(head_dim),
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
                num_stages=tiles.num_stages, DOT_PRECISION=_dot_precision(q), **low.flags)
    return (low.cu_seqlens, low.pad_info, low.pad_keys, low.span_ids, low.span_range), scalars, meta


def folds_scale(spec: AttentionSpec, head_dim: int) -> bool:
    """Whether the forward folds the scale into its exp2 FMA (see _attn_fwd_tiles): needs max(qk * scale)
    = max(qk) * scale, so a positive scale, and raw scores (no softcap)."""
    return spec.softcap is None and spec.resolved_scale(head_dim) > 0


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


def _tma_readable(t: torch.Tensor) -> bool:
    """TMA reads a tensor in place from a 16-byte aligned base, a unit last stride and other strides that
    are nonzero (where the extent is over 1) 16-byte multiples."""
    size = t.element_size()
    return (t.numel() > 0 and t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(stride * size % 16 == 0 and (stride > 0 or extent == 1)
                    for stride, extent in zip(t.stride()[:-1], t.shape[:-1])))


def uses_dense_kernel(q, k, v, spec: AttentionSpec) -> bool:
    """Whether the forward runs _attn_fwd_dense_kernel: a causal or full spec with a positive scale and
    nothing else, a head dim of _DENSE_HEAD_DIMS, 16-bit inputs on a GPU (fp32 too in the interpreter, for
    the CPU tests) and q, k, v that TMA can read in place."""
    if (spec.window is not None or spec.cu_seqlens is not None or spec.key_padding is not None
            or spec.span_ids is not None or spec.dense_mask is not None or not folds_scale(spec, q.shape[-1])):
        return False
    dtypes = (torch.float16, torch.bfloat16) if q.is_cuda else (torch.float16, torch.bfloat16, torch.float32)
    return (q.shape[-1] in _DENSE_HEAD_DIMS and q.dtype in dtypes
            and all(_tma_readable(t) for t in (q, k, v)))


def uses_dense_backward(q, k, v, grad_out, spec: AttentionSpec) -> bool:
    """Whether the backward runs the dense dQ and dK/dV kernels: uses_dense_kernel, with the output's
    gradient TMA-readable too (the autograd backward copies one that is not, see _dense_readable). dQ also
    reads the output, which has q's layout in a fresh buffer (_forward_outputs), so is readable with q."""
    return uses_dense_kernel(q, k, v, spec) and _tma_readable(grad_out)


def _dense_readable(grad_out: torch.Tensor) -> torch.Tensor:
    """grad_out for a dense backward: a contiguous copy where TMA cannot read it in place (an expanded
    gradient of zero strides, a misaligned view), so the backward runs the kernels the plan was made for.
    A clone, since contiguous() returns a misaligned contiguous view as it is."""
    return grad_out if _tma_readable(grad_out) else grad_out.clone(memory_format=torch.contiguous_format)


def _tma_heads(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A (B, H, S, D) tensor as TMA tiles of `rows` positions of one head."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


def _launch_dense_forward(q, k, v, spec, tiles: Tiles):
    """_launch_forward for a dense spec (uses_dense_kernel)."""
    batch, q_heads, q_len, head_dim = q.shape
    out, lse = _forward_outputs(q)

    def descriptors(q, k, v):
        return _tma_heads(q, tiles.block_m), _tma_heads(k, tiles.block_n), _tma_heads(v, tiles.block_n)

    programs = batch * q_heads * _cdiv(q_len, tiles.block_m)
    relaunch = _launch_bound(
        _attn_fwd_dense_kernel, (programs,), *descriptors(q, k, v), out, lse, *_strides(out), q_heads, q_len,
        k.shape[2], qk_scale=spec.resolved_scale(head_dim) * LOG2E, GROUP=q_heads // k.shape[1],
        HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, CAUSAL=spec.causal,
        DOT_PRECISION=_dot_precision(q),
        BY_HEAD=_by_head(spec, programs, q.device), num_warps=tiles.num_warps, num_stages=tiles.num_stages)

    def relaunch_dense(q, k, v, out, lse, *structure):
        relaunch(*descriptors(q, k, v), out, lse)

    return out, lse, relaunch_dense


def _launch_forward(q, k, v, spec, low: _Structure, tiles: Tiles):
    """(out, lse, relaunch); relaunch(q, k, v, out, lse, *structure) repeats it on new tensors."""
    if uses_dense_kernel(q, k, v, spec):
        return _launch_dense_forward(q, k, v, spec, tiles)
    batch, q_heads, q_len, _ = q.shape
    out, lse = _forward_outputs(q)
    structure, scalars, meta = _args(q, k, spec, low, tiles)
    programs = batch * q_heads * _cdiv(q_len, tiles.block_m)
    relaunch = _launch_bound(
        _attn_fwd_kernel, (programs,), q, k, v, out, lse, *structure, *_strides(q), *_strides(k),
        *_strides(v), *_strides(out), q_heads, q_len, k.shape[2], **scalars, **meta,
        FOLD_SCALE=folds_scale(spec, q.shape[-1]), BY_HEAD=_by_head(spec, programs, q.device))
    return out, lse, relaunch


def _launch_dense_dkdv(q, k, v, grad_out, lse, delta, spec, tiles: Tiles):
    """_launch_dkdv for a dense spec (uses_dense_backward)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    dk, dv = torch.empty_like(k), torch.empty_like(v)

    def descriptors(q, k, v, grad_out):
        return (_tma_heads(q, tiles.block_m), _tma_heads(k, tiles.block_n), _tma_heads(v, tiles.block_n),
                _tma_heads(grad_out, tiles.block_m))

    scale = spec.resolved_scale(head_dim)
    relaunch = _launch_bound(
        _attn_bwd_dkdv_dense_kernel, (batch * kv_heads, _cdiv(kv_len, tiles.block_n)),
        *descriptors(q, k, v, grad_out), lse, delta, dk, dv, *_strides(dk), *_strides(dv), q_heads, kv_heads,
        q_len, kv_len, qk_scale=scale * LOG2E, sm_scale=scale, GROUP=q_heads // kv_heads, HEAD_DIM=head_dim,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, CAUSAL=spec.causal,
        DOT_PRECISION=_dot_precision(q), num_warps=tiles.num_warps,
        num_stages=tiles.num_stages)

    def relaunch_dense(q, k, v, grad_out, lse, delta, dk, dv, *structure):
        relaunch(*descriptors(q, k, v, grad_out), lse, delta, dk, dv)

    return dk, dv, relaunch_dense


def _launch_dkdv(q, k, v, grad_out, lse, delta, spec, low: _Structure, tiles: Tiles):
    """(dk, dv, relaunch); relaunch(q, k, v, grad_out, lse, delta, dk, dv, *structure)."""
    if uses_dense_backward(q, k, v, grad_out, spec):
        return _launch_dense_dkdv(q, k, v, grad_out, lse, delta, spec, tiles)
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    structure, scalars, meta = _args(q, k, spec, low, tiles)
    grid = (batch * kv_heads, _cdiv(kv_len, tiles.block_n))
    relaunch = _launch_bound(
        _attn_bwd_dkdv_kernel, grid,
        q, k, v, grad_out, lse, delta, dk, dv, *structure, *_strides(q), *_strides(k), *_strides(v),
        *_strides(grad_out), *_strides(dk), *_strides(dv), q_heads, kv_heads, q_len, kv_len,
        sm_scale=spec.resolved_scale(q.shape[-1]), **scalars, **meta)
    return dk, dv, relaunch


def _launch_dense_dq(q, k, v, out, grad_out, lse, spec, tiles: Tiles):
    """_launch_dq for a dense spec (uses_dense_backward)."""
    batch, q_heads, q_len, head_dim = q.shape
    dq, delta = torch.empty_like(q), torch.empty_like(lse)

    def descriptors(q, k, v, out, grad_out):
        rows, keys = tiles.block_m, tiles.block_n
        return (_tma_heads(q, rows), _tma_heads(k, keys), _tma_heads(v, keys), _tma_heads(out, rows),
                _tma_heads(grad_out, rows))

    scale = spec.resolved_scale(head_dim)
    programs = batch * q_heads * _cdiv(q_len, tiles.block_m)
    relaunch = _launch_bound(
        _attn_bwd_dq_dense_kernel, (programs,), *descriptors(q, k, v, out, grad_out), lse, delta, dq,
        *_strides(dq), q_heads, q_len, k.shape[2], qk_scale=scale * LOG2E, sm_scale=scale,
        GROUP=q_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        CAUSAL=spec.causal, DOT_PRECISION=_dot_precision(q),
        BY_HEAD=_by_head(spec, programs, q.device), num_warps=tiles.num_warps, num_stages=tiles.num_stages)

    def relaunch_dense(q, k, v, out, grad_out, lse, delta, dq, *structure):
        relaunch(*descriptors(q, k, v, out, grad_out), lse, delta, dq)

    return dq, delta, relaunch_dense


def _launch_dq(q, k, v, out, grad_out, lse, spec, low: _Structure, tiles: Tiles):
    """(dq, delta, relaunch): delta feeds the dK/dV kernel, which must run after this one.
    relaunch(q, k, v, out, grad_out, lse, delta, dq, *structure)."""
    if uses_dense_backward(q, k, v, grad_out, spec) and _tma_readable(out):
        return _launch_dense_dq(q, k, v, out, grad_out, lse, spec, tiles)
    batch, q_heads, q_len, _ = q.shape
    dq = torch.empty_like(q)
    delta = torch.empty_like(lse)
    structure, scalars, meta = _args(q, k, spec, low, tiles)
    programs = batch * q_heads * _cdiv(q_len, tiles.block_m)
    relaunch = _launch_bound(
        _attn_bwd_dq_kernel, (programs,),
        q, k, v, out, grad_out, lse, delta, dq, *structure, *_strides(q), *_strides(k), *_strides(v),
        *_strides(out), *_strides(grad_out), *_strides(dq), q_heads, q_len, k.shape[2],
        sm_scale=spec.resolved_scale(q.shape[-1]), **scalars, **meta, BY_HEAD=_by_head(spec, programs, q.device))
    return dq, delta, relaunch


def _prepare(q, k, v, spec: AttentionSpec, plan: TilePlan | None):
    _validate(q, k, v, spec)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    plan = plan or default_plan(q.shape[-1], q.device, spec, k.shape[2], q.dtype, uses_dense_kernel(q, k, v, spec))
    return q, k, v, plan, _lower(spec, q.shape[0], k.shape[2], q.device)


def attention_forward(q, k, v, spec: AttentionSpec, plan: TilePlan | None = None):
    """(out (B, Hq, Sq, D), lse (B, Hq, Sq) float32, natural log, -inf on rows with no key). No autograd."""
    q, k, v, plan, low = _prepare(q, k, v, spec, plan)
    return _launch_forward(q, k, v, spec, low, plan.fwd)[:2]


# ----------------------------------------------------------------------------------------------
# Autograd and the public function
# ----------------------------------------------------------------------------------------------


class _Recorded:
    """The launches of one call signature (`_signature`), recorded by its first call. A vision tower
    calls attention with the same shapes in every layer and step, and each call's GPU work can be
    under 60 us: a later call skips validation, planning and the kernel-argument keys, and goes
    straight to the recorded launches (see `_AttentionFunction`)."""

    __slots__ = ("plan", "forward", "backward", "dense")

    def __init__(self, plan: TilePlan, forward, dense: bool):
        self.plan = plan
        self.forward = forward
        self.dense = dense  # uses_dense_kernel: the backward is dense too, given a TMA-readable grad_out
        self.backward: dict = {}  # grad_out's (dtype, strides, alignment) -> (relaunch dq, relaunch dkdv)


_RECORDED: dict = {}
_RECORDED_MAX = 1024  # cleared past this, as launch's runners are


def _aligned16(t: torch.Tensor) -> int:
    return t.data_ptr() & 15


def _signature(q, k, v, spec: AttentionSpec, plan: TilePlan | None):
    """Everything the launches read besides tensor addresses and contents -- dtypes, shapes, strides,
    16-byte alignment, the spec's scalars, the plan -- or None where a call needs more than launches:
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
            spec.softcap, plan)


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


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: AttentionSpec, plan: TilePlan | None):
        signature = _signature(q, k, v, spec, plan)
        recorded = None if signature is None else _RECORDED.get(signature)
        low = None
        if recorded is None:
            q, k, v, plan, low = _prepare(q, k, v, spec, plan)
            out, lse, relaunch = _launch_forward(q, k, v, spec, low, plan.fwd)
            recorded = _record(signature, _Recorded(plan, relaunch, uses_dense_kernel(q, k, v, spec)))
            structure = _structure_tensors(low)
        else:
            structure = _recorded_structure(spec, q.device)
            out, lse = _forward_outputs(q)
            recorded.forward(q, k, v, out, lse, *structure)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.low, ctx.recorded, ctx.structure = spec, low, recorded, structure
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = _dense_readable(grad_out) if ctx.recorded.dense else _unit_last_stride(grad_out)
        key = (grad_out.dtype, grad_out.stride(), _aligned16(grad_out))
        relaunches = ctx.recorded.backward.get(key)
        if relaunches is None:
            low = ctx.low if ctx.low is not None else _lower(ctx.spec, q.shape[0], k.shape[2], q.device)
            plan = ctx.recorded.plan
            dq, delta, relaunch_dq = _launch_dq(q, k, v, out, grad_out, lse, ctx.spec, low, plan.dq)
            dk, dv, relaunch_dkdv = _launch_dkdv(q, k, v, grad_out, lse, delta, ctx.spec, low, plan.dkdv)
            ctx.recorded.backward[key] = relaunch_dq, relaunch_dkdv
        else:
            dq, delta = torch.empty_like(q), torch.empty_like(lse)
            relaunches[0](q, k, v, out, grad_out, lse, delta, dq, *ctx.structure)
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            relaunches[1](q, k, v, grad_out, lse, delta, dk, dv, *ctx.structure)
        return dq, dk, dv, None, None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *, use_sdpa: bool = True
) -> torch.Tensor:
    """Attention of q (B, Hq, Sq, D) over k, v (B, Hkv, Sk, D) as `spec` says; returns (B, Hq, Sq, D).

    The kernel twin of `reference.ops.attention.attention`, differentiable in q, k, v. `use_sdpa` is
    accepted for signature parity and ignored: there is one path. The output has q's memory layout.
    `spec.dense_mask` is not supported (ValueError): the kernel reads structure, not S x S tensors.
    """
    del use_sdpa
    return _AttentionFunction.apply(q, k, v, spec, None)


__all__ = ["attention", "attention_forward", "default_plan", "short_segments", "Tiles", "TilePlan"]
