"""Fused causal-LM cross-entropy in Triton: the twin of `reference/ops/cross_entropy.py`.

transformers' `ForCausalLMLoss` upcasts the 16-bit logits to float32 before `F.cross_entropy`: for Gemma3
(262,144-token vocabulary) on 8,000 tokens that is an 8.4 GB fp32 copy, a log-softmax written and read
back, and an fp32 gradient cast down again -- ~45 ms a step on an H100. Here the forward reads each
16-bit logit once and keeps per row only its log-sum-exp (4 bytes); the backward reads the logits once
more and writes the 16-bit gradient once. All math is fp32, as transformers' upcast makes it.

Layout follows the Triton tutorial: `@triton.jit` kernels, launchers, the autograd Function, the public
`causal_lm_loss`. Forward: one program per token row, an online max / sum-exp over the vocabulary in
column blocks, per-row loss = lse - logit[label] (0 on ignored rows, which are not read at all: prompt,
image and padding tokens cost nothing). Backward: one program per row, grad = (softmax - onehot(label))
* d(loss)/d(row loss), exactly 0 on ignored rows. The shift needs no copy of the logits: labels are
padded with ignore_index and shifted, as transformers does, so each sequence's last row is ignored.
The reduction (sum / num_items_in_batch, or mean) runs in torch on the per-row vector: no host sync.

One difference from transformers: a label outside [0, vocab) other than ignore_index gives a NaN loss
(and NaN gradient on its row) instead of an IndexError, which would need a device-to-host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from optimized.kernels.launch import compiled_or_interpreted
from optimized.kernels.launch import launch as _launch
from reference.ops.cross_entropy import shifted_labels

_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): exp2 is the native instruction


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_start(logits, row, seq_len, stride_b, stride_s):
    """Address of row `row` of logits viewed as (B, seq_len, V): any batch and position strides, so a
    sliced view such as logits[:, :-1] needs no copy. int64: 8,000 x 262,144 elements overflow int32."""
    return logits + (row // seq_len) * stride_b + (row % seq_len) * stride_s


@triton.jit
def _label_of(labels, row, ignore_index, vocab):
    """The row's label, whether it counts, and whether it indexes the vocabulary."""
    label = tl.load(labels + row).to(tl.int64)
    counts = label != ignore_index
    in_range = (label >= 0) & (label < vocab)
    return label, counts, in_range


@triton.jit
def _ce_fwd_kernel(logits, labels, loss, lse, seq_len, stride_b, stride_s, vocab, ignore_index,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = _row_start(logits, row, seq_len, stride_b, stride_s)
    label, counts, in_range = _label_of(labels, row, ignore_index, vocab)
    # Online log-sum-exp: m is the running max, s the sum of exp(x - m); one exp per logit. An ignored
    # row runs no iteration (end = 0), so its logits are never read.
    end = tl.where(counts, vocab, 0)
    m = float("-inf")
    s = 0.0
    for start in range(0, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        # While every logit so far is -inf (masked vocab entries), subtract 0 instead: -inf - -inf = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.math.exp2((m - m_safe) * _LOG2E) + tl.sum(tl.math.exp2((x - m_safe) * _LOG2E), 0)
        m = m_new
    row_lse = m + tl.log(tl.where(s > 0.0, s, 1.0))  # -inf when nothing was read: ignored rows
    target = tl.load(base + label, mask=counts & in_range, other=0.0).to(tl.float32)
    row_loss = tl.where(in_range, row_lse - target, float("nan"))
    tl.store(loss + row, tl.where(counts, row_loss, 0.0))
    tl.store(lse + row, row_lse)


@triton.jit
def _ce_bwd_kernel(logits, labels, lse, grad_loss, grad_logits, seq_len, stride_b, stride_s, stride_g,
                   vocab, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = _row_start(logits, row, seq_len, stride_b, stride_s)
    out = grad_logits + row * vocab  # a new contiguous (B, S, V) tensor
    label, counts, in_range = _label_of(labels, row, ignore_index, vocab)
    # d(loss)/d(row loss): 1 / num_items or 1 / count from torch's reduction, read through its stride
    # (0 when autograd expands the scalar). It is inf for a mean over zero rows, but then every row is
    # ignored and written as 0, as F.cross_entropy's gradient is.
    scale = tl.load(grad_loss + row * stride_g).to(tl.float32)
    scale = tl.where(in_range, scale, float("nan"))
    row_lse = tl.where(counts, tl.load(lse + row), 0.0)  # an ignored row's -inf: exp2(-inf + inf) = NaN
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        # -inf past the vocabulary and on ignored rows (which are not read): probability 0, no overflow
        x = tl.load(base + cols, mask=inside & counts, other=float("-inf")).to(tl.float32)
        p = tl.math.exp2((x - row_lse) * _LOG2E)
        g = (p - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(out + cols, tl.where(counts, g, 0.0).to(out.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


class Blocks(NamedTuple):
    """Vocabulary columns a program handles per step, and its warps."""

    block: int
    num_warps: int


# The interpreter runs each block step through numpy, ~1 ms a step whatever its width (80 rows x 5 blocks
# of 1,024: 0.38 s forward, 0.29 s backward); 1,024 columns still cross several block edges at the test
# vocabularies (up to 5,000).
_INTERPRETER_BLOCKS = Blocks(1024, 4)
# GPU: 8,192 columns = 32 steps over Gemma3's 262,144; 16 warps leave 16 values a thread (two 16-byte
# loads of bf16). ptxas for sm_90: 32 registers forward, 40 backward, no spills. Not yet swept on an H100.
_GPU_BLOCKS = Blocks(8192, 16)


def default_blocks(device: torch.device) -> Blocks:
    return compiled_or_interpreted(device, _GPU_BLOCKS, _INTERPRETER_BLOCKS)


def _block(blocks: Blocks, vocab: int) -> int:
    # tl.arange needs a power of two; no wider than the vocabulary's, and >= 16 for a clean layout.
    return max(16, min(blocks.block, 1 << max(0, vocab - 1).bit_length()))


def row_losses(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, blocks: Blocks):
    """(per-row fp32 loss, per-row fp32 log-sum-exp) of logits (B, S, V) with unit vocab stride against
    shifted targets (B * S,); 0 loss on ignored rows."""
    batch, seq_len, vocab = logits.shape
    rows = batch * seq_len
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows:
        _launch(_ce_fwd_kernel, (rows,), logits, targets, loss, lse, seq_len, logits.stride(0),
                logits.stride(1), vocab, ignore_index, BLOCK=_block(blocks, vocab), num_warps=blocks.num_warps)
    return loss, lse


def row_gradients(logits, targets, lse, grad_loss, ignore_index: int, blocks: Blocks, out=None):
    """d(loss)/d(logits) = (softmax - onehot) * grad_loss[row], in the logits' dtype, into `out` (a new
    contiguous tensor when None). `out` may be the logits themselves when they are contiguous: each
    program reads a block of its row before it writes that block."""
    batch, seq_len, vocab = logits.shape
    grad = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype) if out is None else out
    if batch * seq_len:
        _launch(_ce_bwd_kernel, (batch * seq_len,), logits, targets, lse, grad_loss, grad, seq_len,
                logits.stride(0), logits.stride(1), grad_loss.stride(0), vocab, ignore_index,
                BLOCK=_block(blocks, vocab), num_warps=blocks.num_warps)
    return grad


# ----------------------------------------------------------------------------------------------
# Autograd and the public function
# ----------------------------------------------------------------------------------------------


class _CrossEntropyFunction(torch.autograd.Function):
    """logits (B, S, V) with unit vocab stride, targets (B * S,) already shifted -> per-row fp32 loss."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, blocks: Blocks):
        loss, lse = row_losses(logits, targets, ignore_index, blocks)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index, ctx.blocks = ignore_index, blocks
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad = row_gradients(logits, targets, lse, grad_loss, ctx.ignore_index, ctx.blocks)  # never the user's logits
        return grad, None, None, None


def _as_rows(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """logits as (B, S, V) with unit vocab stride, a view wherever possible. transformers views them as
    (-1, vocab_size); a 3-D tensor keeps its own batch and position strides, anything else is viewed (or,
    if it cannot be, copied) as one sequence of rows."""
    if logits.dim() != 3 or logits.shape[-1] != vocab_size:
        logits = logits.reshape(1, -1, vocab_size)
    if logits.stride(-1) != 1:  # 16-byte vector loads need contiguous vocab rows
        logits = logits.contiguous()
    return logits


def _validate(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"logits must be float16, bfloat16, float32 or float64; got {logits.dtype}")
    if targets.numel() != rows.shape[0] * rows.shape[1]:
        raise ValueError(f"labels must give one label per logits row: {rows.shape[0] * rows.shape[1]} rows "
                         f"of logits {tuple(logits.shape)}, {targets.numel()} labels")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got {targets.dtype}")


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """The float32 loss of logits (..., vocab_size) against labels (...), as transformers' ForCausalLMLoss.

    Differentiable in `logits`; the gradient is a new tensor in the logits' dtype (the logits themselves
    are never written). A sum divided by `num_items_in_batch` when given, else the mean over non-ignored
    rows (NaN when there are none, with a zero gradient, as transformers gives). `kwargs` are ignored.
    """
    del kwargs
    return causal_lm_loss_with_blocks(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels)


def causal_lm_loss_with_blocks(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                               shift_labels=None, blocks: Blocks | None = None) -> torch.Tensor:
    """`causal_lm_loss` with the column block and warps chosen by the caller (tests, benchmarks)."""
    if shift_labels is None:
        shift_labels = shifted_labels(labels, ignore_index)  # a (B, S) integer op; the logits stay put
    rows = _as_rows(logits, vocab_size)
    targets = shift_labels.reshape(-1).to(rows.device).contiguous()
    _validate(logits, rows, targets)
    blocks = blocks or default_blocks(rows.device)
    per_row = _CrossEntropyFunction.apply(rows, targets, int(ignore_index), blocks)
    if num_items_in_batch is None:
        return per_row.sum() / (targets != ignore_index).sum()  # 0 / 0 = NaN, as F.cross_entropy's mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(per_row.device)
    return per_row.sum() / num_items_in_batch


__all__ = ["Blocks", "causal_lm_loss", "causal_lm_loss_with_blocks", "default_blocks", "row_gradients", "row_losses"]
