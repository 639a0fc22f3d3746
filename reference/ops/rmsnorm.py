"""RMSNorm in plain PyTorch: the twin of `optimized/kernels/rmsnorm.py`.

RMSNorm scales each row of the last dimension by its inverse root mean square,
n = x / sqrt(mean(x^2) + eps), then by a learned per-column weight. The five families use two styles
that differ in the weight's form and in where the result is rounded to the input's 16-bit dtype:

- Llama / Qwen2 / Mistral / Pixtral (transformers' `LlamaRMSNorm`): n is rounded to x's dtype first,
  then multiplied by the weight, so the result has the dtype of `weight * x` (bf16 for a bf16 model).
- Gemma3 (`Gemma3RMSNorm`): the weight is stored as an offset from 1; n * (1 + w) stays in fp32 and
  is rounded to x's dtype once, at the end (transformers PR 29402: Gemma was trained that way).

Both compute the statistics in fp32 whatever the input dtype. The code below is transformers' own,
line for line, so the twin is bit-identical to the modules it replaces (tests/test_rmsnorm_kernel.py).
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, gemma: bool = False) -> torch.Tensor:
    """RMSNorm of x over its last dimension with a weight of that dimension's size.

    `gemma=False`: `weight * normalized.to(x.dtype)` (LlamaRMSNorm), dtype promoted from weight and x.
    `gemma=True`: `(normalized * (1 + weight.float())).type_as(x)` (Gemma3RMSNorm), dtype of x.
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).type_as(x)
    return weight * h.to(x.dtype)


__all__ = ["rms_norm"]
