"""Causal-LM cross-entropy in plain PyTorch: the twin of `optimized/kernels/cross_entropy.py`.

The semantics are exactly those of transformers' `ForCausalLMLoss` (loss/loss_utils.py), which every
family's `forward(labels=...)` calls: the logits are upcast to float32; position t predicts label t + 1
(labels are padded with `ignore_index` and shifted, unless `shift_labels` is given already shifted);
rows whose label is `ignore_index` contribute nothing; the reduction is a sum divided by
`num_items_in_batch` when given (the Trainer's count over all gradient-accumulation steps), else a mean
over the non-ignored rows -- NaN when there are none, as `F.cross_entropy` gives (its gradient is then 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """labels (..., S) -> (..., S): position t holds labels[t + 1]; the last position, which has no next
    token, holds ignore_index."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


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

    `kwargs` are accepted and ignored, as transformers does (models pass their whole `**kwargs` on).
    Labels outside [0, vocab_size) other than ignore_index raise, as `F.cross_entropy` does.
    """
    del kwargs
    logits = logits.float()  # a 262k vocab in fp16 would lose ~3 digits summing exp() in the dtype
    if shift_labels is None:
        shift_labels = shifted_labels(labels, ignore_index)
    rows = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(rows.device)
    if num_items_in_batch is None:
        return F.cross_entropy(rows, targets, ignore_index=ignore_index, reduction="mean")
    loss = F.cross_entropy(rows, targets, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


__all__ = ["causal_lm_loss", "shifted_labels"]
