"""Mask structure and tile I/O, shared by the attention kernels (`forward`, `backward` and their dense twins).

Each query row i (at key position pos = i + Sk - Sq) attends to a key interval [lo, hi) built from the
spec's structure (`_row_bounds`); `_tile_plan` turns a tile's intervals into which key tiles to visit, which
of them every row attends fully and which need the per-pair mask (`_allowed`). The loads and stores split
a head dim that is not a power of two into two power-of-two column parts (`_load_head`, `_store_head`).
`_padding_info_kernel` and `_span_range_kernel` lower key padding and Gemma3 spans to per-row bounds.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): exp2 is the native instruction (MUFU.EX2)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


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
