"""The LM head and the causal-LM loss in one op, never holding the (tokens x vocab) logits: the twin of
`reference/ops/linear_cross_entropy.py`.

transformers' `lm_head` writes 16-bit logits for every token and keeps them for the backward, and the
loss's backward writes a gradient as large: for Qwen2-VL (151,936-token vocabulary) on 4 x 2,000 tokens,
2 x 2.4 GB -- the difference between fastvision's 6.1 GiB step and Unsloth's 2.5 GiB (H200, 2026-12-01,
benchmarks/results/finetune-nvidia-h200.md); Unsloth and Liger both fuse the head into the loss.

Here the rows whose label counts (prompt, image and padding tokens do not: in a vision SFT batch, most
of them) are taken in chunks of ~256 MiB of logits. Per chunk: logits = hidden @ weight.T (cuBLAS, the
hidden dtype); the cross-entropy row kernels of `optimized/kernels/cross_entropy.py` give each row's loss
and, in place over the logits, d(loss)/d(logits); then d(loss)/d(hidden) = grad @ weight and, when the
head trains (full fine-tuning, a tied embedding), d(loss)/d(weight) += grad.T @ hidden in fp32. The
gradients are computed in the forward -- the loss is a scalar, so the backward only scales them by its
incoming gradient -- which costs no extra matmul over the unfused pair (one forward, one or two backward
matmuls) and keeps only d(hidden) (tokens x H) between the passes.

Selecting the counted rows costs one device-to-host sync (their number); the unfused kernel has none.
"""

from __future__ import annotations

import torch

from optimized.kernels.cross_entropy import Blocks, default_blocks, row_gradients, row_losses
from reference.ops.cross_entropy import shifted_labels

CHUNK_BYTES = 256 * 2**20  # logits per chunk: 883 rows of Qwen's 151,936-vocabulary bf16, 512 of Gemma3's


def rows_per_chunk(vocab: int, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (vocab * dtype.itemsize))


class _LinearCrossEntropy(torch.autograd.Function):
    """hidden (N, H) of the counted rows, weight (V, H), targets (N,), scale (0-d fp32: d(loss)/d(row
    loss)) -> the fp32 loss sum(row losses) * scale."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, ignore_index: int, chunk_rows: int, blocks: Blocks):
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            total += _chunk(hidden[rows], weight, targets[rows], scale, ignore_index, blocks, grad_hidden[rows],
                            grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _chunk(hidden, weight, targets, scale, ignore_index, blocks, grad_hidden_out, grad_weight) -> torch.Tensor:
    """One chunk of counted rows: its loss sum; its d(hidden) written into `grad_hidden_out`, d(weight)
    added to `grad_weight`."""
    logits = hidden @ weight.T  # (C, V), contiguous
    as_rows = logits.unsqueeze(0)
    loss, lse = row_losses(as_rows, targets, ignore_index, blocks)
    row_gradients(as_rows, targets, lse, scale.expand(targets.shape[0]), ignore_index, blocks, out=as_rows)
    torch.mm(logits, weight, out=grad_hidden_out)
    if grad_weight is not None:
        grad_weight += (logits.T @ hidden).float()
    return loss.sum()


def linear_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """The float32 loss of `F.linear(hidden, weight)` against labels, as transformers' lm_head +
    ForCausalLMLoss (see `reference/ops/linear_cross_entropy.py`), differentiable in hidden and weight.

    hidden (..., H) and labels (...) as the model gives them; a sum divided by `num_items_in_batch` when
    given, else the mean over counted rows (NaN when there are none, with a zero gradient). `chunk_rows`
    overrides the rows per chunk (tests). A label outside [0, vocab) gives a NaN loss, as the unfused
    kernel's does."""
    del kwargs
    if weight.shape[0] != vocab_size or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (vocab_size={vocab_size}, hidden={hidden.shape[-1]}); got "
                         f"{tuple(weight.shape)}")
    if shift_labels is None:
        shift_labels = shifted_labels(labels, ignore_index)
    targets = shift_labels.reshape(-1).to(hidden.device)
    counted = (targets != ignore_index).nonzero().squeeze(1)  # the one host sync: how many rows count
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, counted)
    if num_items_in_batch is None:
        scale = torch.tensor(1.0 / counted.numel() if counted.numel() else float("nan"), device=hidden.device)
    else:
        scale = 1.0 / torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    if torch.is_autocast_enabled(hidden.device.type):  # as lm_head under autocast: both in its dtype
        dtype = torch.get_autocast_dtype(hidden.device.type)
        rows, weight = rows.to(dtype), weight.to(dtype)
    chunk_rows = chunk_rows or rows_per_chunk(vocab_size, weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):  # the chunks' matmuls write into given outputs
        return _LinearCrossEntropy.apply(rows.contiguous(), weight, targets[counted].contiguous(), scale.float(),
                                         int(ignore_index), chunk_rows, default_blocks(hidden.device))


__all__ = ["CHUNK_BYTES", "linear_causal_lm_loss", "rows_per_chunk"]
