"""A gated MLP's activation and its LoRA down projection, down(act(gate) * up), in plain PyTorch: the twin of
`optimized/kernels/gated_lora_down.py`.

What transformers' gated MLP and PEFT's LoRA module compute at the end of the MLP: the activation as
`reference.ops.gated_activation` computes it, then the projection as `reference.ops.lora_linear` does.
"""

from __future__ import annotations

from reference.ops.gated_activation import gated_activation
from reference.ops.lora_linear import lora_linear


def gated_lora_down(gate, up, activation: str, weight, quant_state, bias, lora_A, lora_B, scaling: float):
    """lora_linear(act(gate) * up, ...) in gate's dtype; activation "silu" or "gelu_tanh"."""
    return lora_linear(gated_activation(gate, up, activation), weight, quant_state, bias, lora_A, lora_B, scaling)


__all__ = ["gated_lora_down"]
