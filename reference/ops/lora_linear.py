"""A LoRA linear layer in plain PyTorch, as PEFT computes it: the twin of `optimized/kernels/lora_linear.py`.

PEFT's `lora.Linear` / `lora.bnb.Linear4bit` forward for vanilla LoRA (one active adapter, no dropout,
no DoRA): the base layer's output in its compute dtype (a 4-bit weight dequantized, as bitsandbytes'
`matmul_4bit` does), plus `scaling * lora_B(lora_A(x))` computed in the adapters' dtype (fp32: the input
is cast to it) and cast to the base output's dtype before the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dequantized(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """The base weight in 16 bits: a 4-bit weight (bitsandbytes `Params4bit` data and its quant state)
    dequantized, a 16-bit one as it is."""
    if quant_state is None:
        return weight
    import bitsandbytes.functional as bnb_functional  # only a 4-bit base has a quant state

    return bnb_functional.dequantize_4bit(weight, quant_state)


def lora_linear(x, weight, quant_state, bias, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """base(x) + scaling * lora_B(lora_A(x)) with x (..., in), weight (out, in) or 4-bit with its quant
    state, lora_A (r, in), lora_B (out, r); the result in x's dtype, as PEFT returns it."""
    base = dequantized(weight, quant_state)
    result = F.linear(x.to(base.dtype), base, None if bias is None else bias.to(base.dtype))
    low_rank = F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling
    return (result + low_rank.to(result.dtype)).to(x.dtype)


__all__ = ["dequantized", "lora_linear"]
