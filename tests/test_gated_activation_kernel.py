"""The fused gated-activation kernel against a float64 oracle, by FlashAttention's rule.

For out = act(gate) * up, dgate and dup: error(kernel, oracle) <= kernel_bound(error(reference twin in the
same dtype, oracle), dtype). The twin itself must be transformers' ACT2FN[...](gate) * up bit for bit. On
the CPU the kernels run in Triton's interpreter in float32 and float16 (the interpreter truncates fp32 ->
bf16 instead of rounding to nearest, so bf16 is the GPU's); with FASTVISION_DEVICE=cuda the same tests run
compiled, in bfloat16 and float16, at an MLP's real size (8000 tokens x 11008).
"""

from __future__ import annotations

import dataclasses
import os

DEVICE = os.environ.get("FASTVISION_DEVICE", "cpu")
if DEVICE == "cpu":  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from conformance.tolerances import kernel_bound  # noqa: E402
from optimized.kernels.gated_activation import gated_activation  # noqa: E402
from reference.ops.gated_activation import activation_name  # noqa: E402
from reference.ops.gated_activation import gated_activation as reference_gated_activation  # noqa: E402
from tests.kernel_parity import DTYPES, GPU, error, hypothesis_settings, reference_error  # noqa: E402

ACTIVATIONS = ("silu", "gelu_tanh")
# Last-dim widths around the kernel's 1024-element block (and MLP widths on the GPU); leading dims <= 5.
WIDTHS = (1, 1000, 3420, 11008, 14336) if GPU else (1, 7, 1023, 1024, 1025)
MAX_WIDTH = 20000 if GPU else 1500
# Named sizes: Llama-7B / Qwen2-VL-7B text MLP (8000 tokens x 11008) and a Qwen2.5-VL vision MLP (3420).
SIZES = ((8000, 11008), (2, 1031, 3420)) if GPU else ((5000,), (3, 17, 129))
# Gate magnitudes: O(1), and up to 20 where sigmoid(k(g)) and gelu's tanh saturate in fp32.
GATE_RANGES = (1.0, 6.0, 20.0)
EXAMPLES = 10 if GPU else 60  # per dtype; an interpreter example costs ~10-100 ms
SETTINGS = hypothesis_settings(EXAMPLES)


@dataclasses.dataclass(frozen=True)
class Problem:
    shape: tuple
    activation: str
    dtype: torch.dtype = DTYPES[0]
    gate_range: float = 20.0
    seed: int = 0
    needs: str = "both"  # which inputs require grad: "both", "gate", "up"
    transposed: bool = False  # gate and up as transposed (non-contiguous) views

    def tensors(self):
        """gate uniform in [-gate_range, gate_range]; up and grad standard normal; on DEVICE in dtype."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = self.shape[:-2] + self.shape[-2:][::-1] if self.transposed else self.shape

        def make(t):
            t = t.to(device=DEVICE, dtype=self.dtype)
            return t.transpose(-1, -2) if self.transposed else t

        gate = make((torch.rand(shape, generator=gen) * 2 - 1) * self.gate_range)
        up = make(torch.randn(shape, generator=gen))
        grad = torch.randn(self.shape, generator=gen).to(device=DEVICE, dtype=self.dtype)
        return gate, up, grad


def _oracle(gate, up, grad, activation):
    """out, dgate, dup in float64 from the same (rounded) inputs, by PyTorch's float64 ops and autograd."""
    g, u = (t.detach().double().requires_grad_(True) for t in (gate, up))
    act = F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")
    out = act * u
    return (out.detach(), *torch.autograd.grad(out, (g, u), grad.double()))


def _run(fn, gate, up, grad, needs: str):
    """out and the gradients of the inputs that require grad ((out, dgate, dup), None where not asked)."""
    leaves = [t.detach().clone().requires_grad_(needs in ("both", name)) for t, name in ((gate, "gate"), (up, "up"))]
    out = fn(*leaves)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad))
    return out, *(next(grads) if t.requires_grad else None for t in leaves)


def check_parity(problem: Problem, tensors=None):
    """Asserts the rule for out, dgate, dup (those asked for); returns the kernel's (out, dgate, dup)."""
    gate, up, grad = tensors if tensors is not None else problem.tensors()
    act, dtype = problem.activation, problem.dtype
    ours = _run(lambda g, u: gated_activation(g, u, act), gate, up, grad, problem.needs)
    ref = _run(lambda g, u: reference_gated_activation(g, u, act), gate, up, grad, problem.needs)
    exact = _oracle(gate, up, grad, act)
    assert ours[0].dtype == dtype and ours[0].shape == gate.shape and ours[0].is_contiguous()
    for name, mine, theirs, truth, is_grad in zip(("out", "dgate", "dup"), ours, ref, exact, (0, 1, 1)):
        assert (mine is None) == (theirs is None), f"{name}: kernel and twin disagree on needing it"
        if mine is None:
            continue
        assert mine.dtype == dtype and mine.shape == gate.shape, f"{name}: {mine.dtype} {tuple(mine.shape)}"
        err, ref_err = error(mine, truth), reference_error(theirs, truth)
        bound = kernel_bound(ref_err, dtype, grad=bool(is_grad))
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (reference {ref_err:.3e}); {problem}"
    return ours


# ------------------------------------------------------------------------------------------------
# Parity with the float64 oracle
# ------------------------------------------------------------------------------------------------


@st.composite
def problems(draw, dtype: torch.dtype):
    ndim = draw(st.integers(1, 3))
    leading = tuple(draw(st.integers(1, 5)) for _ in range(ndim - 1))
    shape = (*leading, draw(st.sampled_from(WIDTHS) | st.integers(1, MAX_WIDTH)))
    return Problem(
        shape=shape, activation=draw(st.sampled_from(ACTIVATIONS)), dtype=dtype,
        gate_range=draw(st.sampled_from(GATE_RANGES)), seed=draw(st.integers(0, 2**31 - 1)),
        needs=draw(st.sampled_from(["both", "gate", "up"])), transposed=ndim > 1 and draw(st.booleans()),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(data=st.data())
def test_parity_any_shape(dtype, data):
    check_parity(data.draw(problems(dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SIZES, ids=str)
def test_parity_mlp_sizes(shape, activation, dtype):
    check_parity(Problem(shape=shape, activation=activation, dtype=dtype, gate_range=6.0, seed=len(shape)))


# At 1e30 the interpreter's numpy warns of gelu's g^3 = inf and of inf * 0 in lanes the kernel discards.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_extreme_gates_stay_finite(activation):
    """fp32 gates of +-80 (exp(80) = 5.5e34, near fp32's 3.4e38) and +-1e30 (gelu's g^3 overflows; PyTorch's
    own gelu backward is NaN there): every output finite and within the rule of the oracle."""
    gate = torch.tensor([-1e30, -80.0, -20.0, -5.0, 0.0, 5.0, 20.0, 80.0, 1e30], device=DEVICE)
    up = torch.linspace(-2.0, 2.0, gate.numel(), device=DEVICE)
    grad = torch.linspace(1.5, -1.5, gate.numel(), device=DEVICE)
    problem = Problem(shape=tuple(gate.shape), activation=activation, dtype=torch.float32)
    for name, t in zip(("out", "dgate", "dup"), check_parity(problem, (gate, up, grad))):
        assert torch.isfinite(t).all(), f"{name} not finite: {t.tolist()}"


# Elements whose float64 act(g) lies within this relative distance of a 16-bit rounding midpoint are left
# out below: the kernel's fp32 act(g) is within a few ulp (~4e-7 relative on the CPU, ~1e-6 with the GPU's
# ex2.approx at |k| = 25) and could round either way there. 1e-4 keeps 70-80% of fp16 elements (ulp 5e-4 to
# 1e-3 relative) and ~95% of bf16's: thousands, enough to fail a kernel that skips the rounding.
_MIDPOINT_MARGIN = 1e-4


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_is_rounded_to_dtype_before_the_product(activation, dtype):
    """transformers materializes act(gate) in the dtype before multiplying by up; the kernel rounds it the
    same way, in out = round(round(act) * up) and dup = round(grad * round(act)), exactly."""
    gate, up, grad = Problem(shape=(SIZES[0][-1],), activation=activation, dtype=dtype, gate_range=6.0).tensors()
    exact_act = _oracle(gate, torch.ones_like(up), grad, activation)[0]
    rounded = exact_act.to(dtype)
    safe = (exact_act * (1 - _MIDPOINT_MARGIN)).to(dtype).eq(rounded) & (exact_act * (1 + _MIDPOINT_MARGIN)).to(
        dtype).eq(rounded)
    out, _, dup = _run(lambda g, u: gated_activation(g, u, activation), gate, up, grad, "both")
    assert out[safe].equal((rounded.double() * up.double()).to(dtype)[safe])
    assert dup[safe].equal((grad.double() * rounded.double()).to(dtype)[safe])


# ------------------------------------------------------------------------------------------------
# The twin is transformers' own computation; names; errors; autograd bookkeeping
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("hidden_act", ["silu", "swish", "gelu_pytorch_tanh"])
def test_twin_matches_transformers_bit_for_bit(hidden_act, dtype):
    gate, up, grad = Problem(shape=(7, 301), activation="silu", dtype=dtype, gate_range=20.0, seed=3).tensors()
    act_fn = ACT2FN[hidden_act]
    theirs = _run(lambda g, u: act_fn(g) * u, gate, up, grad, "both")
    ours = _run(lambda g, u: reference_gated_activation(g, u, activation_name(hidden_act)), gate, up, grad, "both")
    for name, mine, truth in zip(("out", "dgate", "dup"), ours, theirs):
        assert mine.equal(truth), f"{name} differs from transformers' ACT2FN[{hidden_act!r}] * up"


@pytest.mark.parametrize("hidden_act, expected", [
    ("silu", "silu"), ("swish", "silu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", None), ("gelu_new", None),
    ("gelu_python_tanh", None), ("relu", None), ("SiLU", None), (None, None), (ACT2FN["silu"], None),
])
def test_activation_name_maps_transformers_names(hidden_act, expected):
    assert activation_name(hidden_act) == expected


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_pytorch_tanh", "swish", "", None])
@pytest.mark.parametrize("fn", [gated_activation, reference_gated_activation], ids=["kernel", "twin"])
def test_unsupported_activation_raises_value_error_naming_it(fn, activation):
    gate = torch.randn(4, device=DEVICE)
    with pytest.raises(ValueError, match="activation") as raised:
        fn(gate, gate, activation)
    message = str(raised.value)
    assert repr(activation) in message and "'silu'" in message and "'gelu_tanh'" in message


@pytest.mark.parametrize("gate_shape, up_shape, up_dtype, match", [
    ((4, 6), (6, 4), torch.float32, "same shape"), ((4, 6), (1, 6), torch.float32, "same shape"),
    ((4, 6), (4, 6), torch.float16, "share one of"),
])
def test_mismatched_inputs_raise_value_error(gate_shape, up_shape, up_dtype, match):
    gate = torch.randn(gate_shape, device=DEVICE)
    up = torch.randn(up_shape, device=DEVICE, dtype=up_dtype)
    with pytest.raises(ValueError, match=match):
        gated_activation(gate, up, "silu")


def test_saves_only_gate_and_up_for_backward():
    """act(gate) is recomputed in the backward: the graph holds gate and up (2 x 176 MB at 8000 x 11008
    in bf16), not a third tensor."""
    gate, up, _ = Problem(shape=(3, 1030), activation="silu").tensors()
    gate.requires_grad_(True)
    up.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gated_activation(gate, up, "gelu_tanh")
    assert len(saved) == 2 and all(t.equal(x) for t, x in zip(saved, (gate, up)))


def test_empty_tensors():
    gate = torch.randn(0, 11, device=DEVICE, requires_grad=True)
    out = gated_activation(gate, gate.detach().clone().requires_grad_(True), "silu")
    assert out.shape == (0, 11)
    (dgate,) = torch.autograd.grad(out.sum(), [gate])
    assert dgate.shape == (0, 11)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_repeated_calls_are_identical(activation):
    """From the second call on, compiled kernels are launched without Triton's dispatch (`launch`): the same
    shapes must give the same bits, forward and backward."""
    gate, up, grad = Problem(shape=SIZES[-1], activation=activation, dtype=DTYPES[-1], seed=9).tensors()
    fn = lambda g, u: gated_activation(g, u, activation)
    first, second = _run(fn, gate, up, grad, "both"), _run(fn, gate, up, grad, "both")
    for one, two in zip(first, second):
        assert one.equal(two)
