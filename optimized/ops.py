"""Which implementation serves each op: the Triton kernel on a GPU (or in Triton's interpreter when
TRITON_INTERPRET=1), otherwise the reference op — said once in the log. Every op here has the signature
of its plain-PyTorch twin in `reference/ops/`.

A spec the kernel cannot read (a dense mask from a composition the mask builder does not know) also
goes to the reference op, so an unknown pattern is slow, never wrong. On a GPU, the kinds of attention call
the kernel is measured slower on go to PyTorch's SDPA (`optimized/attention_peers.py`).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from optimized import attention_peers
from reference.ops import attention as attention_twin
from reference.ops import cross_entropy as cross_entropy_twin
from reference.ops import gated_activation as gated_activation_twin
from reference.ops import gated_lora_down as gated_lora_down_twin
from reference.ops import linear_cross_entropy as linear_cross_entropy_twin
from reference.ops import lora_linear as lora_linear_twin
from reference.ops import rmsnorm as rmsnorm_twin
from reference.ops import rope as rope_twin

logger = logging.getLogger("fastvision.optimized")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def kernels() -> dict:
    """Each op's Triton implementation, imported at first use: Triton reads TRITON_INTERPRET when a kernel is
    decorated (so a test may set it after importing this module), and a CPU without it never needs Triton."""
    from optimized.kernels import attention as attention_kernel
    from optimized.kernels import (
        cross_entropy,
        gated_activation,
        gated_lora_down,
        linear_cross_entropy,
        lora_linear,
        nf4_dequant,
        rmsnorm,
        rope,
    )

    return {
        "attention": attention_kernel.attention,
        "rms_norm": rmsnorm.rms_norm,
        "gated_activation": gated_activation.gated_activation,
        "apply_rotary": rope.apply_rotary,
        "causal_lm_loss": cross_entropy.causal_lm_loss,
        "linear_causal_lm_loss": linear_cross_entropy.linear_causal_lm_loss,
        "lora_linear": lora_linear.lora_linear,
        "gated_lora_down": gated_lora_down.gated_lora_down,
        "dequantize_nf4": nf4_dequant.dequantize_nf4,
        "nf4_unreadable": nf4_dequant.unreadable,
    }


# Each op's plain-PyTorch twin (reference/ops/), which serves wherever the kernel cannot.
TWINS = {
    "attention": attention_twin.attention,
    "rms_norm": rmsnorm_twin.rms_norm,
    "gated_activation": gated_activation_twin.gated_activation,
    "apply_rotary": rope_twin.apply_rotary,
    "causal_lm_loss": cross_entropy_twin.causal_lm_loss,
    "linear_causal_lm_loss": linear_cross_entropy_twin.linear_causal_lm_loss,
    "lora_linear": lora_linear_twin.lora_linear,
    "gated_lora_down": gated_lora_down_twin.gated_lora_down,
    # Not the plain-PyTorch twin (reference/ops/nf4_dequant.py, which the kernel is tested against) but
    # bitsandbytes' own dequantize_4bit: what the reference backend runs, and it reads every quant state.
    "dequantize_nf4": lora_linear_twin.dequantized,
}


@functools.cache
def _say_fallback_once(reason: str) -> None:
    logger.warning("fastvision optimized backend: %s; running the reference ops (plain PyTorch) instead.", reason)


def kernel_serves(q: torch.Tensor, spec: attention_twin.AttentionSpec | None = None) -> bool:
    """True when the Triton kernel runs this call; False routes it to the reference op."""
    if spec is not None and not spec.is_structured:
        _say_fallback_once("a mask pattern with no structure the kernel can read")
        return False
    if q.is_cuda:
        return True
    if interpreter_enabled():
        return True
    _say_fallback_once("no GPU and TRITON_INTERPRET is not set")
    return False


def attention(q, k, v, spec):
    """The optimized backend's attention op: same signature as `reference.ops.attention.attention`. A kind
    of call the kernel is measured slower on goes to the peer instead (`optimized/attention_peers.py`)."""
    if not kernel_serves(q, spec):
        return TWINS["attention"](q, k, v, spec)
    if attention_peers.peer_for(attention_peers.kind_of(q, k, spec)) is not None:
        return attention_peers.peer_attention(q, k, v, spec)
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        # Triton's interpreter computes tl.dot through numpy, which has no bf16: bf16 operands come back as
        # garbage (errors ~1e9). On the CPU the kernel therefore runs on fp32 copies; the GPU runs bf16.
        out = kernels()["attention"](q.float(), k.float(), v.float(), spec)
        return out.to(torch.bfloat16)
    return kernels()["attention"](q, k, v, spec)


def _on_kernel(op: str, *tensors, in_input_dtype: bool = True, **kwargs):
    """The kernel of `op` where it can run, else its reference twin. On the
    CPU the interpreter gets fp32 copies of bf16 inputs (numpy has no bf16) and, where the op's results
    are in its input dtype (`in_input_dtype`; the loss is fp32 whatever the logits), they are cast back."""
    if not kernel_serves(tensors[0]):
        return TWINS[op](*tensors, **kwargs)
    kernel = kernels()[op]
    if tensors[0].dtype != torch.bfloat16 or tensors[0].is_cuda:
        return kernel(*tensors, **kwargs)
    result = kernel(*(t.float() if t.is_floating_point() else t for t in tensors), **kwargs)
    if not in_input_dtype:
        return result
    return tuple(r.to(torch.bfloat16) for r in result) if isinstance(result, tuple) else result.to(torch.bfloat16)


def rms_norm(x, weight, eps, *, gemma=False):
    return _on_kernel("rms_norm", x, weight, eps=eps, gemma=gemma)


def gated_activation(gate, up, activation):
    return _on_kernel("gated_activation", gate, up, activation=activation)


def apply_rotary(q, k, cos, sin, unsqueeze_dim=1):
    return _on_kernel("apply_rotary", q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                   **kwargs):
    return _on_kernel("causal_lm_loss", logits, labels, in_input_dtype=False, vocab_size=vocab_size,
                      num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, shift_labels=shift_labels,
                      **kwargs)


def linear_causal_lm_loss(hidden, weight, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                          shift_labels=None, **kwargs):
    return _on_kernel("linear_causal_lm_loss", hidden, weight, labels, in_input_dtype=False,
                      vocab_size=vocab_size, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                      shift_labels=shift_labels, **kwargs)


def dequantize_nf4(packed, quant_state):
    """A bitsandbytes 4-bit weight in quant_state.dtype (`reference/ops/nf4_dequant.py`'s signature): the Triton
    kernel where it runs and can read the quant state, else bitsandbytes' dequantize_4bit (said once, with
    the reason). In the interpreter, whose fp32 -> bf16 cast rounds toward zero, a bf16 weight is written in
    fp32 and rounded by torch (to nearest even, as the compiled kernel and bitsandbytes round)."""
    if not kernel_serves(packed):
        return TWINS["dequantize_nf4"](packed, quant_state)
    reason = kernels()["nf4_unreadable"](quant_state)
    if reason is not None:
        _say_nf4_fallback_once(reason)
        return TWINS["dequantize_nf4"](packed, quant_state)
    if quant_state.dtype == torch.bfloat16 and not packed.is_cuda:
        return kernels()["dequantize_nf4"](packed, quant_state, dtype=torch.float32).to(torch.bfloat16)
    return kernels()["dequantize_nf4"](packed, quant_state)


@functools.cache
def _say_nf4_fallback_once(reason: str) -> None:
    logger.warning("fastvision optimized backend: the NF4 kernel cannot read a quant state (%s); running "
                   "bitsandbytes' dequantize_4bit for it instead.", reason)


def dequantized(weight, quant_state):
    """A LoRA base weight in 16 bits, as `reference.ops.lora_linear.dequantized`, through `dequantize_nf4`."""
    return weight if quant_state is None else dequantize_nf4(weight, quant_state)


def lora_linear(x, weight, quant_state, bias, lora_A, lora_B, scaling):
    """One LoRA projection (`reference/ops/lora_linear.py`); plain torch matmuls either way, so bf16 runs as
    it is in the interpreter too. The fused op dequantizes a 4-bit base with `dequantize_nf4`."""
    if not kernel_serves(x):
        return TWINS["lora_linear"](x, weight, quant_state, bias, lora_A, lora_B, scaling)
    return kernels()["lora_linear"](x, weight, quant_state, bias, lora_A, lora_B, scaling, dequantized)


def gated_lora_down(gate, up, activation, weight, quant_state, bias, lora_A, lora_B, scaling):
    """A gated MLP's activation and LoRA down projection as one op (`reference/ops/gated_lora_down.py`): the
    activation's kernel, the projection's plain torch matmuls, a 4-bit base dequantized with `dequantize_nf4`.
    The interpreter computes the activation on fp32 copies of bf16 gate and up (numpy has no bf16)."""
    if not kernel_serves(gate):
        return TWINS["gated_lora_down"](gate, up, activation, weight, quant_state, bias, lora_A, lora_B, scaling)
    kernel, projection = kernels()["gated_lora_down"], (weight, quant_state, bias, lora_A, lora_B, scaling, dequantized)
    if gate.dtype == torch.bfloat16 and not gate.is_cuda:
        return kernel(gate.float(), up.float(), activation, *projection).to(torch.bfloat16)
    return kernel(gate, up, activation, *projection)
