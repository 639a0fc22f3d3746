"""A LoRA linear layer as one autograd op: the twin of `reference/ops/lora_linear.py`.

PEFT runs a LoRA projection as three modules: the (4-bit) base layer, then a copy of its output
("defensively", for bitsandbytes), then the low-rank path with the input cast to the adapters' fp32, two
fp32 matmuls without tensor cores and a cast back. On Llava-1.5-7B widths (4 x 2,000 tokens, H200) that
is 16 ms a step of fp32 FFMA GEMMs and most of 45 ms of copies and casts, against 13.5 ms of copies for
Unsloth's fused projections (benchmarks/results/finetune-profile-nvidia-h200/llava-*-4bit.txt).

Here the whole projection runs in the base's compute dtype (bf16) on tensor cores, the fp32 adapters
cast to it per call (r x in values: 65k for r=16 at 4,096), and the output is written once:
  forward:  y = x W^T (+ b) + s (x A^T) B^T      saves x (the layer input, usually held anyway) and
                                                 x A^T (tokens x r); not the 16-bit W
  backward: da = dy B;  dB = s dy^T (x A^T);  dA = s da^T x;  dx = dy W + s da A, W dequantized again
            (A and B in 16 bits saved from the forward, not cast again)
The adapters' gradients are bf16 matmuls (fp32 accumulation) returned in fp32; PEFT's are fp32 matmuls
of the same bf16 activations, so the two differ by bf16 rounding of the gradient (2^-9 relative).

A 4-bit base is dequantized by the `dequantize` the caller passes (weight, quant_state) -> 16-bit weight:
`optimized.ops` passes its NF4 op (the Triton kernel of `nf4_dequant.py`, bit-exact with bitsandbytes'
dequantize_4bit, so the results are the same bits); the default is bitsandbytes' own, as the reference
twin runs. A kernel file imports no `optimized.ops`, so the choice is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from reference.ops.lora_linear import dequantized


class Projection(NamedTuple):
    """A frozen base (16-bit, or 4-bit with its quant state) and one LoRA pair, computed in `dtype`."""

    weight: torch.Tensor
    quant_state: object
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dtype: torch.dtype
    dequantize: Callable

    def base(self) -> torch.Tensor:
        """The base weight (out, in) in `dtype`, a 4-bit one dequantized (again, in a backward)."""
        return self.dequantize(self.weight, self.quant_state).to(self.dtype)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor, quant_state) -> torch.dtype:
    """The base's compute dtype, or the autocast dtype under autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return quant_state.dtype if quant_state is not None else weight.dtype


def project(x: torch.Tensor, p: Projection):
    """(out, low, a, b) for x (tokens, in) in p.dtype: out = x W^T (+ bias) + s (x A^T) B^T, low = x A^T, and
    the adapters in p.dtype (what a backward needs of them)."""
    a, b = p.lora_A.to(p.dtype), p.lora_B.to(p.dtype)
    low = x @ a.T  # (tokens, r)
    base = p.base().T
    out = x @ base if p.bias is None else torch.addmm(p.bias.to(p.dtype), x, base)
    out.addmm_(low, b.T, alpha=p.scaling)
    return out, low, a, b


def adapter_grads(grad_out, x, low, a, b, p: Projection, need_A: bool, need_B: bool):
    """(grad_low, dA, dB): grad_low = dy B, unscaled; the adapters' gradients in their own dtype (None where not
    needed), the scaling applied by the multiply that writes them."""
    grad_low = grad_out @ b  # (tokens, r)
    grad_A = grad_B = None
    if need_A:
        grad_A = torch.mul(grad_low.T @ x, p.scaling, out=torch.empty(a.shape, dtype=p.lora_A.dtype, device=a.device))
    if need_B:
        grad_B = torch.mul(grad_out.T @ low, p.scaling, out=torch.empty(b.shape, dtype=p.lora_B.dtype, device=b.device))
    return grad_low, grad_A, grad_B


def input_grad(grad_out, grad_low, a, p: Projection, out: torch.Tensor | None = None) -> torch.Tensor:
    """dx = dy W + s grad_low A, written into `out` where given (a dead buffer of dx's shape and dtype)."""
    grad_x = torch.mm(grad_out, p.base(), out=out)
    return grad_x.addmm_(grad_low, a, alpha=p.scaling)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, p: Projection):
        x = x.to(p.dtype)
        out, low, a, b = project(x, p)
        # The adapters in 16 bits, saved rather than cast again in the backward (r x (in + out) values).
        ctx.save_for_backward(x, low, a, b)
        ctx.projection = p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # 7 kernels (11 before 2026-12-08): the scaling rides on addmm's alpha and on the multiply that also
        # writes the adapters' gradients in their dtype.
        x, low, a, b = ctx.saved_tensors
        p = ctx.projection
        grad_out = grad_out.to(p.dtype)
        grad_low, grad_A, grad_B = adapter_grads(grad_out, x, low, a, b, p, *ctx.needs_input_grad[1:3])
        grad_x = input_grad(grad_out, grad_low, a, p) if ctx.needs_input_grad[0] else None
        return grad_x, grad_A, grad_B, None


def lora_linear(x, weight, quant_state, bias, lora_A, lora_B, scaling: float, dequantize=dequantized) -> torch.Tensor:
    """base(x) + scaling * lora_B(lora_A(x)), as `reference.ops.lora_linear.lora_linear`, in one op: in the
    base's compute dtype (the autocast dtype under autocast), the result in x's dtype. The base weight and
    bias are frozen: no gradient reaches them. `dequantize(weight, quant_state)` gives a 4-bit base in 16 bits
    (and returns a 16-bit one, quant_state None, as it is)."""
    p = Projection(weight, quant_state, bias, lora_A, lora_B, float(scaling), compute_dtype(x, weight, quant_state),
                   dequantize)
    shape = x.shape
    with torch.autocast(x.device.type, enabled=False):
        out = _LoraLinear.apply(x.reshape(-1, shape[-1]), lora_A, lora_B, p)
    return out.reshape(*shape[:-1], out.shape[-1]).to(x.dtype)


__all__ = ["Projection", "adapter_grads", "compute_dtype", "input_grad", "lora_linear", "project"]
