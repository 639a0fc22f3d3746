"""The fused causal-LM cross-entropy kernel against a float64 oracle, and its twin against transformers.

Loss and d(loss)/d(logits) follow FlashAttention's rule: error(kernel, oracle) <= kernel_bound(error(
reference twin in the same dtype, oracle), dtype). The twin must equal transformers' `ForCausalLMLoss`
bit for bit. On the CPU the kernels run in Triton's interpreter at small shapes in float32 and float16;
with FASTVISION_DEVICE=cuda the same tests run compiled in bfloat16 and float16, up to Gemma3's 262,144
vocabulary (the oracle then works in row chunks so that no test holds more than ~4 GB).
"""

from __future__ import annotations

import dataclasses
import os

DEVICE = os.environ.get("FASTVISION_DEVICE", "cpu")
if DEVICE == "cpu":  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

from conformance.tolerances import kernel_bound  # noqa: E402
from optimized.kernels.cross_entropy import Blocks, causal_lm_loss, causal_lm_loss_with_blocks  # noqa: E402
from reference.ops.cross_entropy import causal_lm_loss as reference_loss  # noqa: E402
from tests.kernel_parity import DTYPES, GPU, error, hypothesis_settings  # noqa: E402

# Vocabularies: odd ones and ones just past a block edge (1,024 columns in the interpreter, 8,192 compiled).
VOCABS = (1, 3, 8192, 8193, 32000, 262144) if GPU else (1, 3, 1023, 1025, 4999)
MAX_VOCAB = 65536 if GPU else 5000
MAX_SEQ = 256 if GPU else 40
# Per dtype. An interpreter example costs ~0.05-0.5 s (one numpy step per row and 1,024-column block).
EXAMPLES = 6 if GPU else 30
SETTINGS = hypothesis_settings(EXAMPLES)
ORACLE_ROWS = 64  # rows per float64 oracle chunk: 64 x 262,144 x 8 B = 134 MB at Gemma3's vocabulary


@dataclasses.dataclass(frozen=True)
class Problem:
    batch: int
    seq: int
    vocab: int
    dtype: torch.dtype = DTYPES[0]
    ignored: float = 0.3  # fraction of labels set to ignore_index (before the shift)
    num_items: str = "none"  # "none" | "int" | "tensor": how num_items_in_batch is passed
    extra_items: int = 0  # num_items_in_batch = counted labels + this (other accumulation steps)
    given_shift: bool = False  # pass shift_labels (already shifted) instead of labels
    ignore_index: int = -100
    layout: str = "contiguous"  # "sliced": logits[:, :S] of a longer buffer; "vocab_strided": stride(-1) > 1
    seed: int = 0

    def inputs(self) -> dict:
        """causal_lm_loss's keyword arguments: logits (requires grad), labels, vocab_size, ..."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.batch, self.seq, self.vocab)
        # Logits of std 4: the softmax is peaked as a trained LM's is, so exp() spans ~40 orders.
        logits = (4 * torch.randn(shape, generator=gen)).to(DEVICE, self.dtype)
        if self.layout == "sliced":
            logits = torch.cat([logits, torch.zeros_like(logits[:, :2])], 1)[:, : self.seq]
        elif self.layout == "vocab_strided":
            logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
        labels = self._labels(gen)
        kwargs = dict(logits=logits.requires_grad_(True), labels=labels, vocab_size=self.vocab,
                      ignore_index=self.ignore_index)
        targets = labels
        if self.given_shift:
            kwargs["shift_labels"] = targets = self._labels(gen)
        else:
            targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], self.ignore_index)], 1)
        if self.num_items != "none":
            items = int((targets != self.ignore_index).sum()) + self.extra_items
            kwargs["num_items_in_batch"] = torch.tensor(items, device=DEVICE) if self.num_items == "tensor" else items
        return kwargs

    def _labels(self, gen) -> torch.Tensor:
        labels = torch.randint(0, self.vocab, (self.batch, self.seq), generator=gen)
        labels[torch.rand(self.batch, self.seq, generator=gen) < self.ignored] = self.ignore_index
        return labels.to(DEVICE)


def _targets(kwargs) -> torch.Tensor:
    """The (B * S,) labels each logits row is scored against, shifted as transformers does."""
    if "shift_labels" in kwargs:
        return kwargs["shift_labels"].reshape(-1)
    labels = kwargs["labels"]
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], kwargs["ignore_index"])], 1).reshape(-1)


def _oracle_chunks(kwargs, grad_out: float):
    """Float64 loss terms and d(grad_out * loss)/d(logits) by autograd, in chunks of ORACLE_ROWS rows:
    yields (row slice, sum of the chunk's row losses, its gradient rows before division)."""
    flat = kwargs["logits"].detach().reshape(-1, kwargs["vocab_size"])
    targets = _targets(kwargs)
    for start in range(0, flat.shape[0], ORACLE_ROWS):
        rows = slice(start, start + ORACLE_ROWS)
        x = flat[rows].double().requires_grad_(True)
        t = targets[rows]
        counted = t != kwargs["ignore_index"]
        picked = x.gather(1, torch.where(counted, t, 0)[:, None])[:, 0]
        part = torch.where(counted, torch.logsumexp(x, -1) - picked, 0.0).sum()
        (grad,) = torch.autograd.grad(part, x)
        yield rows, part.detach(), grad * grad_out


def _denominator(kwargs) -> float:
    items = kwargs.get("num_items_in_batch")
    if items is None:
        return float((_targets(kwargs) != kwargs["ignore_index"]).sum())
    return float(items)


def _loss_and_grad(fn, kwargs, grad_out: float):
    """The loss and d(grad_out * loss)/d(logits). The logits leaf itself is used, not a clone: a clone of
    a sliced view would be contiguous and hide the strides under test."""
    loss = fn(**kwargs)
    (grad,) = torch.autograd.grad(loss, kwargs["logits"], torch.full_like(loss, grad_out))
    return loss.detach(), grad


def check_parity(problem: Problem, blocks: Blocks | None = None, kwargs: dict | None = None):
    """Asserts the rule on the loss and the gradient, that the logits are untouched and that ignored rows
    get exactly 0; returns the kernel's (loss, gradient). `kwargs` overrides problem.inputs()."""
    kwargs = kwargs or problem.inputs()
    before = kwargs["logits"].detach().clone()
    # Upstream gradient ~ the row count: then the logits' gradients are O(1) and the floors are tight.
    grad_out = float(problem.batch * problem.seq) * (0.5 + (problem.seed % 7) / 4)
    ours = _loss_and_grad(lambda **kw: causal_lm_loss_with_blocks(**kw, blocks=blocks), kwargs, grad_out)
    theirs = _loss_and_grad(reference_loss, kwargs, grad_out)
    assert torch.equal(kwargs["logits"].detach(), before), "logits modified by forward or backward"
    assert ours[0].dtype == theirs[0].dtype and ours[0].shape == theirs[0].shape
    assert ours[1].dtype == problem.dtype and ours[1].shape == kwargs["logits"].shape

    ignored = _targets(kwargs) == problem.ignore_index
    grad_rows = ours[1].reshape(-1, problem.vocab)
    assert grad_rows[ignored].eq(0).all(), f"gradient not exactly 0 on ignored rows; {problem}"
    denominator = _denominator(kwargs)
    if denominator == 0:  # every row ignored and nothing to divide by: transformers gives NaN, grad 0
        assert ours[0].isnan() and theirs[0].isnan(), f"loss {ours[0]} where transformers gives NaN; {problem}"
        assert grad_rows.eq(0).all()
        return ours

    total, grad_errors = torch.zeros((), dtype=torch.float64), [0.0, 0.0]
    for rows, part, exact_grad in _oracle_chunks(kwargs, grad_out / denominator):
        total += part.cpu()
        for i, candidate in enumerate((grad_rows, theirs[1].reshape(-1, problem.vocab))):
            grad_errors[i] = max(grad_errors[i], error(candidate[rows], exact_grad))
    exact_loss = total / denominator
    err, ref_err = error(ours[0], exact_loss), error(theirs[0], exact_loss)
    bound = kernel_bound(ref_err, problem.dtype)
    assert err <= bound, f"loss: error {err:.3e} > bound {bound:.3e} (reference {ref_err:.3e}); {problem}"
    bound = kernel_bound(grad_errors[1], problem.dtype, grad=True)
    assert grad_errors[0] <= bound, (f"grad: error {grad_errors[0]:.3e} > bound {bound:.3e} "
                                     f"(reference {grad_errors[1]:.3e}); {problem}")
    return ours


# ------------------------------------------------------------------------------------------------
# Hypothesis: shapes, vocabularies, ignored fractions, reductions, shifted labels, layouts
# ------------------------------------------------------------------------------------------------


@st.composite
def problems(draw, dtype: torch.dtype):
    return Problem(
        batch=draw(st.integers(1, 3)),
        seq=draw(st.integers(1, MAX_SEQ)),
        vocab=draw(st.sampled_from(VOCABS) | st.integers(1, MAX_VOCAB)),
        dtype=dtype,
        ignored=draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
        num_items=draw(st.sampled_from(["none", "int", "tensor"])),
        extra_items=draw(st.integers(0, 5)),
        given_shift=draw(st.booleans()),
        ignore_index=draw(st.sampled_from([-100, -1])),
        layout=draw(st.sampled_from(["contiguous", "sliced", "vocab_strided"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(data=st.data())
def test_parity_any_problem(dtype, data):
    check_parity(data.draw(problems(dtype)))


# Blocks narrower than the vocabulary: many block edges, a ragged last block, a vocabulary of one block.
BLOCK_CASES = [(Blocks(16, 1), 1000), (Blocks(64, 2), 64), (Blocks(128, 4), 129)]


@pytest.mark.parametrize("blocks, vocab", BLOCK_CASES, ids=str)
def test_parity_other_block_widths(blocks, vocab):
    check_parity(Problem(batch=2, seq=9, vocab=vocab, ignored=0.2, seed=vocab), blocks)


@pytest.mark.parametrize("layout", ["contiguous", "sliced", "vocab_strided"])
def test_parity_logits_layouts(layout):
    """A slice logits[:, :S] of a longer buffer is read through its batch stride, not copied; logits
    strided along the vocabulary are copied first. Three sequences, so a wrong batch stride shows."""
    check_parity(Problem(batch=3, seq=7, vocab=300, ignored=0.1, layout=layout, seed=6), Blocks(64, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_gemma3_vocabulary(dtype):
    """Gemma3's 262,144 columns: 32 compiled blocks a row (256 in the interpreter, so few rows there).
    On the GPU 768 rows: bf16 logits 0.4 GB, the twin's fp32 upcast, log-softmax and gradient 2.4 GB."""
    batch, seq = (2, 384) if GPU else (1, 3)
    check_parity(Problem(batch=batch, seq=seq, vocab=262144, dtype=dtype, ignored=0.25, num_items="tensor",
                         extra_items=7, seed=17))


# ------------------------------------------------------------------------------------------------
# Semantics a user relies on
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_items", ["none", "int", "tensor"])
def test_all_ignored_matches_transformers(num_items):
    """A batch with no label to learn from (a text-free image batch, a truncated prompt): transformers'
    mean is 0 / 0 = NaN with a zero gradient; a sum over num_items_in_batch is 0. The kernel matches."""
    problem = Problem(batch=2, seq=5, vocab=37, ignored=1.0, num_items=num_items, extra_items=3)
    kwargs = problem.inputs()
    ours = _loss_and_grad(causal_lm_loss, kwargs, 1.0)
    hf = _loss_and_grad(ForCausalLMLoss, kwargs, 1.0)
    assert ours[0].isnan() == hf[0].isnan() == (num_items == "none")
    if num_items != "none":
        assert ours[0] == hf[0] == 0
    assert ours[1].eq(0).all() and hf[1].eq(0).all()


def test_last_position_of_each_sequence_gets_no_gradient():
    """Position S-1 has no next token: its row is ignored after the shift, even with every label valid."""
    problem = Problem(batch=3, seq=6, vocab=50, ignored=0.0, seed=2)
    _, grad = check_parity(problem)
    assert grad[:, -1].eq(0).all()
    assert grad[:, :-1].ne(0).any(-1).all(), "a row with a valid next label got no gradient"


def test_shift_labels_replace_labels():
    """Given shift_labels, transformers ignores `labels`: garbage there must change nothing."""
    problem = Problem(batch=2, seq=7, vocab=40, given_shift=True, seed=4)
    kwargs = problem.inputs()
    first = _loss_and_grad(causal_lm_loss, kwargs, 1.0)
    second = _loss_and_grad(causal_lm_loss, {**kwargs, "labels": torch.full_like(kwargs["labels"], 3)}, 1.0)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    check_parity(problem)


def test_minus_inf_logits_are_zero_probability():
    """Vocabulary entries masked to -inf (a whole first block, and a scattered few) take no probability
    and get a zero gradient; a block of only -inf must not turn the running sum into NaN."""
    problem = Problem(batch=1, seq=4, vocab=300, ignored=0.0, dtype=torch.float32, seed=5)
    kwargs = problem.inputs()
    masked = torch.zeros(300, dtype=torch.bool)
    masked[:40] = True
    masked[100::37] = True
    kwargs["logits"].detach()[..., masked.to(DEVICE)] = float("-inf")
    kwargs["labels"] = torch.where(masked.to(DEVICE)[kwargs["labels"]], 41, kwargs["labels"])
    _, grad = check_parity(problem, Blocks(16, 1), kwargs)
    assert grad[..., masked.to(DEVICE)].eq(0).all()


def test_out_of_range_label_gives_nan_not_a_wrong_number():
    """transformers raises IndexError on the CPU (a device assert on CUDA); the kernel cannot raise without
    a host sync, so the loss and that row's gradient are NaN: never a plausible but wrong value."""
    problem = Problem(batch=1, seq=4, vocab=30, ignored=0.0)
    kwargs = problem.inputs()
    kwargs["labels"][0, 2] = 30  # row 1 is scored against it after the shift
    if not GPU:  # on CUDA the device assert would poison the context for every later test
        with pytest.raises(IndexError):
            ForCausalLMLoss(**kwargs)
    loss, grad = _loss_and_grad(causal_lm_loss, kwargs, 1.0)
    assert loss.isnan()
    assert grad[0, 1].isnan().all() and torch.isfinite(grad[0, [0, 2, 3]]).all()


@pytest.mark.parametrize("num_items", [None, 7, torch.tensor(7), torch.tensor(7.0, dtype=torch.float64)],
                         ids=["none", "int", "int_tensor", "float64_tensor"])
def test_result_dtype_and_shape_follow_transformers(num_items):
    """The loss is float32 from 16-bit logits; a float64 num_items_in_batch promotes it, as in transformers."""
    kwargs = Problem(batch=2, seq=4, vocab=20, dtype=torch.float16).inputs()
    if num_items is not None:
        kwargs["num_items_in_batch"] = num_items.to(DEVICE) if torch.is_tensor(num_items) else num_items
    ours, hf = causal_lm_loss(**kwargs), ForCausalLMLoss(**kwargs)
    assert (ours.dtype, ours.shape) == (hf.dtype, hf.shape)


def test_flat_logits_and_extra_kwargs():
    """Logits (N, V) with labels (N,) are one sequence to transformers; models also pass extra kwargs."""
    problem = Problem(batch=1, seq=11, vocab=33, dtype=torch.float32, seed=8)
    kwargs = problem.inputs()
    flat = {**kwargs, "logits": kwargs["logits"][0], "labels": kwargs["labels"][0]}
    assert torch.equal(causal_lm_loss(**flat, position_ids=None), causal_lm_loss(**kwargs))


def test_wrong_label_count_raises_value_error():
    kwargs = Problem(batch=2, seq=4, vocab=20).inputs()
    with pytest.raises(ValueError, match="one label per logits row"):
        causal_lm_loss(**{**kwargs, "labels": kwargs["labels"][:, :3]})


def test_repeated_calls_are_identical():
    """The same inputs give the same bits; compiled, later calls also skip Triton's dispatch (`launch`)."""
    kwargs = Problem(batch=2, seq=8, vocab=1500, num_items="tensor", seed=9).inputs()
    first, second = (_loss_and_grad(causal_lm_loss, kwargs, 3.0) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ------------------------------------------------------------------------------------------------
# The twin equals transformers' ForCausalLMLoss exactly
# ------------------------------------------------------------------------------------------------


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN equal to NaN (an all-ignored mean)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@settings(max_examples=20, deadline=None, database=None)
@given(data=st.data())
def test_twin_equals_transformers(dtype, data):
    # transformers views the fp32 logits as (-1, V), which fails on non-contiguous ones; models give
    # contiguous logits, and the twin (which reshapes) is only held to transformers where it runs.
    problem = dataclasses.replace(data.draw(problems(dtype)), seq=data.draw(st.integers(1, 12)),
                                  layout="contiguous")
    kwargs = problem.inputs()
    twin = _loss_and_grad(reference_loss, kwargs, 2.0)
    hf = _loss_and_grad(ForCausalLMLoss, kwargs, 2.0)
    assert _same(twin[0], hf[0]) and _same(twin[1], hf[1]), problem
