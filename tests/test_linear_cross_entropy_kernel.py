"""The LM head fused into the loss against a float64 oracle: loss, d(hidden) and d(weight).

FlashAttention's rule, as for every kernel: error(kernel, oracle) <= kernel_bound(error(reference twin in
the same dtype, oracle), dtype). Chunks smaller than the counted rows (many chunk edges, a ragged last
one), ignored rows, both reductions, a frozen and a training head, a head dim that is not a power of two.
On the CPU the row kernels run in Triton's interpreter in float32 and float16; with
FASTVISION_DEVICE=cuda, compiled, in bfloat16 and float16 up to Qwen's 151,936-token vocabulary.
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

from conformance.tolerances import kernel_bound  # noqa: E402
from optimized.kernels.linear_cross_entropy import linear_causal_lm_loss, rows_per_chunk  # noqa: E402
from reference.ops.linear_cross_entropy import linear_causal_lm_loss as reference_loss  # noqa: E402
from tests.kernel_parity import DTYPES, GPU, error, hypothesis_settings, reference_error  # noqa: E402

VOCABS = (3, 8193, 151936) if GPU else (3, 1025, 2000)
SETTINGS = hypothesis_settings(6 if GPU else 20)


@dataclasses.dataclass(frozen=True)
class Problem:
    batch: int
    seq: int
    hidden: int
    vocab: int
    dtype: torch.dtype = DTYPES[0]
    chunk_rows: int | None = None  # None: the default ~256 MiB of logits per chunk
    ignored: float = 0.3
    num_items: int | None = None  # counted labels + this, or None for the mean
    head_trains: bool = False
    seed: int = 0

    def inputs(self):
        gen = torch.Generator().manual_seed(self.seed)
        hidden = torch.randn(self.batch, self.seq, self.hidden, generator=gen)
        # Weights of std 4 / sqrt(H): logits of std ~4, as peaked as a trained LM's.
        weight = torch.randn(self.vocab, self.hidden, generator=gen) * (4 / self.hidden**0.5)
        labels = torch.randint(0, self.vocab, (self.batch, self.seq), generator=gen)
        labels[torch.rand(self.batch, self.seq, generator=gen) < self.ignored] = -100
        counted = int((labels[:, 1:] != -100).sum())
        items = None if self.num_items is None else counted + self.num_items
        hidden = hidden.to(DEVICE, self.dtype).requires_grad_(True)
        weight = weight.to(DEVICE, self.dtype).requires_grad_(self.head_trains)
        return hidden, weight, labels.to(DEVICE), items


def _loss_and_grads(fn, hidden, weight, labels, items, **kwargs):
    loss = fn(hidden, weight, labels, weight.shape[0], items, **kwargs)
    wrt = (hidden, weight) if weight.requires_grad else (hidden,)
    grads = torch.autograd.grad(loss, wrt, torch.full_like(loss, 3.0))  # an upstream gradient other than 1
    return loss.detach(), grads


def check_parity(problem: Problem):
    hidden, weight, labels, items = problem.inputs()
    ours = _loss_and_grads(linear_causal_lm_loss, hidden, weight, labels, items, chunk_rows=problem.chunk_rows)
    theirs = _loss_and_grads(reference_loss, hidden, weight, labels, items)
    leaves = [hidden.detach().double().requires_grad_(True),
              weight.detach().double().requires_grad_(problem.head_trains)]
    exact = _loss_and_grads(reference_loss, *leaves, labels, items)
    if not (labels[:, 1:] != -100).any():  # nothing counts: zero gradients; 0 / 0 = NaN as transformers gives
        assert all(g.eq(0).all() for g in ours[1]), problem
        assert ours[0].isnan() if not items else ours[0] == 0, (ours[0], problem)
        return
    for name, got, twin, truth in [("loss", ours[0], theirs[0], exact[0])] + [
        (f"grad {i}", g, t, x) for i, (g, t, x) in enumerate(zip(ours[1], theirs[1], exact[1]))
    ]:
        assert got.dtype == twin.dtype and got.shape == twin.shape, (name, got.dtype, twin.dtype)
        bound = kernel_bound(reference_error(twin, truth), problem.dtype, grad=name != "loss")
        err = error(got, truth)
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e}; {problem}"


@st.composite
def problems(draw, dtype: torch.dtype):
    return Problem(
        batch=draw(st.integers(1, 2)),
        seq=draw(st.integers(1, 40)),
        hidden=draw(st.sampled_from([16, 48, 72])),
        vocab=draw(st.sampled_from(VOCABS) | st.integers(1, 3000)),
        dtype=dtype,
        chunk_rows=draw(st.none() | st.integers(1, 17)),
        ignored=draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
        num_items=draw(st.none() | st.integers(0, 5)),
        head_trains=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(data=st.data())
def test_parity_any_problem(dtype, data):
    check_parity(data.draw(problems(dtype)))


@pytest.mark.parametrize("head_trains", [False, True])
def test_parity_across_many_chunks_with_a_ragged_last_one(head_trains):
    check_parity(Problem(batch=2, seq=37, hidden=24, vocab=301, chunk_rows=5, head_trains=head_trains, seed=3))


def test_a_chunk_holds_about_256_mib_of_logits():
    assert rows_per_chunk(151936, torch.bfloat16) == 883
    assert rows_per_chunk(262144, torch.bfloat16) == 512
    assert rows_per_chunk(10**9, torch.float32) == 1  # never zero rows


def test_a_weight_of_the_wrong_shape_is_refused_naming_both_shapes():
    hidden = torch.zeros(1, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"vocab_size=5, hidden=8.*\(5, 7\)"):
        linear_causal_lm_loss(hidden, torch.zeros(5, 7, device=DEVICE), torch.zeros(1, 2, dtype=torch.long), 5)
