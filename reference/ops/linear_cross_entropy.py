"""The LM head and the causal-LM loss as one op, in plain PyTorch: the twin of
`optimized/kernels/linear_cross_entropy.py`.

`linear_causal_lm_loss(hidden, weight, labels, ...)` is exactly `causal_lm_loss(hidden @ weight.T, labels,
...)`: transformers' `lm_head` followed by its `ForCausalLMLoss`. The twin builds the logits, as
transformers does; the kernel never holds more than a chunk of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference.ops.cross_entropy import causal_lm_loss


def linear_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """The float32 loss of `F.linear(hidden, weight)` (hidden (..., H), weight (vocab_size, H)) against
    labels (...), as transformers' lm_head + ForCausalLMLoss. `kwargs` are ignored, as transformers does."""
    del kwargs
    return causal_lm_loss(F.linear(hidden, weight), labels, vocab_size, num_items_in_batch, ignore_index,
                          shift_labels)


__all__ = ["linear_causal_lm_loss"]
