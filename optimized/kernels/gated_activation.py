"""Fused gated activation in Triton, act(gate) * up: the twin of `reference/ops/gated_activation.py`.

transformers' gated MLPs (Llama, Mistral, Qwen2, Qwen2-VL and Qwen2.5-VL text and vision: silu; Gemma3:
gelu_pytorch_tanh) run `act_fn(gate_proj(x)) * up_proj(x)` as two kernels each way. At 8000 tokens x 11008
(176 MB a bf16 tensor) that moves 5 tensors forward (read gate; write act; read act, up; write out) and
~9 backward; fused it is 3 forward (read gate, up; write out) and 5 backward (read gate, up, grad; write
dgate, dup). Only gate and up are saved: act(gate) is recomputed in the backward, not stored.

Both activations are g * sigmoid(k(g)), with k(g) = g for silu and k(g) = 2 sqrt(2/pi) (g + 0.044715 g^3)
for gelu_tanh (since 0.5 (1 + tanh(y)) = sigmoid(2y)), so one formula serves both, act' = s (1 + g k' (1 - s))
with s = sigmoid(k), all from one exp(-|k|). No tanh is needed (Triton 3.8's tl.math has none), and none
of PyTorch's 1 + tanh(y) cancellation: for gelu at g = -5.23 PyTorch's fp32 result is -0.0, ours -4.69e-8 (the
float64 value). The math is fp32 per element; act(g) is rounded to the inputs' dtype before the product,
as transformers' separate ACT2FN tensor is, so a 16-bit output equals transformers' except where the two
fp32 act(g) (each within a few ulp, or PyTorch's cancelled gelu tail) straddle a rounding midpoint.

Layout follows the Triton tutorial: `@triton.jit` helpers and kernels, launchers, the autograd Function,
the public `gated_activation`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimized.kernels.launch import cdiv, compiled_or_interpreted
from optimized.kernels.launch import launch as _launch
from reference.ops.gated_activation import check_activation

_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_KAPPA = 0.044715

_GELU_K = tl.constexpr(2.0 * _GELU_C)  # k(g) = 2 sqrt(2/pi) g (1 + KAPPA g^2); k'(g) = same (1 + 3 KAPPA g^2)
_KAPPA_C = tl.constexpr(_KAPPA)
_KAPPA3 = tl.constexpr(3.0 * _KAPPA)
# Past |g| = 100 act'(g) is exactly 1 (g > 0) or 0 (g < 0) in fp32: silu's s (1 - s) is e^-100 ~ 4e-44,
# gelu's k(g) is past 1e4. Taking those values there keeps gelu's g k'(g) (~0.2 g^3, inf past |g| ~ 1e13)
# from meeting s = 0 as inf * 0 = NaN.
_SATURATED = tl.constexpr(100.0)


# ----------------------------------------------------------------------------------------------
# Elementwise math, shared by both kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gate_terms(g, GELU: tl.constexpr):
    """(k(g) >= 0, e = exp(-|k(g)|)), from which act(g) = g sigmoid(k(g)) and act'(g) follow.

    e lies in (0, 1]: no overflow (exp(-k) would at silu's g = -89: e^89 > 3.4e38), and both sigmoid(k) and
    1 - sigmoid(k) come out without cancellation (1 - s near s = 1 loses every digit below 6e-8)."""
    if GELU:
        k = g * (1.0 + _KAPPA_C * g * g) * _GELU_K
    else:
        k = g
    return k >= 0, tl.exp(-tl.abs(k))


@triton.jit
def _rounded_act(g, k_pos, e, dtype: tl.constexpr):
    """act(g) rounded to the tensors' dtype and back: the value transformers' ACT2FN tensor holds.
    For k >= 0 this is PyTorch's own silu expression, x / (1 + exp(-x)); below, (g e) / (1 + e)."""
    return (tl.where(k_pos, g, g * e) / (1.0 + e)).to(dtype).to(tl.float32)


@triton.jit
def _act_grad(g, k_pos, e, GELU: tl.constexpr):
    """act'(g) = s (1 + g k'(g) (1 - s)), s = sigmoid(k(g)), in fp32."""
    r = 1.0 / (1.0 + e)
    s = tl.where(k_pos, r, e * r)
    one_minus_s = tl.where(k_pos, e * r, r)
    if GELU:
        dk = _GELU_K * (1.0 + _KAPPA3 * g * g)
    else:
        dk = 1.0
    d = s * (1.0 + g * dk * one_minus_s)
    return tl.where(tl.abs(g) > _SATURATED, (g > 0).to(tl.float32), d)  # NaN stays NaN: |NaN| > x is False


@triton.jit
def _load(ptr, offs, n, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < n, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _store(ptr, offs, x, n, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=offs < n)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Kernels: one program per BLOCK elements of the flattened tensors
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(Gate, Up, Out, offs, n, GELU: tl.constexpr, MASKED: tl.constexpr):
    g = _load(Gate, offs, n, MASKED)
    u = _load(Up, offs, n, MASKED)
    k_pos, e = _gate_terms(g, GELU)
    _store(Out, offs, _rounded_act(g, k_pos, e, Out.dtype.element_ty) * u, n, MASKED)


@triton.jit
def _gated_fwd_kernel(Gate, Up, Out, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    # Only the last program masks: a mask of `offs < n` with n not a multiple of 16 has no constancy
    # Triton can prove, and would turn every 16-byte vector load into 8 scalar ones.
    # 64-bit offsets: int32 would overflow past 2^31 elements (150k tokens x 14336); free in a memory-bound kernel.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if (pid + 1) * BLOCK <= n:
        _fwd_block(Gate, Up, Out, offs, n, GELU, False)
    else:
        _fwd_block(Gate, Up, Out, offs, n, GELU, True)


@triton.jit
def _bwd_block(Gate, Up, dOut, dGate, dUp, offs, n, GELU: tl.constexpr, NEED_DGATE: tl.constexpr,
               NEED_DUP: tl.constexpr, MASKED: tl.constexpr):
    # Every load before any store: dGate and dUp may be Gate and Up themselves (launch_backward's in_place).
    g = _load(Gate, offs, n, MASKED)
    dy = _load(dOut, offs, n, MASKED)
    k_pos, e = _gate_terms(g, GELU)
    if NEED_DGATE:  # d(gate) = grad * up * act'(g), one rounding at the end (PyTorch rounds grad * up first)
        dgate = dy * _load(Up, offs, n, MASKED) * _act_grad(g, k_pos, e, GELU)
    if NEED_DUP:  # d(up) = grad * act(g), act(g) rounded as the forward's product saw it
        _store(dUp, offs, dy * _rounded_act(g, k_pos, e, dUp.dtype.element_ty), n, MASKED)
    if NEED_DGATE:
        _store(dGate, offs, dgate, n, MASKED)


@triton.jit
def _gated_bwd_kernel(Gate, Up, dOut, dGate, dUp, n, GELU: tl.constexpr, NEED_DGATE: tl.constexpr,
                      NEED_DUP: tl.constexpr, IN_PLACE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if IN_PLACE:  # stores through the very pointers the loads read, whatever the compiler assumes of aliasing
        dGate, dUp = Gate, Up
    if (pid + 1) * BLOCK <= n:
        _bwd_block(Gate, Up, dOut, dGate, dUp, offs, n, GELU, NEED_DGATE, NEED_DUP, False)
    else:
        _bwd_block(Gate, Up, dOut, dGate, dUp, offs, n, GELU, NEED_DGATE, NEED_DUP, True)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

# 1024 elements and 4 warps: 8 bf16 (one 16-byte load) per thread per tensor. Little's law for an H100
# (3.0 TB/s x ~0.7 us latency / 132 SMs) wants ~16 KB in flight per SM; 16 resident programs of 4 KB of
# loads each (gate + up, bf16) give 64 KB. Reasoned, not swept: no GPU was at hand when this was written.
# The interpreter pays ~18 ms of numpy per program whatever its block, so there 4096: a zoo model's MLP
# (~60k elements) runs 15 programs instead of 59, and the kernel tests' widths still span several blocks.
_BLOCK = 1024
_INTERPRETER_BLOCK = 4096
_NUM_WARPS = 4
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)



def check_inputs(gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    """ValueError unless activation is accepted and gate and up share one shape, dtype and device."""
    check_activation(activation)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape; got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype not in _DTYPES or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must share one of float16, bfloat16, float32; got {gate.dtype}, {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"gate and up must be on one device; got {gate.device} and {up.device}")


def _block(device: torch.device) -> int:
    return compiled_or_interpreted(device, _BLOCK, _INTERPRETER_BLOCK)


def launch_forward(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(gate) * up for contiguous gate and up of one shape, dtype and device, in a new tensor."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = _block(gate.device)
        _launch(_gated_fwd_kernel, (cdiv(n, block),), gate, up, out, n, GELU=gelu, BLOCK=block,
                num_warps=_NUM_WARPS)
    return out


def launch_backward(gate, up, grad_out, gelu: bool, need_dgate: bool, need_dup: bool, in_place: bool = False):
    """(dgate, dup), each None where not needed, for contiguous gate, up and grad_out; with `in_place` they are
    written over gate and up (a program reads each element before it writes it). The kernel's own autograd
    Function never does that: its inputs may be the caller's tensors (`gated_lora_down.py` does, where they are
    the MLP's own)."""
    dgate = (gate if in_place else torch.empty_like(gate)) if need_dgate else None
    dup = (up if in_place else torch.empty_like(up)) if need_dup else None
    n = gate.numel()
    if n and (need_dgate or need_dup):
        # A gradient not asked for gets a placeholder pointer of the right dtype that is never written.
        block = _block(gate.device)
        _launch(_gated_bwd_kernel, (cdiv(n, block),), gate, up, grad_out,
                gate if dgate is None else dgate, up if dup is None else dup, n, GELU=gelu,
                NEED_DGATE=need_dgate, NEED_DUP=need_dup, IN_PLACE=in_place, BLOCK=block, num_warps=_NUM_WARPS)
    return dgate, dup


# ----------------------------------------------------------------------------------------------
# Autograd and the public function
# ----------------------------------------------------------------------------------------------


class _GatedActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, gelu: bool):
        # gate_proj(x) and up_proj(x) come out contiguous: these are no-ops in the MLPs this serves.
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return launch_forward(gate, up, gelu)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        need_dgate, need_dup = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dgate, dup = launch_backward(gate, up, grad_out.contiguous(), ctx.gelu, need_dgate, need_dup)
        return dgate, dup, None


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up in the inputs' dtype, differentiable in gate and up; returns a contiguous tensor of
    gate's shape.

    The kernel twin of `reference.ops.gated_activation.gated_activation`: activation "silu" or
    "gelu_tanh" (ValueError otherwise); gate and up of one shape, dtype (float16, bfloat16, float32) and
    device.
    """
    check_inputs(gate, up, activation)
    return _GatedActivationFunction.apply(gate, up, activation == "gelu_tanh")


__all__ = ["check_inputs", "gated_activation", "launch_backward", "launch_forward"]
