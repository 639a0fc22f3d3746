"""Which implementation serves an attention call: the Triton kernel on a GPU (or in Triton's
interpreter when TRITON_INTERPRET=1), otherwise the reference op — said once in the log.

A spec the kernel cannot read (a dense mask from a composition the mask builder does not know) also
goes to the reference op, so an unknown pattern is slow, never wrong.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from reference.ops import attention as reference_attention

logger = logging.getLogger("fastvision.optimized")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernel_module():
    from optimized.kernels import attention as kernel_attention

    return kernel_attention


@functools.cache
def _say_fallback_once(reason: str) -> None:
    logger.warning("fastvision optimized backend: %s; running the reference attention instead.", reason)


def kernel_serves(q: torch.Tensor, spec: reference_attention.AttentionSpec) -> bool:
    """True when the Triton kernel runs this call; False routes it to the reference op."""
    if not spec.is_structured:
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
