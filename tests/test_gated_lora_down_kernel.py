"""A gated MLP's activation and LoRA down projection as one op (`optimized/kernels/gated_lora_down.py`) against
a float64 oracle, and the memory it exists for.

Parity is FlashAttention's rule on the output and the gradients of gate, up, lora_A and lora_B, over a 16-bit
and a 4-bit (NF4) base, both activations, a bias, odd widths and ranks, and inputs that need no gradient. The
rule's reference is the twin (transformers' activation, then PEFT's projection) with its adapters in the op's
dtype, as test_lora_linear_kernel.py explains. Memory: the op keeps gate, up and r-column tensors, not
act(gate) * up, and its backward allocates one tensor of gate's size where the two ops allocate three; the
gradients are written over gate and up, never over the caller's leaves or one buffer given as both.
"""

from __future__ import annotations

import dataclasses
import os

DEVICE = os.environ.get("FASTVISION_DEVICE", "cpu")
if DEVICE == "cpu":  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from conformance.tolerances import kernel_bound  # noqa: E402
from optimized.kernels.gated_lora_down import gated_lora_down  # noqa: E402
from reference.ops.gated_lora_down import gated_lora_down as reference_gated_lora_down  # noqa: E402
from reference.ops.lora_linear import dequantized  # noqa: E402
from tests.kernel_parity import DTYPES, GPU, assert_relative_rule, hypothesis_settings  # noqa: E402

SETTINGS = hypothesis_settings(10 if GPU else 25)


@dataclasses.dataclass(frozen=True)
class Problem:
    tokens: int
    intermediate: int
    hidden: int
    rank: int
    activation: str = "silu"
    dtype: torch.dtype = DTYPES[0]
    four_bit: bool = False
    bias: bool = False
    needs: str = "both"  # which of gate and up require grad: "both", "gate", "up", "none"
    seed: int = 0

    def inputs(self):
        """gate, up (intermediate results, as an MLP's projections give them), the base and the adapters."""
        gen = torch.Generator().manual_seed(self.seed)
        gate = torch.randn(2, self.tokens, self.intermediate, generator=gen) * 3
        up = torch.randn(2, self.tokens, self.intermediate, generator=gen)
        weight = torch.randn(self.hidden, self.intermediate, generator=gen) / self.intermediate**0.5
        bias = torch.randn(self.hidden, generator=gen).to(DEVICE, self.dtype) if self.bias else None
        lora_A = torch.randn(self.rank, self.intermediate, generator=gen) / self.intermediate**0.5
        lora_B = torch.randn(self.hidden, self.rank, generator=gen) / self.rank**0.5  # trained: not zero
        weight, quant_state = weight.to(DEVICE, self.dtype), None
        if self.four_bit:
            import bitsandbytes.functional as bnb_functional

            weight, quant_state = bnb_functional.quantize_4bit(weight, quant_type="nf4")
        gate, up = (t.to(DEVICE, self.dtype) for t in (gate, up))
        adapters = [t.to(DEVICE).requires_grad_(True) for t in (lora_A, lora_B)]  # fp32, as PEFT keeps them
        return gate, up, weight, quant_state, bias, *adapters


def _run(fn, problem: Problem, gate, up, weight, quant_state, bias, lora_A, lora_B, scaling=2.0):
    """out and the gradients (gate, up where asked; lora_A, lora_B), gate and up fresh intermediate results."""
    leaves = [t.detach().clone().requires_grad_(problem.needs in ("both", name)) for t, name in
              ((gate, "gate"), (up, "up"))]
    inputs = [leaf * 1 for leaf in leaves]  # intermediate results: the op may write over them
    out = fn(*inputs, problem.activation, weight, quant_state, bias, lora_A, lora_B, scaling)
    wrt = [t for t in (*leaves, lora_A, lora_B) if t.requires_grad]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = iter(torch.autograd.grad(out, wrt, grad_out))
    return [out.detach(), *(next(grads) if t.requires_grad else None for t in (*leaves, lora_A, lora_B))]


def check_parity(problem: Problem):
    gate, up, weight, quant_state, bias, lora_A, lora_B = problem.inputs()
    ours = _run(gated_lora_down, problem, gate, up, weight, quant_state, bias, lora_A, lora_B)
    same_dtype = [t.detach().to(problem.dtype).requires_grad_(True) for t in (lora_A, lora_B)]
    yardstick = _run(reference_gated_lora_down, problem, gate, up, weight, quant_state, bias, *same_dtype)
    double = [t.detach().double().requires_grad_(True) for t in (lora_A, lora_B)]
    exact = _run(reference_gated_lora_down, problem, gate.double(), up.double(),
                 dequantized(weight, quant_state).double(), None, None if bias is None else bias.double(), *double)
    for name, got, same, truth in zip(("out", "dgate", "dup", "dA", "dB"), ours, yardstick, exact):
        assert (got is None) == (truth is None), f"{name}: asked {problem.needs}, got {got is not None}"
        if got is None:
            continue
        assert_relative_rule(name, got, same, truth, problem.dtype, problem)


@st.composite
def problems(draw, dtype):
    return Problem(
        tokens=draw(st.integers(1, 24)), intermediate=draw(st.sampled_from([16, 48]) | st.integers(4, 80).map(
            lambda n: 2 * n)), hidden=draw(st.integers(1, 40)), rank=draw(st.sampled_from([1, 8, 16])),
        activation=draw(st.sampled_from(["silu", "gelu_tanh"])), dtype=dtype, four_bit=draw(st.booleans()),
        bias=draw(st.booleans()), needs=draw(st.sampled_from(["both", "gate", "up", "none"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(data=st.data())
def test_parity_any_problem(dtype, data):
    problem = data.draw(problems(dtype))
    if problem.four_bit and problem.dtype == torch.float32:
        problem = dataclasses.replace(problem, four_bit=False)  # NF4's compute dtype is 16-bit
    check_parity(problem)


def test_parity_at_a_real_width_4bit():
    check_parity(Problem(tokens=64, intermediate=1536, hidden=256, rank=16, dtype=DTYPES[-1], four_bit=True, seed=5))


# ------------------------------------------------------------------------------------------------
# What the op keeps and allocates
# ------------------------------------------------------------------------------------------------

MEMORY = Problem(tokens=12, intermediate=96, hidden=40, rank=4)


def _intermediates(problem: Problem):
    gate, up, weight, quant_state, bias, lora_A, lora_B = problem.inputs()
    leaves = [t.clone().requires_grad_(True) for t in (gate, up)]
    return leaves, [leaf * 1 for leaf in leaves], (weight, quant_state, bias, lora_A, lora_B, 2.0)


def test_keeps_gate_up_and_r_column_tensors_not_the_activation():
    _, (gate, up), projection = _intermediates(MEMORY)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gated_lora_down(gate, up, "silu", *projection)
    wide = [t for t in saved if t.shape[-1] == MEMORY.intermediate and t.shape[0] > MEMORY.rank]
    assert len(wide) == 2 and all(t.untyped_storage().data_ptr() in {gate.data_ptr(), up.data_ptr()} for t in wide)


class _Allocations(TorchDispatchMode):
    """Tensors of at least `numel` elements that ops create (not views, not in-place results)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fresh = not func.is_view and not func._schema.is_mutable and "out" not in (kwargs or {})
        if fresh and isinstance(out, torch.Tensor) and out.numel() >= self.numel:
            self.count += 1
        return out


@pytest.mark.parametrize("fused", [True, False], ids=["one op", "two ops"])
def test_the_backward_allocates_one_tensor_of_gate_size_where_two_ops_allocate_three(fused):
    _, (gate, up), projection = _intermediates(MEMORY)
    if fused:
        out = gated_lora_down(gate, up, "silu", *projection)
    else:
        from optimized.kernels.gated_activation import gated_activation
        from optimized.kernels.lora_linear import lora_linear

        out = lora_linear(gated_activation(gate, up, "silu"), *projection)
    allocations = _Allocations(gate.numel())
    with allocations:  # the gradients of gate and up: this op's backward only
        torch.autograd.grad(out.square().sum(), [gate, up])
    assert allocations.count == (1 if fused else 3)  # act(gate) * up again; or d(product), dgate, dup


def test_gradients_are_written_over_intermediate_gate_and_up_and_match_fresh_ones():
    leaves, (gate, up), projection = _intermediates(MEMORY)
    dgate, dup = torch.autograd.grad(gated_lora_down(gate, up, "silu", *projection).sum(), [gate, up])
    assert dgate.data_ptr() == gate.data_ptr() and dup.data_ptr() == up.data_ptr()
    (want,) = torch.autograd.grad(reference_gated_lora_down(*(t * 1 for t in leaves), "silu", *projection).sum(),
                                  [leaves[0]])
    assert torch.allclose(dgate, want, atol=kernel_bound(0.0, MEMORY.dtype, grad=True))


def test_the_callers_leaves_and_one_buffer_given_twice_are_not_written_over():
    (gate, up), _, projection = _intermediates(MEMORY)
    before = gate.detach().clone(), up.detach().clone()
    gated_lora_down(gate, up, "silu", *projection).sum().backward()
    assert torch.equal(gate.detach(), before[0]) and torch.equal(up.detach(), before[1])
    both = (gate.detach() * 1).requires_grad_(True)
    (got,) = torch.autograd.grad(gated_lora_down(both * 1, both * 1, "silu", *projection).sum(), [both])
    twice = both.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(reference_gated_lora_down(twice, twice, "silu", *projection).sum(), [twice])
    assert torch.allclose(got, want, atol=kernel_bound(0.0, MEMORY.dtype, grad=True))


def test_a_graph_kept_for_a_second_backward_fails_in_autograd_instead_of_reading_gradients():
    _, (gate, up), projection = _intermediates(MEMORY)
    loss = gated_lora_down(gate, up, "silu", *projection).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
