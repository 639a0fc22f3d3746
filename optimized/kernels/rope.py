"""Rotate-half rotary position embedding in Triton: the twin of `reference/ops/rope.py`.

transformers' `apply_rotary_pos_emb` computes `q * cos + rotate_half(q) * sin` as eager ops: for q and
k each a slice, a negation, a `cat` and four elementwise kernels forward, and as many backward -- about
ten full reads or writes of q and k per direction where two suffice. Here one launch rotates q and k
together (a program per token -- a few tokens when heads are few -- loads the cos/sin row once, then
rotates every q head and every k head), and one launch computes both gradients. Inputs are read
with their real strides, so the transposed (B, S, H, D) views transformers passes are not copied.

Rounding follows transformers' eager ops exactly: each product is formed in fp32 (exact for 16-bit
operands: 2 x 11 significand bits fit in fp32's 24), rounded to the inputs' dtype, then the two are
added in fp32 and rounded again -- as PyTorch's elementwise kernels do (fp32 math, a rounding per op;
fp32's 24 bits >= 2 x 11 + 2 make that equal to a native 16-bit add, so the compiler may use either).
FMA contraction is switched off: with it, the sm_90 PTX for fp32 and fp16 fuses a product into the add
(40 `fma` instructions in the d128 kernel), skipping the product's rounding. The results, forward and
backward, are therefore bit-identical to the reference twin (and to transformers) in fp32, fp16, bf16.

Layout follows the Triton tutorial: `@triton.jit` helpers and kernel, launcher, the autograd Function,
the public `apply_rotary`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimized.kernels.launch import cdiv, compiled_or_interpreted
from optimized.kernels.launch import launch as _launch
from reference.ops.rope import validate_rotary

# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rounded_pair_sum(a, ca, b, cb):
    """a * ca + b * cb rounded as eager PyTorch rounds it: each product to a's dtype, then the sum."""
    left = (a.to(tl.float32) * ca.to(tl.float32)).to(a.dtype).to(tl.float32)
    right = (b.to(tl.float32) * cb.to(tl.float32)).to(a.dtype).to(tl.float32)
    return left + right


@triton.jit
def _rotate_heads(x_rows, y_rows, tok_ok, stride_xh, stride_yh, n_heads, c1, c2, t1, t2, HALF: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """y1 = x1 c1 + x2 t1 and y2 = x2 c2 + x1 t2 for heads [0, n_heads) of a block of tokens, where x1, x2
    are the two halves of the head dim. x_rows, y_rows point at each token's head 0; tiles are
    (tokens, heads, half dim). n_heads = 0 (no gradient for that tensor) visits nothing."""
    cols = tl.arange(0, BLOCK_HALF)[None, None, :]
    row_ok = tok_ok[:, None, None] & (cols < HALF)
    c1, c2, t1, t2 = c1[:, None, :], c2[:, None, :], t1[:, None, :], t2[:, None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H))[None, :, None].to(tl.int64)  # H * stride_h may pass 2**31
        ok = row_ok & (heads < n_heads)
        x_ptrs = x_rows[:, None, None] + heads * stride_xh + cols
        x1 = tl.load(x_ptrs, mask=ok, other=0.0)
        x2 = tl.load(x_ptrs + HALF, mask=ok, other=0.0)
        y_ptrs = y_rows[:, None, None] + heads * stride_yh + cols
        tl.store(y_ptrs, _rounded_pair_sum(x1, c1, x2, t1).to(y_rows.dtype.element_ty), mask=ok)
        tl.store(y_ptrs + HALF, _rounded_pair_sum(x2, c2, x1, t2).to(y_rows.dtype.element_ty), mask=ok)


@triton.jit
def _rope_kernel(
    XQ, XK, YQ, YK, Cos, Sin, n_tokens, seq_len, q_heads, k_heads,
    stride_xqb, stride_xqh, stride_xqs, stride_xkb, stride_xkh, stride_xks,
    stride_yqb, stride_yqh, stride_yqs, stride_ykb, stride_ykh, stride_yks,
    stride_cb, stride_cs, stride_sb, stride_ss,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr, BACKWARD: tl.constexpr,
):
    # A program owns BLOCK_T tokens (b, s) -- one on the GPU at Llama-sized GQA, 40 heads x 128 dims --
    # and reads their cos/sin rows (4 x D/2 values each) once for all Hq + Hkv heads, not once per head.
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tokens < n_tokens
    b = (tokens // seq_len).to(tl.int64)
    s = (tokens % seq_len).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    ok = tok_ok[:, None] & (cols < HALF)
    cos_ptrs = Cos + (b * stride_cb + s * stride_cs)[:, None] + cols
    sin_ptrs = Sin + (b * stride_sb + s * stride_ss)[:, None] + cols
    c1 = tl.load(cos_ptrs, mask=ok, other=0.0)
    c2 = tl.load(cos_ptrs + HALF, mask=ok, other=0.0)
    s1 = tl.load(sin_ptrs, mask=ok, other=0.0)
    s2 = tl.load(sin_ptrs + HALF, mask=ok, other=0.0)
    if BACKWARD:  # the rotation's transpose: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
        t1 = s2
        t2 = -s1
    else:  # rotate_half(x) = (-x2, x1): y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
        t1 = -s1
        t2 = s2
    _rotate_heads(XQ + b * stride_xqb + s * stride_xqs, YQ + b * stride_yqb + s * stride_yqs, tok_ok, stride_xqh,
                  stride_yqh, q_heads, c1, c2, t1, t2, HALF, BLOCK_HALF, BLOCK_HQ)
    _rotate_heads(XK + b * stride_xkb + s * stride_xks, YK + b * stride_ykb + s * stride_yks, tok_ok, stride_xkh,
                  stride_ykh, k_heads, c1, c2, t1, t2, HALF, BLOCK_HALF, BLOCK_HK)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

# Elements of one (tokens x heads x half head dim) tile: 2048 = 1 x 32 x 64 (Llama d128) or 1 x 16 x 128
# (d256), i.e. 16 values a thread at 4 warps for each of x1, x2 and their fp32 temporaries -- well
# inside registers. Fewer heads put more tokens in a program (Gemma3-4B, 8 + 4 heads at d256: 2).
_TILE = 2048
_NUM_WARPS = 4
# The interpreter pays ~5 ms of Python per program whatever its tile size: 8x larger tiles cut a
# 150-token forward at d64, GQA 8/2, from 150 programs to 3.
_INTERPRETER_TILE = 16384


def _blocks(n_tokens: int, q_heads: int, k_heads: int, half: int, device: torch.device) -> dict:
    """The kernel's tile shape: power-of-two blocks of tokens, heads and half head dim."""
    tile = compiled_or_interpreted(device, _TILE, _INTERPRETER_TILE)
    block_half = _pow2(half)
    heads_cap = max(1, tile // block_half)
    block_hq = min(_pow2(max(q_heads, 1)), heads_cap)
    block_hk = min(_pow2(max(k_heads, 1)), heads_cap)
    block_t = max(1, min(_pow2(n_tokens), tile // (max(block_hq, block_hk) * block_half)))
    return dict(HALF=half, BLOCK_HALF=block_half, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()



def _strides(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # Batch/head/token strides are free (transformers passes transposed views); the head dim must be
    # contiguous so a half row is one vector load. Only then is a copy made.
    return t if t.stride(-1) == 1 else t.contiguous()


def _heads_inner(t: torch.Tensor) -> bool:
    """True for a (B, H, S, D) view of (B, S, H, D) memory -- what the q/k/v projections produce."""
    return t.stride(1) < t.stride(2)


def _empty_layout(shape, heads_inner: bool, like: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) output in the layout transformers' eager ops give for that input layout: a view of a
    contiguous (B, S, H, D) buffer for projection views (then the o_proj-side reshape and the grad's
    `.view` back to (B, S, H * D) cost no copy), plain contiguous otherwise."""
    batch, heads, seq, dim = shape
    if heads_inner:
        return torch.empty(batch, seq, heads, dim, dtype=like.dtype, device=like.device).transpose(1, 2)
    return torch.empty(batch, heads, seq, dim, dtype=like.dtype, device=like.device)


def _rotate(xq, xk, cos, sin, layouts, backward: bool):
    """One launch over every token of (B, H, S, D) xq and xk; either may be None (that gradient is not
    needed) and then gives None. cos, sin are (B, S, D), possibly with zero (broadcast) strides."""
    present = [x for x in (xq, xk) if x is not None]
    if not present:
        return None, None
    batch, _, seq, dim = present[0].shape
    xq, xk = (None if x is None else _unit_last_stride(x) for x in (xq, xk))
    yq, yk = (None if x is None else _empty_layout(x.shape, inner, x) for x, inner in zip((xq, xk), layouts))
    if batch * seq == 0:
        return yq, yk
    # A missing side runs zero heads: its pointers are the other side's, never dereferenced.
    aq, bq = (xq, yq) if xq is not None else (xk, yk)
    ak, bk = (xk, yk) if xk is not None else (xq, yq)
    q_heads = xq.shape[1] if xq is not None else 0
    k_heads = xk.shape[1] if xk is not None else 0
    blocks = _blocks(batch * seq, q_heads, k_heads, dim // 2, cos.device)
    _launch(
        _rope_kernel, (cdiv(batch * seq, blocks["BLOCK_T"]),),
        aq, ak, bq, bk, cos, sin, batch * seq, seq, q_heads, k_heads,
        *_strides(aq), *_strides(ak), *_strides(bq), *_strides(bk),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        **blocks, BACKWARD=backward, num_warps=_NUM_WARPS,
        # No a*b + c*d -> fma(a, b, c*d): eager PyTorch rounds the product first (matters in fp32).
        enable_fp_fusion=False,
    )
    return yq, yk


# ----------------------------------------------------------------------------------------------
# Validation, autograd and the public function
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _frame(q, k, cos, sin, unsqueeze_dim: int):
    """q, k as (B, H, S, D) views and cos, sin expanded to (B, S, D), plus whether heads were on dim 2."""
    validate_rotary(q, k, cos, sin)
    if unsqueeze_dim not in (1, 2, -3, -2):
        raise ValueError(f"unsqueeze_dim must be 1 (q, k as (B, H, S, D)) or 2 ((B, S, H, D)), got {unsqueeze_dim}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    heads_last = unsqueeze_dim in (2, -2)
    if heads_last:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    batch, _, seq, dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq:
        raise ValueError(f"k must share q's batch and sequence sizes, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] not in (1, seq):
        raise ValueError(f"cos and sin must be (B or 1, S or 1, D) = ({batch}, {seq}, {dim}), got cos "
                         f"{tuple(cos.shape)}")
    if q.dtype not in _DTYPES or not q.dtype == k.dtype == cos.dtype == sin.dtype:
        raise ValueError(f"q, k, cos, sin must share one of float16, bfloat16, float32; got {q.dtype}, "
                         f"{k.dtype}, {cos.dtype}, {sin.dtype}")
    if not q.device == k.device == cos.device == sin.device:
        raise ValueError(f"q, k, cos, sin must be on one device, got {q.device}, {k.device}, {cos.device}, "
                         f"{sin.device}")
    cos, sin = (_unit_last_stride(t.expand(batch, seq, dim)) for t in (cos, sin))
    return q, k, cos, sin, heads_last


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its heads are skipped
        layouts = (_heads_inner(q), _heads_inner(k))
        q_embed, k_embed = _rotate(q, k, cos, sin, layouts, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.layouts = layouts
        return q_embed, k_embed

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grad_q = grad_q if ctx.needs_input_grad[0] else None
        grad_k = grad_k if ctx.needs_input_grad[1] else None
        dq, dk = _rotate(grad_q, grad_k, cos, sin, ctx.layouts, backward=True)
        return dq, dk, None, None  # cos, sin: built from position ids under no_grad (checked on entry)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, the same for k), with cos/sin unsqueezed at `unsqueeze_dim`.

    The kernel twin of `reference.ops.rope.apply_rotary`, bit-identical to it. q (B, Hq, S, D) and k
    (B, Hkv, S, D) with `unsqueeze_dim=1` ((B, S, H, D) with 2), any strides; cos, sin (B or 1, S, D)
    in q's dtype. Outputs keep transformers' layout: (B, H, S, D) views of (B, S, H, D) memory for
    transposed-view inputs. Differentiable in q and k only: cos and sin are functions of position ids,
    computed under no_grad by every rotary embedding in transformers, so one requiring grad is refused
    (ValueError) rather than given a silently missing gradient.
    """
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("cos and sin must not require grad: the RoPE kernel differentiates q and k only "
                         "(use reference.ops.rope.apply_rotary to differentiate cos, sin)")
    q, k, cos, sin, heads_last = _frame(q, k, cos, sin, unsqueeze_dim)
    q_embed, k_embed = _RotaryFunction.apply(q, k, cos, sin)
    if heads_last:
        return q_embed.transpose(1, 2), k_embed.transpose(1, 2)
    return q_embed, k_embed


__all__ = ["apply_rotary"]
