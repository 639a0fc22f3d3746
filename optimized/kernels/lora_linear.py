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

import torch

from reference.ops.lora_linear import dequantized


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, quant_state, bias, lora_A, lora_B, scaling: float, dtype: torch.dtype, dequantize):
        x = x.to(dtype)
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        low = x @ a.T  # (tokens, r)
        base = dequantize(weight, quant_state).to(dtype).T
        out = x @ base if bias is None else torch.addmm(bias.to(dtype), x, base)
        out.addmm_(low, b.T, alpha=scaling)
        # The adapters in 16 bits, saved rather than cast again in the backward (r x (in + out) values).
        ctx.save_for_backward(x, low, a, b)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.dequantize = weight, quant_state, scaling, dequantize
        ctx.adapter_dtypes = lora_A.dtype, lora_B.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # 8 launches (12 before 2026-12-08): the scaling rides on addmm's alpha and on the multiply that also
        # writes the adapters' gradients in their dtype.
        x, low, a, b = ctx.saved_tensors
        dtype, scaling = x.dtype, ctx.scaling
        grad_out = grad_out.to(dtype)
        grad_low = grad_out @ b  # (tokens, r), unscaled
        grad_A = grad_B = grad_x = None
        if ctx.needs_input_grad[4]:
            grad_A = torch.mul(grad_low.T @ x, scaling, out=torch.empty(a.shape, dtype=ctx.adapter_dtypes[0],
                                                                         device=a.device))
        if ctx.needs_input_grad[5]:
            grad_B = torch.mul(grad_out.T @ low, scaling, out=torch.empty(b.shape, dtype=ctx.adapter_dtypes[1],
                                                                           device=b.device))
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.dequantize(ctx.weight, ctx.quant_state).to(dtype)
            grad_x.addmm_(grad_low, a, alpha=scaling)
        return grad_x, None, None, None, grad_A, grad_B, None, None, None


def lora_linear(x, weight, quant_state, bias, lora_A, lora_B, scaling: float, dequantize=dequantized) -> torch.Tensor:
    """base(x) + scaling * lora_B(lora_A(x)), as `reference.ops.lora_linear.lora_linear`, in one op: in the
    base's compute dtype (the autocast dtype under autocast), the result in x's dtype. The base weight and
    bias are frozen: no gradient reaches them. `dequantize(weight, quant_state)` gives a 4-bit base in 16 bits
    (and returns a 16-bit one, quant_state None, as it is)."""
    dtype = quant_state.dtype if quant_state is not None else weight.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    shape = x.shape
    with torch.autocast(x.device.type, enabled=False):
        out = _LoraLinear.apply(x.reshape(-1, shape[-1]), weight, quant_state, bias, lora_A, lora_B, float(scaling),
                                dtype, dequantize)
    return out.reshape(*shape[:-1], out.shape[-1]).to(x.dtype)


__all__ = ["lora_linear"]
