"""The Triton RMSNorm kernel against a float64 oracle, by FlashAttention's rule; its twin against transformers.

For the output, dx and dweight: error(kernel, oracle) <= kernel_bound(error(reference twin in the same
dtype, oracle), dtype). The oracle is the twin's formula evaluated in float64 (no rounding anywhere). On
the CPU the kernels run in Triton's interpreter at small shapes in float32 and float16 (the interpreter
rounds fp32 -> bf16 toward zero, where compiled Triton rounds to nearest even); with
FASTVISION_DEVICE=cuda the same tests run compiled, in bfloat16 and float16, at realistic sizes.
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
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from conformance.tolerances import kernel_bound  # noqa: E402
from optimized.kernels.rmsnorm import MAX_COLUMNS, rms_norm  # noqa: E402
from reference.ops.rmsnorm import rms_norm as reference_rms_norm  # noqa: E402
from tests.kernel_parity import DTYPES, GPU, error, hypothesis_settings  # noqa: E402

MAX_ROWS = 4096 if GPU else 64  # interpreter tiles are 2048 elements: 64 rows cross tile edges at widths past 32
MAX_COLS = 8192 if GPU else 300  # odd widths pad the power-of-two column block
# Per dtype. Interpreter examples cost ~10-50 ms each; compiled ones a compile per new (BLOCK, ROWS, flags).
EXAMPLES = 6 if GPU else 40
SETTINGS = hypothesis_settings(EXAMPLES)
STYLES = {"llama": False, "gemma3": True}


@dataclasses.dataclass(frozen=True)
class Problem:
    leading: tuple  # x is (*leading, cols)
    cols: int
    gemma: bool = False
    dtype: torch.dtype = DTYPES[0]
    weight_dtype: torch.dtype | None = None  # None: x's dtype, as a model stores its norms
    eps: float = 1e-6
    x_grad: bool = True
    weight_grad: bool = True
    scale: float = 1.0  # of x: RMSNorm is scale-free, its gradient dx is not (~1 / scale)
    layout: str = "contiguous"  # "transposed" (3-D): x is a (s, b, H) buffer seen as (b, s, H);
    # "column_slice": the first H columns of a wider buffer (rows not adjacent)
    zero_row: bool = False  # row 0 of x all zeros
    seed: int = 0

    def tensors(self):
        """x, weight, dy on DEVICE; x laid out as `layout` says (values do not depend on it)."""
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn(*self.leading, self.cols, generator=gen) * self.scale
        if self.zero_row:
            x.view(-1, self.cols)[0] = 0.0
        # Llama weights sit near 1; Gemma3 stores the offset from 1, near 0.
        weight = torch.randn(self.cols, generator=gen) * 0.5 + (0.0 if self.gemma else 1.0)
        dy = torch.randn(*self.leading, self.cols, generator=gen)
        x = _lay_out(x.to(device=DEVICE, dtype=self.dtype), self.layout)  # on DEVICE: .to() would copy it
        w_dtype = self.weight_dtype or self.dtype
        # dy in x's dtype: exact in the output's dtype too (the same or fp32), so the oracle sees the
        # very values both backends receive.
        return x, weight.to(device=DEVICE, dtype=w_dtype), dy.to(device=DEVICE, dtype=self.dtype)


def _lay_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "column_slice":
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 5, dtype=x.dtype, device=x.device)
        wide[..., : x.shape[-1]] = x
        return wide[..., : x.shape[-1]]
    return x


def _oracle(x, weight, dy, eps: float, gemma: bool):
    """(y, dx, dweight) of the twin's formula in float64."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    y = normed * (1.0 + w64) if gemma else normed * w64
    return (y, *torch.autograd.grad(y, (x64, w64), dy.double()))


def _run(fn, x, weight, dy, x_grad: bool, weight_grad: bool):
    """(y, dx or None, dweight or None) of fn on fresh leaves requiring grad as asked. detach(), not
    clone(): a clone of a column slice would be contiguous."""
    x, weight = x.detach().requires_grad_(x_grad), weight.detach().requires_grad_(weight_grad)
    y = fn(x, weight)
    leaves = [t for t in (x, weight) if t.requires_grad]
    grads = iter(torch.autograd.grad(y, leaves, dy.to(y.dtype)) if leaves else ())
    return y, next(grads) if x_grad else None, next(grads) if weight_grad else None


def check_parity(problem: Problem):
    """Asserts the rule for y, dx, dweight (those asked for); returns the kernel's (y, dx, dweight)."""
    x, weight, dy = problem.tensors()
    kernel = lambda a, w: rms_norm(a, w, problem.eps, gemma=problem.gemma)
    twin = lambda a, w: reference_rms_norm(a, w, problem.eps, gemma=problem.gemma)
    ours = _run(kernel, x, weight, dy, problem.x_grad, problem.weight_grad)
    ref = _run(twin, x, weight, dy, True, True)
    exact = _oracle(x, weight, dy, problem.eps, problem.gemma)
    assert ours[0].dtype == ref[0].dtype and ours[0].shape == x.shape, f"y {ours[0].dtype}; {problem}"
    for name, mine, theirs, truth in zip(("y", "dx", "dweight"), ours, ref, exact):
        if mine is None:
            continue
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, f"{name} shape/dtype; {problem}"
        err, ref_err = error(mine, truth), error(theirs, truth)
        bound = kernel_bound(ref_err, problem.dtype, grad=name != "y")
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (reference {ref_err:.3e}); {problem}"
    return ours


# ------------------------------------------------------------------------------------------------
# Hypothesis: shapes, styles, dtypes, layouts, which inputs need gradients
# ------------------------------------------------------------------------------------------------


@st.composite
def problems(draw, dtype: torch.dtype):
    rows = draw(st.sampled_from([1, 7, MAX_ROWS]) | st.integers(1, MAX_ROWS))
    three_d = rows > 1 and draw(st.booleans())
    if three_d:  # (b, s, H) with b * s = rows, b a divisor of rows
        batch = draw(st.sampled_from([d for d in range(1, 5) if rows % d == 0]))
        leading = (batch, rows // batch)
    else:
        leading = (rows,)
    x_grad = draw(st.booleans())
    return Problem(
        leading=leading,
        cols=draw(st.sampled_from([1, 2, 255, MAX_COLS]) | st.integers(1, MAX_COLS)),
        gemma=draw(st.booleans()),
        dtype=dtype,
        weight_dtype=draw(st.sampled_from([None, None, torch.float32])),  # fp32 norms in a 16-bit model
        eps=draw(st.sampled_from([1e-6, 1e-5]) | st.floats(1e-8, 1e-2)),
        x_grad=x_grad,
        weight_grad=draw(st.booleans()) if x_grad else True,  # neither: no backward to test
        scale=draw(st.sampled_from([0.05, 1.0, 30.0])),
        layout=draw(st.sampled_from(["contiguous", "column_slice"] + (["transposed"] if three_d else []))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(data=st.data())
def test_parity_any_shape(dtype, data):
    check_parity(data.draw(problems(dtype)))


# ------------------------------------------------------------------------------------------------
# The families' norms at their real widths (rows scaled down on the CPU)
# ------------------------------------------------------------------------------------------------

FAMILY_CASES = {
    "llama_mistral_hidden_4096": dict(leading=(8000,) if GPU else (6,), cols=4096),
    "qwen25vl_vision_1280": dict(leading=(4, 1024) if GPU else (2, 9), cols=1280),
    "pixtral_vision_1024": dict(leading=(1, 4096) if GPU else (1, 11), cols=1024),
    "qwen2_hidden_3584": dict(leading=(2, 2047) if GPU else (3, 3), cols=3584),
    "gemma3_hidden_2560": dict(leading=(2, 2000) if GPU else (5,), cols=2560, gemma=True),
    # q_norm / k_norm over each head: many short rows, several a program
    "gemma3_qk_norm_256": dict(leading=(2, 1000, 8) if GPU else (1, 9, 4), cols=256, gemma=True),
    "max_columns_16384": dict(leading=(1000,) if GPU else (3,), cols=MAX_COLUMNS),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_parity_family_cases(name, dtype):
    check_parity(Problem(dtype=dtype, seed=len(name), **FAMILY_CASES[name]))


# ------------------------------------------------------------------------------------------------
# The twin is transformers' own math
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("style", sorted(STYLES))
def test_twin_is_bit_identical_to_transformers(style, dtype):
    """Output, dx and dweight of the twin equal LlamaRMSNorm's / Gemma3RMSNorm's bit for bit."""
    gemma, cols, eps = STYLES[style], 96, 1e-6
    module = (Gemma3RMSNorm(cols, eps=eps) if gemma else LlamaRMSNorm(cols, eps=eps)).to(DEVICE, dtype)
    with torch.no_grad():  # away from the init (ones / zeros), where a wrong weight form would hide
        module.weight.copy_(torch.randn(cols, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5)
    x = (torch.randn(3, 17, cols, generator=torch.Generator().manual_seed(2)) * 3).to(DEVICE, dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    theirs = _run(lambda a, w: module(a), x, module.weight, dy, True, False)
    their_dw = torch.autograd.grad(module(x), module.weight, dy)[0]
    ours = _run(lambda a, w: reference_rms_norm(a, w, eps, gemma=gemma), x, module.weight, dy, True, True)
    assert ours[0].dtype == theirs[0].dtype == dtype
    for name, mine, truth in zip(("y", "dx", "dweight"), ours, (theirs[0], theirs[1], their_dw)):
        assert torch.equal(mine, truth), f"{name} differs from transformers' {style}"


# ------------------------------------------------------------------------------------------------
# Edge cases: zero rows, layouts, gradient flags, dtypes, repeat calls, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("style", sorted(STYLES))
def test_all_zero_row_gives_zero_output_and_finite_grads(style, dtype):
    """A zero row (padding embeddings) normalizes by rsqrt(eps), not 0/0: y exactly 0, no NaN."""
    y, dx, dw = check_parity(Problem(leading=(2, 5), cols=200, gemma=STYLES[style], dtype=dtype,
                                     zero_row=True, seed=4))
    assert y.reshape(-1, 200)[0].eq(0).all(), "zero row not normalized to 0"
    for name, t in (("y", y), ("dx", dx), ("dweight", dw)):
        assert t.isfinite().all(), f"{name} not finite"


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("layout", ["transposed", "column_slice", "every_other_column"])
def test_non_contiguous_input_matches_contiguous(layout, style):
    """Same bits as the contiguous copy, forward and backward; output and dx have the input's shape."""
    x, weight, dy = Problem(leading=(3, 10), cols=130, seed=6).tensors()
    if layout == "every_other_column":  # last dim not contiguous: the kernel must read a copy
        strided = torch.zeros(3, 10, 260, dtype=x.dtype, device=DEVICE)
        strided[..., ::2] = x
        view = strided[..., ::2]
    else:
        view = _lay_out(x, layout)
    assert not view.is_contiguous() and torch.equal(view, x)
    fn = lambda a, w: rms_norm(a, w, 1e-6, gemma=STYLES[style])
    strided_run, contiguous_run = _run(fn, view, weight, dy, True, True), _run(fn, x, weight, dy, True, True)
    assert strided_run[0].shape == strided_run[1].shape == view.shape
    for one, two in zip(strided_run, contiguous_run):
        assert torch.equal(one, two)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_each_gradient_alone_equals_both_together(style):
    """x frozen (only the norm weight trains) or the weight frozen (LoRA): the gradient asked for is the
    same as when both are, and the other is not computed."""
    x, weight, dy = Problem(leading=(33,), cols=77, gemma=STYLES[style], seed=8).tensors()
    fn = lambda a, w: rms_norm(a, w, 1e-5, gemma=STYLES[style])
    _, dx_both, dw_both = _run(fn, x, weight, dy, True, True)
    _, dx_alone, dw_none = _run(fn, x, weight, dy, True, False)
    _, dx_none, dw_alone = _run(fn, x, weight, dy, False, True)
    assert dw_none is None and dx_none is None
    assert torch.equal(dx_alone, dx_both) and torch.equal(dw_alone, dw_both)
    assert not rms_norm(x, weight, 1e-5, gemma=STYLES[style]).requires_grad


@pytest.mark.parametrize("style", sorted(STYLES))
def test_output_dtype_follows_each_style(style):
    """fp32 weights on 16-bit activations: Llama promotes (`weight * x` is fp32), Gemma3 keeps x's dtype."""
    x, weight, _ = Problem(leading=(4,), cols=64, dtype=DTYPES[-1], weight_dtype=torch.float32).tensors()
    ours = rms_norm(x, weight, 1e-6, gemma=STYLES[style])
    theirs = reference_rms_norm(x, weight, 1e-6, gemma=STYLES[style])
    assert ours.dtype == theirs.dtype == (x.dtype if STYLES[style] else torch.float32)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_llama_style_rounds_before_the_weight(dtype):
    """LlamaRMSNorm rounds n to x's dtype, then multiplies by the weight. Rows of equal magnitudes a give
    n = +-1 / sqrt(1 + eps / a^2) = +-(1 - 5e-7) at a = 1, which rounds to +-1 in 16 bits (half an ulp
    below 1 is 2.4e-4 in fp16) whatever the last bits of rstd: with fp32 weights the output must be
    exactly +-weight, as the twin's is. A kernel multiplying the unrounded n gives weight * (1 - 5e-7)."""
    gen = torch.Generator().manual_seed(10)
    magnitudes = torch.tensor([0.25, 1.0, 3.0, 40.0])[:, None]
    signs = torch.randint(0, 2, (4, 160), generator=gen) * 2.0 - 1.0
    x = (magnitudes * signs).to(device=DEVICE, dtype=dtype)
    weight = (torch.rand(160, generator=gen) + 0.5).to(DEVICE)  # fp32: the product is not rounded again
    ours, theirs = rms_norm(x, weight, 1e-6), reference_rms_norm(x, weight, 1e-6)
    assert torch.equal(theirs, signs.to(DEVICE) * weight)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_gemma3_style_rounds_once_at_the_end(dtype):
    """Gemma3RMSNorm keeps n * (1 + w) in fp32 and rounds once. Rows of +-1 with eps = 2e-4 give
    n = +-(1 - 1e-4): 1 once rounded to 16 bits. With 1 + w placed 5e-5 above the rounding midpoint
    between 16-bit values v and v + ulp, the single rounding gives v (n * (1 + w) is 1e-4 below the
    midpoint, 1000x the fp32 noise of rstd); rounding n first would give v + ulp."""
    gen = torch.Generator().manual_seed(11)
    ulp = torch.finfo(dtype).eps  # the spacing of 16-bit values in [1, 2)
    v = (1.0 + torch.rand(160, generator=gen) * 0.5).to(dtype).float()
    weight = (v + ulp / 2 + 5e-5 - 1.0).to(DEVICE)  # fp32, as Gemma3 computes 1 + weight.float()
    signs = torch.randint(0, 2, (3, 160), generator=gen) * 2.0 - 1.0
    x = signs.to(device=DEVICE, dtype=dtype)
    ours, theirs = rms_norm(x, weight, 2e-4, gemma=True), reference_rms_norm(x, weight, 2e-4, gemma=True)
    assert torch.equal(theirs, (signs * v).to(device=DEVICE, dtype=dtype))
    assert torch.equal(ours, theirs)


def test_repeated_calls_are_identical():
    """From the second call on, compiled kernels skip Triton's dispatch (`launch`): the same bits, forward
    and backward, including the dweight partial sums."""
    x, weight, dy = Problem(leading=(2, 7), cols=300, seed=9).tensors()
    fn = lambda a, w: rms_norm(a, w, 1e-6)
    for one, two in zip(_run(fn, x, weight, dy, True, True), _run(fn, x, weight, dy, True, True)):
        assert torch.equal(one, two)


@pytest.mark.skipif(not GPU, reason="host synchronisation is a CUDA notion")
def test_no_host_synchronisation():
    """Forward and backward queue work without waiting on the GPU (no .item(), no .tolist())."""
    x, weight, dy = Problem(leading=(4, 100), cols=1024, seed=12).tensors()
    x.requires_grad_(True)
    weight.requires_grad_(True)
    torch.autograd.grad(rms_norm(x, weight, 1e-6), (x, weight), dy)  # compiles; compiling may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.autograd.grad(rms_norm(x, weight, 1e-6), (x, weight), dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_empty_input():
    x = torch.randn(0, 3, 64, device=DEVICE, requires_grad=True)
    weight = torch.ones(64, device=DEVICE, requires_grad=True)
    y = rms_norm(x, weight, 1e-6)
    dx, dw = torch.autograd.grad(y, (x, weight), torch.ones_like(y))
    assert y.shape == dx.shape == x.shape and torch.equal(dw, torch.zeros_like(weight))


@pytest.mark.parametrize(
    "x_shape, w_shape, dtype, match",
    [((4, 64), (63,), torch.float32, "shape"), ((4, 64), (4, 64), torch.float32, "shape"),
     ((2, MAX_COLUMNS + 1), (MAX_COLUMNS + 1,), torch.float32, "last dimension"),
     ((4, 64), (64,), torch.float64, "float16")],
)
def test_invalid_inputs_raise_value_error(x_shape, w_shape, dtype, match):
    x, weight = torch.randn(x_shape, device=DEVICE, dtype=dtype), torch.ones(w_shape, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        rms_norm(x, weight, 1e-6)
