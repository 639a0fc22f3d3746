"""The Triton RoPE kernel against a float64 oracle by FlashAttention's rule, and bit for bit against its
twin, which is in turn bit-identical to transformers' own `apply_rotary_pos_emb`.

For q_embed, k_embed, dq and dk: error(kernel, oracle) <= kernel_bound(error(reference twin in the same
dtype, oracle), dtype). The kernel rounds as eager PyTorch does (each product, then the sum), so it
also equals the twin exactly. On the CPU the kernel runs in Triton's interpreter at small shapes in
float32 and float16 (the interpreter casts fp32 to bf16 by truncation, not round-to-nearest-even); with
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
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from conformance.tolerances import kernel_bound  # noqa: E402
from optimized.kernels.rope import apply_rotary  # noqa: E402
from reference.ops.rope import apply_rotary as reference_rotary  # noqa: E402
from tests.kernel_parity import DTYPES, GPU, error, hypothesis_settings  # noqa: E402

# Bit-identity needs the dtype's real rounding: the interpreter truncates fp32 -> bf16.
EXACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if GPU else (torch.float32, torch.float16)
HEAD_DIMS = (16, 32, 64, 72, 80, 128, 256)  # 72, 80: half dims 36, 40 are not powers of two
MAX_LEN = 2000 if GPU else 50  # the float64 oracle and the interpreter (~5 ms a program) bound it
# Per dtype. An interpreter example costs ~20-100 ms (forward + backward over up to 150 tokens);
# a compiled one a compile per new shape of tiles.
EXAMPLES = 8 if GPU else 30
SETTINGS = hypothesis_settings(EXAMPLES)


@dataclasses.dataclass(frozen=True)
class Problem:
    batch: int
    q_heads: int
    kv_heads: int
    seq: int
    head_dim: int
    dtype: torch.dtype = DTYPES[0]
    seed: int = 0
    layout: str = "bshd"  # "bshd": q, k are transposed views of (B, S, H, D), as transformers passes them
    theta: float = 10000.0
    max_offset: int = 0  # each batch row's positions start at its own offset in [0, max_offset]

    def rotary(self, gen: torch.Generator):
        """cos, sin (B, S, D) as LlamaRotaryEmbedding builds them: fp32 angles, cast to q's dtype."""
        offsets = torch.randint(0, self.max_offset + 1, (self.batch, 1), generator=gen)
        positions = (torch.arange(self.seq)[None, :] + offsets).float()
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        freqs = positions[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(DEVICE, self.dtype), emb.sin().to(DEVICE, self.dtype)

    def tensors(self):
        gen = torch.Generator().manual_seed(self.seed)

        def make(heads):
            if self.layout == "bshd":
                t = torch.randn(self.batch, self.seq, heads, self.head_dim, generator=gen).transpose(1, 2)
            else:
                t = torch.randn(self.batch, heads, self.seq, self.head_dim, generator=gen)
            return t.to(device=DEVICE, dtype=self.dtype)

        q, k = make(self.q_heads), make(self.kv_heads)
        cos, sin = self.rotary(gen)
        grads = [torch.randn(*t.shape, generator=gen).to(DEVICE, self.dtype) for t in (q, k)]
        return q, k, cos, sin, grads


def _with_grads(fn, q, k, cos, sin, grads, **kwargs):
    """(q_embed, k_embed, dq, dk) of fn on fresh leaves with q's and k's strides."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k)]
    q_embed, k_embed = fn(*leaves, cos, sin, **kwargs)
    return (q_embed, k_embed, *torch.autograd.grad((q_embed, k_embed), leaves, grads))


def _oracle(q, k, cos, sin, grads):
    """The same four results in float64, written per half (y1 = x1 c - x2 s, y2 = x2 c + x1 s) with the
    gradients from float64 autograd -- independent of both backends' code."""
    cos, sin = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    half = q.shape[-1] // 2

    def rotate(x):
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos[..., :half] - x2 * sin[..., :half],
                          x2 * cos[..., half:] + x1 * sin[..., half:]), dim=-1)

    leaves = [t.detach().double().requires_grad_(True) for t in (q, k)]
    outs = [rotate(t) for t in leaves]
    return (*outs, *torch.autograd.grad(outs, leaves, [g.double() for g in grads]))


def check_parity(problem: Problem):
    """Asserts FlashAttention's rule for q_embed, k_embed, dq, dk; returns the kernel's four results."""
    q, k, cos, sin, grads = problem.tensors()
    ours = _with_grads(apply_rotary, q, k, cos, sin, grads)
    ref = _with_grads(reference_rotary, q, k, cos, sin, grads)
    exact = _oracle(q, k, cos, sin, grads)
    names = ("q_embed", "k_embed", "dq", "dk")
    for name, mine, theirs, truth, is_grad in zip(names, ours, ref, exact, (False, False, True, True)):
        err, ref_err = error(mine, truth), error(theirs, truth)
        bound = kernel_bound(ref_err, problem.dtype, grad=is_grad)
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (reference {ref_err:.3e}); {problem}"
    return ours


def _assert_identical(ours, theirs, names=("q_embed", "k_embed", "dq", "dk"), context=""):
    for name, a, b in zip(names, ours, theirs):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}; {context}"
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        assert torch.equal(a, b), f"{name}: not bit-identical (max diff {diff:.3e}); {context}"


# ------------------------------------------------------------------------------------------------
# Hypothesis: shapes, GQA ratios, head dims, layouts, positions
# ------------------------------------------------------------------------------------------------


@st.composite
def problems(draw, dtype: torch.dtype):
    kv_heads = draw(st.integers(1, 4))
    return Problem(
        batch=draw(st.integers(1, 3)),
        q_heads=kv_heads * draw(st.sampled_from([1, 2, 4])),
        kv_heads=kv_heads,
        seq=draw(st.sampled_from([1, 2, 17, MAX_LEN]) | st.integers(1, MAX_LEN)),
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        dtype=dtype,
        seed=draw(st.integers(0, 2**31 - 1)),
        layout=draw(st.sampled_from(["bshd", "bhsd"])),
        theta=draw(st.sampled_from([10000.0, 1e6])),  # Llama/Qwen/Gemma3-local; Gemma3-global
        max_offset=draw(st.sampled_from([0, 4096])),  # left padding / packed rows start mid-sequence
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(data=st.data())
def test_parity_any_shape(dtype, data):
    check_parity(data.draw(problems(dtype)))


# ------------------------------------------------------------------------------------------------
# The families' text shapes, by name
# ------------------------------------------------------------------------------------------------

SEQ = 2000 if GPU else 33
BATCH = 4 if GPU else 2
FAMILY_CASES = {  # (Hq, Hkv, D) of the language models
    "llama2_7b_llava": (32, 32, 128),
    "qwen2vl_7b_gqa7": (28, 4, 128),
    "pixtral_12b_mistral_gqa4": (32, 8, 128),
    "gemma3_4b_d256": (8, 4, 256),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_parity_family_shapes(name, dtype):
    q_heads, kv_heads, head_dim = FAMILY_CASES[name]
    check_parity(Problem(batch=BATCH, q_heads=q_heads, kv_heads=kv_heads, seq=SEQ, head_dim=head_dim,
                         dtype=dtype, seed=len(name), max_offset=4096))


# ------------------------------------------------------------------------------------------------
# Bit-identity: kernel == twin == transformers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@SETTINGS
@given(data=st.data())
def test_kernel_is_bit_identical_to_twin(dtype, data):
    """Rounding each product, then the sum, as eager PyTorch does: not merely within tolerance but
    equal, forward and backward."""
    problem = data.draw(problems(dtype))
    q, k, cos, sin, grads = problem.tensors()
    _assert_identical(_with_grads(apply_rotary, q, k, cos, sin, grads),
                      _with_grads(reference_rotary, q, k, cos, sin, grads), context=str(problem))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_twin_is_bit_identical_to_transformers(dtype):
    problem = Problem(batch=2, q_heads=4, kv_heads=2, seq=11, head_dim=64, dtype=dtype, seed=5, max_offset=4096)
    q, k, cos, sin, grads = problem.tensors()
    _assert_identical(_with_grads(reference_rotary, q, k, cos, sin, grads),
                      _with_grads(apply_rotary_pos_emb, q, k, cos, sin, grads), context=str(problem))


@pytest.mark.parametrize("rotary", [apply_rotary, reference_rotary], ids=["kernel", "twin"])
def test_heads_on_dim_2_with_unsqueeze_dim_2(rotary):
    """(B, S, H, D) inputs with unsqueeze_dim=2 give the (B, H, S, D) results transposed, contiguous."""
    problem = Problem(batch=2, q_heads=4, kv_heads=2, seq=7, head_dim=32, seed=9)
    q, k, cos, sin, grads = problem.tensors()
    heads_first = _with_grads(rotary, q, k, cos, sin, grads)
    heads_last = _with_grads(rotary, q.transpose(1, 2), k.transpose(1, 2), cos, sin,
                             [g.transpose(1, 2) for g in grads], unsqueeze_dim=2)
    assert heads_last[0].is_contiguous() and heads_last[1].is_contiguous()
    _assert_identical([t.transpose(1, 2) for t in heads_last], heads_first)


def test_cos_shared_across_the_batch():
    """cos, sin of shape (1, S, D) broadcast over the batch (read with a zero stride, not copied)."""
    problem = Problem(batch=3, q_heads=4, kv_heads=1, seq=5, head_dim=64, seed=13)
    q, k, cos, sin, grads = problem.tensors()
    cos, sin = cos[:1], sin[:1]
    _assert_identical(_with_grads(apply_rotary, q, k, cos, sin, grads),
                      _with_grads(reference_rotary, q, k, cos, sin, grads))


# ------------------------------------------------------------------------------------------------
# Layouts, unused outputs, repeated calls
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_outputs_keep_transformers_layout(layout):
    """Projection views in -> (B, H, S, D) views of (B, S, H, D) memory out, as transformers' eager ops
    give; dq, dk also come back in (B, S, H, D) memory, so the projections' `.view` needs no copy."""
    problem = Problem(batch=2, q_heads=4, kv_heads=2, seq=6, head_dim=32, seed=17, layout=layout)
    q, k, cos, sin, grads = problem.tensors()
    ours = _with_grads(apply_rotary, q, k, cos, sin, grads)
    hf = apply_rotary_pos_emb(q, k, cos, sin)
    for name, mine, theirs in zip(("q_embed", "k_embed"), ours, hf):
        assert mine.stride() == theirs.stride(), f"{name}: strides {mine.stride()} != transformers' {theirs.stride()}"
    heads_inner = layout == "bshd"
    for name, grad in zip(("dq", "dk"), ours[2:]):
        assert grad.transpose(1, 2).is_contiguous() == heads_inner, f"{name} strides {grad.stride()}"


def test_unused_k_embed_gives_no_k_gradient():
    """Only q_embed reaches the loss: dq is still exact and k gets no gradient (its heads are skipped)."""
    problem = Problem(batch=2, q_heads=4, kv_heads=2, seq=5, head_dim=32, seed=19)
    q, k, cos, sin, grads = problem.tensors()
    results = []
    for rotary in (apply_rotary, reference_rotary):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k)]
        q_embed, _ = rotary(*leaves, cos, sin)
        results.append(torch.autograd.grad(q_embed, leaves, grads[0], allow_unused=True))
    (dq, dk), (ref_dq, _) = results
    assert dk is None
    _assert_identical([dq], [ref_dq], names=("dq",))


def test_empty_sequence():
    problem = Problem(batch=2, q_heads=4, kv_heads=2, seq=0, head_dim=32)
    q, k, cos, sin, grads = problem.tensors()
    _assert_identical(_with_grads(apply_rotary, q, k, cos, sin, grads),
                      _with_grads(reference_rotary, q, k, cos, sin, grads))


def test_repeated_calls_are_identical():
    """From the second call on, compiled kernels are launched without Triton's dispatch (`launch`):
    the same shapes must give the same bits, forward and backward."""
    problem = Problem(batch=2, q_heads=8, kv_heads=2, seq=SEQ, head_dim=128, seed=23, max_offset=4096)
    q, k, cos, sin, grads = problem.tensors()
    first = _with_grads(apply_rotary, q, k, cos, sin, grads)
    _assert_identical(_with_grads(apply_rotary, q, k, cos, sin, grads), first)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def _small(dtype=torch.float32, head_dim=32):
    q = torch.randn(1, 4, 5, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(1, 2, 5, head_dim, device=DEVICE, dtype=dtype)
    cos = torch.randn(1, 5, head_dim, device=DEVICE, dtype=dtype)
    return q, k, cos, cos.clone()


@pytest.mark.parametrize("rotary", [apply_rotary, reference_rotary], ids=["kernel", "twin"])
@pytest.mark.parametrize("name", ["cos", "sin"])
def test_partial_rotary_dim_raises_naming_the_argument(rotary, name):
    """Rotary dim < head dim is the caller's slicing in transformers; here it is refused, by name."""
    q, k, cos, sin = _small()
    tables = {"cos": cos, "sin": sin}
    tables[name] = tables[name][..., :16]
    with pytest.raises(ValueError, match=rf"\b{name}\b.*head dim"):
        rotary(q, k, tables["cos"], tables["sin"])


def test_cos_requiring_grad_is_refused():
    q, k, cos, sin = _small()
    with pytest.raises(ValueError, match="cos and sin must not require grad"):
        apply_rotary(q, k, cos.requires_grad_(True), sin)


@pytest.mark.parametrize("case, match", [
    ("unsqueeze_dim_3", "unsqueeze_dim"), ("k_other_length", "k must share"), ("odd_head_dim", "even head dim"),
    ("cos_fp16", "q, k, cos, sin must share"), ("cos_2d", "cos and sin must be"),
])
def test_invalid_inputs_raise_value_error(case, match):
    q, k, cos, sin = _small(head_dim=33 if case == "odd_head_dim" else 32)
    kwargs = {}
    if case == "unsqueeze_dim_3":
        kwargs["unsqueeze_dim"] = 3
    elif case == "k_other_length":
        k = k[:, :, :3]
    elif case == "cos_fp16":
        cos = cos.half()
    elif case == "cos_2d":
        cos, sin = cos[0], sin[0]
    with pytest.raises(ValueError, match=match):
        apply_rotary(q, k, cos, sin, **kwargs)
