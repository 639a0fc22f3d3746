"""The Triton NF4 dequantize kernel, its plain-PyTorch twin and bitsandbytes' dequantize_4bit, on weights
bitsandbytes quantizes from fresh random inputs.

kernel == twin bit for bit; twin == bitsandbytes bit for bit where rows are whole blocks (bnb 0.50.2's
CPU kernel reads the wrong absmax for some other shapes: reference/ops/nf4_dequant.py); both within
`nf4_dequant_bound` of a float64 oracle that decodes the bytes by its own arithmetic and takes bnb's own
codebooks. On the CPU the kernel runs in Triton's interpreter in fp32 and fp16 (its fp32 -> bf16 cast
rounds toward zero); with FASTVISION_DEVICE=cuda the same tests run compiled, bf16 included, larger.
"""

from __future__ import annotations

import dataclasses
import logging
import os

DEVICE = os.environ.get("FASTVISION_DEVICE", "cpu")
if DEVICE == "cpu":  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bitsandbytes.functional as bnb_functional  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conformance.tolerances import nf4_dequant_bound  # noqa: E402
from optimized import ops  # noqa: E402
from optimized.kernels.nf4_dequant import dequantize_nf4, unreadable  # noqa: E402
from reference.ops.nf4_dequant import dequantize_nf4 as twin_dequantize_nf4  # noqa: E402
from tests.kernel_parity import GPU, hypothesis_settings  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32) if GPU else (torch.float32, torch.float16)
BLOCKSIZES = (32, 64, 128, 256)  # bnb takes 32..4096; a power of two >= 8 is what the kernel reads
# Interpreted, a program is 4096 bytes (8192 elements) at ~2-15 ms: up to 40 x 300 is at most 2 programs.
MAX_ROWS, MAX_COLS = (600, 3000) if GPU else (40, 300)
SETTINGS = hypothesis_settings(15 if GPU else 25)


@dataclasses.dataclass(frozen=True)
class Problem:
    shape: tuple
    blocksize: int = 64
    nested: bool = False
    dtype: torch.dtype = torch.float32
    seed: int = 0

    def quantized(self):
        """(packed bytes, quant state) of a fresh N(0, 1) weight, as bitsandbytes quantizes it on DEVICE."""
        gen = torch.Generator().manual_seed(self.seed)
        weight = torch.randn(self.shape, generator=gen).to(DEVICE, self.dtype)
        return bnb_functional.quantize_4bit(
            weight, blocksize=self.blocksize, quant_type="nf4", compress_statistics=self.nested
        )

    @property
    def whole_blocks(self) -> bool:
        return self.shape[-1] % self.blocksize == 0


def oracle(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """float64 code * absmax: nibbles by division (not shifts), bnb's own tables, no rounding anywhere."""
    data = packed.reshape(-1).to(torch.int64).cpu()
    n = quant_state.shape.numel()
    codes = torch.stack([torch.div(data, 16, rounding_mode="floor"), data % 16], dim=1).reshape(-1)[:n]
    table = bnb_functional.get_4bit_type("nf4", device="cpu").double()
    if quant_state.nested:
        state2 = quant_state.state2
        q = quant_state.absmax.cpu().long()
        blocks2 = torch.arange(q.numel()) // state2.blocksize
        absmax = state2.code.cpu().double()[q] * state2.absmax.cpu().double()[blocks2]
        absmax = absmax + quant_state.offset.cpu().double()
    else:
        absmax = quant_state.absmax.cpu().double()
    return (table[codes] * absmax[torch.arange(n) // quant_state.blocksize]).reshape(quant_state.shape)


def assert_near_oracle(got: torch.Tensor, exact: torch.Tensor, dtype, what: str):
    assert got.dtype == dtype and got.shape == exact.shape, (what, got.dtype, got.shape)
    err = (got.double().cpu() - exact).abs()
    over = err > nf4_dequant_bound(exact, dtype)
    assert not over.any(), f"{what}: {int(over.sum())} elements past the bound, worst {float(err.max()):.3e}"


def check(problem: Problem):
    packed, state = problem.quantized()
    assert unreadable(state) is None, unreadable(state)
    ours = dequantize_nf4(packed, state)
    twin = twin_dequantize_nf4(packed, state)
    assert torch.equal(ours, twin), f"kernel != twin by {float((ours.float() - twin.float()).abs().max())}: {problem}"
    exact = oracle(packed, state)
    assert_near_oracle(ours, exact, problem.dtype, f"kernel {problem}")
    assert_near_oracle(twin, exact, problem.dtype, f"twin {problem}")
    if problem.whole_blocks:  # bnb's CPU kernel on other shapes: see the module docstring
        theirs = bnb_functional.dequantize_4bit(packed, state)
        # bnb's CPU kernel returns a 1-D weight as (1, n); its CUDA kernel, the twin and the kernel as (n,).
        assert torch.equal(twin, theirs.reshape(twin.shape)), f"twin != bnb: {problem}"


@st.composite
def problems(draw, dtype):
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    rows = draw(st.integers(1, MAX_ROWS))
    whole = draw(st.booleans())
    cols = blocksize * draw(st.integers(1, max(1, MAX_COLS // blocksize))) if whole else draw(st.integers(1, MAX_COLS))
    shape = draw(st.sampled_from([(rows, cols), (cols,), (2, rows // 2 + 1, cols)]))  # 3-D: still <= 2 programs
    return Problem(shape, blocksize, draw(st.booleans()), dtype, draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(data=st.data())
def test_kernel_equals_twin_and_both_meet_the_oracle(dtype, data):
    check(data.draw(problems(dtype)))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("shape, blocksize", [((41, 300), 64), ((40, 512), 128), ((3, 96), 64)])
def test_across_program_edges_and_part_blocks(shape, blocksize, nested):
    """(41, 300) and (40, 512) are 3 interpreter programs; (3, 96) at 64 is a shape bnb's CPU kernel gets wrong."""
    check(Problem(shape, blocksize, nested, DTYPES[-1], seed=7))


def test_the_high_nibble_is_the_first_element():
    """Bytes 0x1E, 0x70: elements NF4[1], NF4[14], NF4[7] (= 0), NF4[0], times the block's absmax."""
    packed = torch.tensor([[0x1E], [0x70]], dtype=torch.uint8, device=DEVICE)
    absmax = torch.tensor([2.0], device=DEVICE)
    state = bnb_functional.QuantState(absmax, torch.Size([4]), blocksize=64, quant_type="nf4", dtype=torch.float32)
    table = bnb_functional.get_4bit_type("nf4", device="cpu")
    want = torch.stack([table[1], table[14], table[7], table[0]]).to(DEVICE) * 2.0
    assert torch.equal(dequantize_nf4(packed, state), want)
    assert torch.equal(twin_dequantize_nf4(packed, state), want)


def _state_with(packed_state, **changes):
    state = bnb_functional.QuantState(
        **{
            **dict(
                absmax=packed_state.absmax,
                shape=packed_state.shape,
                code=packed_state.code,
                blocksize=packed_state.blocksize,
                quant_type=packed_state.quant_type,
                dtype=packed_state.dtype,
                offset=packed_state.offset,
                state2=packed_state.state2,
            ),
            **changes,
        }
    )
    return state


def test_unreadable_states_name_why_and_fall_back_to_bnb(caplog):
    ops._say_nf4_fallback_once.cache_clear()
    weight = torch.randn(8, 128).to(DEVICE)
    packed, fp4 = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="fp4")
    _, nf4 = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    half_absmax = _state_with(nf4, absmax=nf4.absmax.half())
    assert "fp4" in unreadable(fp4) and "float16" in unreadable(half_absmax)
    with caplog.at_level(logging.WARNING, logger="fastvision.optimized"):
        for state in (fp4, fp4, half_absmax):
            assert torch.equal(ops.dequantize_nf4(packed, state), bnb_functional.dequantize_4bit(packed, state))
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    odd_blocks = _state_with(nf4, blocksize=48)
    assert "blocksize 48" in unreadable(odd_blocks)
    with pytest.raises(ValueError, match="cannot read"):
        dequantize_nf4(packed, odd_blocks)
    with pytest.raises(ValueError, match="invalid blocksize"):  # bnb's own error: the op ran bnb
        ops.dequantize_nf4(packed, odd_blocks)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    original = ops.kernels()["dequantize_nf4"]
    monkeypatch.setitem(ops.kernels(), "dequantize_nf4", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
def test_the_op_runs_the_kernel_and_gives_bnb_values(kernel_calls, dtype):
    """bf16 too: in the interpreter the op writes fp32 and torch rounds to nearest even, as bnb does."""
    packed, state = Problem((24, 256), 64, True, dtype, seed=3).quantized()
    assert torch.equal(ops.dequantize_nf4(packed, state), bnb_functional.dequantize_4bit(packed, state))
    assert len(kernel_calls) == 1


def test_without_gpu_or_interpreter_the_op_is_bnb(kernel_calls, monkeypatch):
    monkeypatch.setattr(ops, "interpreter_enabled", lambda: False)
    packed, state = Problem((16, 128), 64, False, torch.float16, seed=4).quantized()
    got = ops.dequantize_nf4(packed, state)
    assert torch.equal(got, bnb_functional.dequantize_4bit(packed, state))
    assert len(kernel_calls) == (0 if DEVICE == "cpu" else 1)  # a CUDA tensor always has the compiled kernel


def test_the_fused_lora_op_dequantizes_with_the_kernel_forward_and_backward(kernel_calls):
    """optimized.ops.lora_linear on a 4-bit base: the kernel dequantizes it twice (forward, d(input)), and
    the op's results are those of the same op over bnb's dequantize_4bit, bit for bit."""
    from optimized.kernels.lora_linear import lora_linear

    gen = torch.Generator().manual_seed(5)
    packed, state = Problem((48, 128), 64, True, torch.bfloat16, seed=6).quantized()
    x = torch.randn(2, 5, 128, generator=gen).to(DEVICE, torch.bfloat16)
    lora_A, lora_B = torch.randn(8, 128, generator=gen).to(DEVICE), torch.randn(48, 8, generator=gen).to(DEVICE)
    results = []
    for run in (ops.lora_linear, lora_linear):  # the second: the kernel file's default, bnb's dequantize_4bit
        leaves = [t.clone().requires_grad_(True) for t in (x, lora_A, lora_B)]
        out = run(leaves[0], packed, state, None, leaves[1], leaves[2], 2.0)
        results.append([out, *torch.autograd.grad(out.float().square().sum(), leaves)])
    assert len(kernel_calls) == 2
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_a_quant_state_changed_in_place_is_read_afresh():
    """The kernel keeps what it prepared of a quant state on the state; QuantState.to() and a loader swap
    its tensors in place, and the next call must read the new ones."""
    packed, state = Problem((16, 128), 64, True, DTYPES[-1], seed=8).quantized()
    before = dequantize_nf4(packed, state)
    state.offset = state.offset + 1.0  # every block's absmax moves by 1
    state.absmax = state.absmax.clone()
    after = dequantize_nf4(packed, state)
    assert not torch.equal(before, after)
    assert torch.equal(after, twin_dequantize_nf4(packed, state))
