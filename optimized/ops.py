"""Which implementation serves each op: the Triton kernel on a GPU (or in Triton's interpreter when
TRITON_INTERPRET=1), otherwise the reference op — said once in the log. Every op here has the signature
of its plain-PyTorch twin in `reference/ops/`.

A spec the kernel cannot read (a dense mask from a composition the mask builder does not know) also
goes to the reference op, so an unknown pattern is slow, never wrong.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

from reference.ops import attention as reference_attention

logger = logging.getLogger("fastvision.optimized")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernel_module(name: str = "attention"):
    return importlib.import_module(f"optimized.kernels.{name}")


@functools.cache
def _reference_module(name: str):
    return importlib.import_module(f"reference.ops.{name}")


@functools.cache
def _say_fallback_once(reason: str) -> None:
    logger.warning("fastvision optimized backend: %s; running the reference ops (plain PyTorch) instead.", reason)


def kernel_serves(q: torch.Tensor, spec: reference_attention.AttentionSpec | None = None) -> bool:
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
    """The optimized backend's attention op: same signature as `reference.ops.attention.attention`."""
    if not kernel_serves(q, spec):
        return reference_attention.attention(q, k, v, spec)
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        # Triton's interpreter computes tl.dot through numpy, which has no bf16: bf16 operands come back as
        # garbage (errors ~1e9). On the CPU the kernel therefore runs on fp32 copies; the GPU runs bf16.
        out = _kernel_module().attention(q.float(), k.float(), v.float(), spec)
        return out.to(torch.bfloat16)
    return _kernel_module().attention(q, k, v, spec)


def _on_kernel(name: str, function: str, *tensors, in_input_dtype: bool = True, **kwargs):
    """The kernel `optimized.kernels.<name>.<function>` where it can run, else its reference twin. On the
    CPU the interpreter gets fp32 copies of bf16 inputs (numpy has no bf16) and, where the op's results
    are in its input dtype (`in_input_dtype`; the loss is fp32 whatever the logits), they are cast back."""
    if not kernel_serves(tensors[0]):
        return getattr(_reference_module(name), function)(*tensors, **kwargs)
    kernel = getattr(_kernel_module(name), function)
    if tensors[0].dtype != torch.bfloat16 or tensors[0].is_cuda:
        return kernel(*tensors, **kwargs)
    result = kernel(*(t.float() if t.is_floating_point() else t for t in tensors), **kwargs)
    if not in_input_dtype:
        return result
    return tuple(r.to(torch.bfloat16) for r in result) if isinstance(result, tuple) else result.to(torch.bfloat16)


def rms_norm(x, weight, eps, *, gemma=False):
    return _on_kernel("rmsnorm", "rms_norm", x, weight, eps=eps, gemma=gemma)


def gated_activation(gate, up, activation):
    return _on_kernel("gated_activation", "gated_activation", gate, up, activation=activation)


def apply_rotary(q, k, cos, sin, unsqueeze_dim=1):
    return _on_kernel("rope", "apply_rotary", q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                   **kwargs):
    return _on_kernel("cross_entropy", "causal_lm_loss", logits, labels, in_input_dtype=False, vocab_size=vocab_size,
                      num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, shift_labels=shift_labels,
                      **kwargs)


def linear_causal_lm_loss(hidden, weight, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                          shift_labels=None, **kwargs):
    return _on_kernel("linear_cross_entropy", "linear_causal_lm_loss", hidden, weight, labels, in_input_dtype=False,
                      vocab_size=vocab_size, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                      shift_labels=shift_labels, **kwargs)


def lora_linear(x, weight, quant_state, bias, lora_A, lora_B, scaling):
    """One LoRA projection (`reference/ops/lora_linear.py`); plain torch matmuls either way, so bf16 runs as
    it is in the interpreter too."""
    module = _kernel_module("lora_linear") if kernel_serves(x) else _reference_module("lora_linear")
    return module.lora_linear(x, weight, quant_state, bias, lora_A, lora_B, scaling)
