"""A gated MLP's activation and its LoRA down projection as one op, down(act(gate) * up): the twin of
`reference/ops/gated_lora_down.py`.

Run as two ops (the gated activation, then the LoRA projection), a replayed layer's backward holds five
tensors of tokens x intermediate when the activation's backward writes its gradients: gate and up (which it
saved), the gradient of act(gate) * up, and dgate and dup; the projection had also saved act(gate) * up itself
for its dA. At Llava-1.5-7B widths on 8,000 tokens each is 176 MB, and that moment is the step's peak (CPU
tracking of live tensors at proportional widths). Here:
  forward:  h = act(gate) * up (the Triton kernel), then the LoRA projection of h; saves gate, up and
            h A^T (tokens x r), not h;
  backward: h again (the kernel), dA from it, then dh = dy W + s (dy B) A written into h's buffer, then the
            activation's backward written over gate and up: three such tensors at most, not five.

gate and up are overwritten by their own gradients in the backward, as Liger's and Unsloth's fused SwiGLU
backward do: pass tensors nothing reads afterwards (the MLP's gate_proj and up_proj outputs, which the
optimized backend's gated MLP forward passes). Leaves, and gate and up that share memory, are never
overwritten. The written tensors' version counters move, so a graph kept for a second backward fails in
autograd's own check instead of reading gradients as activations.
"""

from __future__ import annotations

import torch

from optimized.kernels import gated_activation as gated
from optimized.kernels.lora_linear import Projection, adapter_grads, compute_dtype, input_grad, project
from reference.ops.lora_linear import dequantized


class _GatedLoraDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, lora_A, lora_B, p: Projection, gelu: bool, overwrite: bool):
        gate, up = gate.contiguous(), up.contiguous()
        h = gated.launch_forward(gate, up, gelu)
        out, low, a, b = project(h.to(p.dtype), p)
        ctx.save_for_backward(gate, up, low, a, b)
        ctx.projection, ctx.gelu, ctx.overwrite = p, gelu, overwrite
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, low, a, b = ctx.saved_tensors
        p = ctx.projection
        grad_out = grad_out.to(p.dtype)
        h = gated.launch_forward(gate, up, ctx.gelu).to(p.dtype)
        grad_low, grad_A, grad_B = adapter_grads(grad_out, h, low, a, b, p, *ctx.needs_input_grad[2:4])
        need_dgate, need_dup = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dgate or need_dup):
            return None, None, grad_A, grad_B, None, None, None
        grad_h = input_grad(grad_out, grad_low, a, p, out=h)  # h is dead: its buffer takes dh
        dgate, dup = gated.launch_backward(gate, up, grad_h.to(gate.dtype), ctx.gelu, need_dgate, need_dup,
                                           in_place=ctx.overwrite)
        if ctx.overwrite:
            for written in (dgate, dup):
                if written is not None:
                    torch.autograd.graph.increment_version(written)
        return dgate, dup, grad_A, grad_B, None, None, None


def gated_lora_down(gate, up, activation: str, weight, quant_state, bias, lora_A, lora_B, scaling: float,
                    dequantize=dequantized) -> torch.Tensor:
    """down(act(gate) * up) for a LoRA down projection, as `reference.ops.gated_lora_down.gated_lora_down`:
    activation "silu" or "gelu_tanh"; gate and up (..., intermediate) of one shape, dtype and device; the
    projection as `lora_linear` takes it (frozen base, `dequantize` for a 4-bit one). The projection runs in
    the base's compute dtype (the autocast dtype under autocast); the result is in gate's dtype. The backward
    writes the gradients of gate and up over them (see the module docstring)."""
    gated.check_inputs(gate, up, activation)
    # Never the caller's own leaves (a reshaped leaf is a view with a grad_fn: decided here, before that), nor
    # one buffer for both gradients.
    overwrite = not (gate.is_leaf or up.is_leaf) and gate.untyped_storage().data_ptr() != \
        up.untyped_storage().data_ptr()
    p = Projection(weight, quant_state, bias, lora_A, lora_B, float(scaling), compute_dtype(gate, weight, quant_state),
                   dequantize)
    shape = gate.shape
    with torch.autocast(gate.device.type, enabled=False):
        out = _GatedLoraDown.apply(gate.reshape(-1, shape[-1]), up.reshape(-1, shape[-1]), lora_A, lora_B, p,
                                   activation == "gelu_tanh", overwrite)
    return out.reshape(*shape[:-1], out.shape[-1]).to(gate.dtype)


__all__ = ["gated_lora_down"]
