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
  backward: da = s dy B;  dB = s dy^T (x A^T);  dA = da^T x;  dx = dy W + da A, W dequantized again
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
        out = x @ dequantize(weight, quant_state).to(dtype).T
        if bias is not None:
            out += bias.to(dtype)
        out.addmm_(low, b.T, alpha=scaling)
        ctx.save_for_backward(x, low, lora_A, lora_B)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.dequantize = weight, quant_state, scaling, dequantize
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, low, lora_A, lora_B = ctx.saved_tensors
        dtype, scaling = x.dtype, ctx.scaling
        grad_out = grad_out.to(dtype)
        grad_low = (grad_out @ lora_B.to(dtype)).mul_(scaling)  # (tokens, r)
        grad_A = (grad_low.T @ x).to(lora_A.dtype) if ctx.needs_input_grad[4] else None
        grad_B = (grad_out.T @ low).mul_(scaling).to(lora_B.dtype) if ctx.needs_input_grad[5] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.dequantize(ctx.weight, ctx.quant_state).to(dtype)
            grad_x.addmm_(grad_low, lora_A.to(dtype))
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
