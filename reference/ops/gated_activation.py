"""The gated activation of transformers' gated MLPs in plain PyTorch: the twin of
`optimized/kernels/gated_activation.py`.

Llama, Mistral, Qwen2, Qwen2-VL and Qwen2.5-VL (text and vision) compute
`down_proj(act_fn(gate_proj(x)) * up_proj(x))` with act_fn = ACT2FN["silu"]; Gemma3 does the same with
ACT2FN["gelu_pytorch_tanh"]. This module computes the middle part, `act(gate) * up`, exactly as those
two ops do: PyTorch's activation (fp32 math per element, one rounding to the inputs' dtype), then
PyTorch's product (one more rounding). Autograd is PyTorch's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference.errors import ArgumentValueError

ACTIVATIONS = ("silu", "gelu_tanh")

# transformers' `config.hidden_act` names whose module is bit-for-bit one of ours. "gelu_new",
# "gelu_fast" and "gelu_python_tanh" are the same tanh formula written as several PyTorch ops, each
# rounding to the dtype (bf16: 8 mantissa bits), so they are not mapped: a fused kernel would change them.
_HIDDEN_ACT = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def activation_name(hidden_act) -> str | None:
    """The `activation` for a transformers `hidden_act` name, or None when it is not supported."""
    return _HIDDEN_ACT.get(hidden_act) if isinstance(hidden_act, str) else None


def check_activation(activation) -> None:
    """ValueError (an `ArgumentValueError`) naming `activation` and the accepted values."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ArgumentValueError("activation", activation, ", ".join(repr(a) for a in ACTIVATIONS))


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, in the inputs' dtype, as transformers' ACT2FN[...](gate) * up computes it.

    activation: "silu" (x * sigmoid(x)) or "gelu_tanh" (0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))).
    """
    check_activation(activation)
    if activation == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


__all__ = ["ACTIVATIONS", "activation_name", "check_activation", "gated_activation"]
