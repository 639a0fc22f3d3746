"""The Triton attention kernel against the float64 oracle, by FlashAttention's rule.

For the output, the log-sum-exp and dq, dk, dv: error(kernel, oracle) <= kernel_bound(error(reference
twin in the same dtype, oracle), dtype). On the CPU the kernels run in Triton's interpreter at small
shapes in float32 and float16 (the interpreter's bf16 `tl.dot` is wrong); with FASTVISION_DEVICE=cuda
the same tests run compiled, in bfloat16 and float16, at realistic lengths.
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

from conformance.oracle import attention_oracle, attention_oracle_grads  # noqa: E402
from conformance.tolerances import kernel_bound  # noqa: E402
from optimized.kernels.attention import (  # noqa: E402
    TilePlan,
    Tiles,
    attention,
    attention_forward,
    attention_with_plan,
    uses_dense_backward,
    uses_dense_kernel,
)
from optimized.kernels.attention import launchers as launcher_module  # noqa: E402
from optimized.kernels.attention import recorded as recorded_module  # noqa: E402
from reference.ops.attention import AttentionSpec, build_mask  # noqa: E402
from reference.ops.attention import attention as reference_attention  # noqa: E402
from tests.kernel_parity import DTYPES, GPU, error, hypothesis_settings, reference_error  # noqa: E402

# Lengths: odd ones cross tile edges (tiles are 32 in the interpreter, 64-128 compiled).
LENGTHS = (1, 255, 1000, 1024) if GPU else (1, 17, 63, 100, 128)
MAX_LEN = 1024 if GPU else 128  # hypothesis' lengths; the float64 oracle on the CPU bounds them
LONG = 2048 if GPU else 96  # the named family cases' sequence length
HEAD_DIMS = (64, 80, 128, 256) if GPU else (32, 64, 72, 80)
# Per dtype. Interpreter examples cost ~0.3-3 s each; compiled ones a compile per new flag combination.
EXAMPLES = 3 if GPU else 24
SETTINGS = hypothesis_settings(EXAMPLES)


@dataclasses.dataclass(frozen=True)
class Problem:
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    spec: AttentionSpec
    dtype: torch.dtype = DTYPES[0]
    seed: int = 0
    layout: str = "bhsd"  # "bshd": q, k, v are transposed views, as transformers passes them

    @property
    def device_spec(self) -> AttentionSpec:
        """The spec with its tensors on DEVICE, where the reference twin needs them."""
        moved = {name: getattr(self.spec, name).to(DEVICE) for name in ("key_padding", "cu_seqlens", "span_ids")
                 if getattr(self.spec, name) is not None}
        return dataclasses.replace(self.spec, **moved)

    def tensors(self):
        gen = torch.Generator().manual_seed(self.seed)

        def make(heads, length):
            if self.layout == "bshd":
                t = torch.randn(self.batch, length, heads, self.head_dim, generator=gen).transpose(1, 2)
            else:
                t = torch.randn(self.batch, heads, length, self.head_dim, generator=gen)
            return t.to(device=DEVICE, dtype=self.dtype)

        q, k, v = make(self.q_heads, self.q_len), make(self.kv_heads, self.kv_len), make(self.kv_heads, self.kv_len)
        grad = torch.randn(self.batch, self.q_heads, self.q_len, self.head_dim, generator=gen)
        return q, k, v, grad.to(device=DEVICE, dtype=self.dtype)


def _with_grads(fn, q, k, v, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, grad))


def _reference_lse(q, k, spec: AttentionSpec) -> torch.Tensor:
    """The log-sum-exp the reference's score path gives in the inputs' dtype."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * spec.resolved_scale(q.shape[-1])
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    mask = build_mask(spec, q.shape[0], q.shape[2], k.shape[2], q.device)
    return torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)


def check_parity(problem: Problem, plan: TilePlan | None = None, shape_inputs=None, shape_grad=None):
    """Asserts the rule for out, lse, dq, dk, dv; returns the kernel's (out, lse, dq, dk, dv).
    `shape_inputs(q, k, v)` may reshape the drawn N(0, 1) inputs into a harder score pattern,
    `shape_grad(grad)` give the output's gradient another layout."""
    q, k, v, grad = problem.tensors()
    if shape_inputs is not None:
        q, k, v = (t.to(problem.dtype) for t in shape_inputs(q.double(), k.double(), v.double()))
    if shape_grad is not None:
        grad = shape_grad(grad)
    spec, dtype = problem.device_spec, problem.dtype
    ours = _with_grads(lambda a, b, c: attention_with_plan(a, b, c, spec, plan), q, k, v, grad)
    ref = _with_grads(lambda a, b, c: reference_attention(a, b, c, spec), q, k, v, grad)
    exact_out, exact_lse = attention_oracle(q, k, v, spec)
    exact = (exact_out, *attention_oracle_grads(q, k, v, spec, grad))
    for name, mine, theirs, truth, is_grad in zip(("out", "dq", "dk", "dv"), ours, ref, exact, (0, 1, 1, 1)):
        err, ref_err = error(mine, truth), reference_error(theirs, truth)
        bound = kernel_bound(ref_err, dtype, grad=bool(is_grad))
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (reference {ref_err:.3e}); {problem}"

    _, lse = attention_forward(q, k, v, spec, plan)
    lse = lse.cpu().double()
    no_key = torch.isneginf(exact_lse)
    assert torch.equal(torch.isneginf(lse), no_key), f"lse -inf rows differ; {problem}"
    ref_lse = _reference_lse(q, k, spec).cpu().double()
    err, ref_err = error(lse[~no_key], exact_lse[~no_key]), reference_error(ref_lse[~no_key], exact_lse[~no_key])
    bound = kernel_bound(ref_err, dtype)
    assert err <= bound, f"lse: error {err:.3e} > bound {bound:.3e} (reference {ref_err:.3e}); {problem}"
    return (ours[0], lse, *ours[1:])


# ------------------------------------------------------------------------------------------------
# Hypothesis: every spec feature and their combinations
# ------------------------------------------------------------------------------------------------


@st.composite
def key_paddings(draw, batch: int, kv_len: int):
    kind = draw(st.sampled_from(["none", "left", "right", "holes"]))
    if kind == "none":
        return None
    if kind == "holes":
        seeds = draw(st.lists(st.booleans(), min_size=batch * kv_len, max_size=batch * kv_len))
        return torch.tensor(seeds, dtype=torch.bool).view(batch, kv_len)
    real = torch.zeros(batch, kv_len, dtype=torch.bool)
    for row in range(batch):
        n = draw(st.integers(0, kv_len))  # 0 real keys: the whole row attends nothing
        if kind == "left":
            real[row, kv_len - n:] = True
        else:
            real[row, :n] = True
    return real


@st.composite
def segment_bounds(draw, length: int):
    cuts = draw(st.lists(st.integers(1, max(1, length - 1)), max_size=4))
    edges = sorted({0, length, *cuts})
    return torch.tensor(edges, dtype=torch.int32)


@st.composite
def span_ids(draw, batch: int, kv_len: int):
    ids = torch.full((batch, kv_len), -1, dtype=torch.int64)
    for row in range(batch):
        for _ in range(draw(st.integers(1, 3))):
            start = draw(st.integers(0, kv_len - 1))
            width = draw(st.integers(1, max(1, kv_len // 3)))
            ids[row, start:start + width] = draw(st.integers(0, 1))  # ids may repeat: split spans
    return ids


@st.composite
def problems(draw, dtype: torch.dtype):
    kv_len = draw(st.sampled_from(LENGTHS) | st.integers(1, MAX_LEN))
    q_len = draw(st.sampled_from([kv_len, 1]) | st.integers(1, kv_len))
    segments = q_len == kv_len and draw(st.booleans())
    batch = 1 if segments else draw(st.integers(1, 2))
    causal = draw(st.booleans())
    spec = AttentionSpec(
        scale=draw(st.none() | st.floats(0.05, 0.5)),
        causal=causal,
        window=draw(st.none() | st.integers(1, kv_len + 1)),
        softcap=draw(st.none() | st.floats(2.0, 30.0)),
        key_padding=draw(key_paddings(batch, kv_len)),
        cu_seqlens=draw(segment_bounds(kv_len)) if segments else None,
        span_ids=draw(span_ids(batch, kv_len)) if causal and draw(st.booleans()) else None,
    )
    kv_heads = draw(st.sampled_from([1, 2]))
    return Problem(
        batch=batch, q_heads=kv_heads * draw(st.sampled_from([1, 2, 4])), kv_heads=kv_heads,
        q_len=q_len, kv_len=kv_len, head_dim=draw(st.sampled_from(HEAD_DIMS)), spec=spec,
        dtype=dtype, seed=draw(st.integers(0, 2**31 - 1)),
        layout=draw(st.sampled_from(["bhsd", "bshd"])),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(data=st.data())
def test_parity_any_spec(dtype, data):
    check_parity(data.draw(problems(dtype)))


# ------------------------------------------------------------------------------------------------
# The five families' attentions, by name, in both dtypes
# ------------------------------------------------------------------------------------------------


def _left_padding(lengths, kv_len):
    real = torch.zeros(len(lengths), kv_len, dtype=torch.bool)
    for row, n in enumerate(lengths):
        real[row, kv_len - n:] = True
    return real


def _span(kv_len, start, width):
    ids = torch.full((1, kv_len), -1, dtype=torch.int64)
    ids[0, start:start + width] = 0
    return ids


def _equal_segments(count, width):
    return torch.arange(0, count * width + 1, width, dtype=torch.int32)


WINDOW = 64 if GPU else 16  # Qwen2.5-VL vision windows: 64 patches (8 x 8 merged)
FAMILY_CASES = {
    "text_causal_gqa4_d128": dict(batch=1, q_heads=4, kv_heads=1, q_len=LONG, kv_len=LONG, head_dim=128,
                                  spec=AttentionSpec(causal=True)),
    "text_left_padded_chunk_d64": dict(batch=2, q_heads=4, kv_heads=2, q_len=LONG // 2 + 1, kv_len=LONG,
                                       head_dim=64, spec=AttentionSpec(
                                           causal=True, key_padding=_left_padding([LONG, LONG // 3], LONG))),
    "decode_step_gqa4_d128": dict(batch=2, q_heads=4, kv_heads=1, q_len=1, kv_len=LONG - 3, head_dim=128,
                                  spec=AttentionSpec(causal=True)),
    "gemma3_sliding_softcap_d256": dict(batch=1, q_heads=2, kv_heads=1, q_len=LONG, kv_len=LONG,
                                        head_dim=256, spec=AttentionSpec(
                                            causal=True, window=LONG // 4, softcap=50.0, scale=168**-0.5)),
    "gemma3_image_span_d256": dict(batch=1, q_heads=2, kv_heads=1, q_len=LONG, kv_len=LONG, head_dim=256,
                                   spec=AttentionSpec(causal=True, window=LONG // 2,
                                                      span_ids=_span(LONG, LONG // 4, LONG // 8))),
    "qwen2vl_vision_varlen_d80": dict(batch=1, q_heads=4, kv_heads=4, q_len=LONG, kv_len=LONG, head_dim=80,
                                      spec=AttentionSpec(cu_seqlens=torch.tensor(
                                          [0, LONG * 7 // 20, LONG * 13 // 20, LONG], dtype=torch.int32))),
    "pixtral_vision_blockdiag_d64": dict(batch=1, q_heads=4, kv_heads=4, q_len=LONG, kv_len=LONG,
                                         head_dim=64, spec=AttentionSpec(cu_seqlens=_equal_segments(4, LONG // 4))),
    "qwen25vl_vision_windows_d80": dict(batch=1, q_heads=4, kv_heads=4, q_len=WINDOW * 9, kv_len=WINDOW * 9,
                                        head_dim=80, spec=AttentionSpec(cu_seqlens=_equal_segments(9, WINDOW))),
    "siglip_odd_length_d72": dict(batch=2, q_heads=4, kv_heads=4, q_len=LONG // 2 + 1, kv_len=LONG // 2 + 1,
                                  head_dim=72, spec=AttentionSpec()),
    "padding_holes_window_d32": dict(batch=2, q_heads=2, kv_heads=1, q_len=LONG // 2, kv_len=LONG // 2,
                                     head_dim=32, spec=AttentionSpec(
                                         window=LONG // 8,
                                         key_padding=torch.arange(LONG // 2).remainder(3).ne(0).expand(2, -1))),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_parity_family_cases(name, dtype):
    check_parity(Problem(dtype=dtype, seed=len(name), layout="bshd", **FAMILY_CASES[name]))


HEAD_DIM_GRID = [(d, g) for d in (32, 64, 72, 80, 128, 256) for g in (1, 2, 4, 8)]
if GPU:  # each pair is a fresh compile (~10 s for three kernels): a diagonal covers every dim and ratio
    HEAD_DIM_GRID = [(32, 8), (64, 4), (72, 2), (80, 1), (80, 4), (128, 8), (256, 2)]


@pytest.mark.parametrize("head_dim, group", HEAD_DIM_GRID)
def test_parity_head_dims_and_gqa_ratios(head_dim, group):
    """Head dims 32-256 (72 and 80 run as 64 + 16 columns) with GQA ratios 1, 2, 4; group 8 over one KV
    head is MQA."""
    kv_heads = 1 if group == 8 else 2
    length = LONG // 2 + 3
    check_parity(Problem(batch=1, q_heads=kv_heads * group, kv_heads=kv_heads, q_len=length - 20,
                         kv_len=length, head_dim=head_dim, spec=AttentionSpec(causal=True), seed=head_dim))


@pytest.mark.parametrize("head_dim", (72, 128, 256))
def test_float32_at_large_head_dims(head_dim):
    """fp32 inputs (dtype=float32 on a GPU) take their own plan there: the bf16 plans' tiles at 4 bytes an
    element pass the H100's shared memory at d256. Odd lengths, GQA, causal."""
    length = LONG // 2 + 1
    check_parity(Problem(batch=2, q_heads=4, kv_heads=2, q_len=length, kv_len=length, head_dim=head_dim,
                         spec=AttentionSpec(causal=True), dtype=torch.float32, seed=head_dim))


# Tile shapes where BLOCK_M != BLOCK_N, so the tile plans' rounding is exercised in both directions.
PLANS = {
    "m64n16": TilePlan(Tiles(64, 16, 4, 2), Tiles(64, 16, 4, 2), Tiles(64, 16, 4, 2)),
    "m16n64": TilePlan(Tiles(16, 64, 4, 2), Tiles(16, 64, 4, 2), Tiles(16, 64, 4, 2)),
}


TILE_CASES = [(name, plan) for plan in sorted(PLANS) for name in (
    "gemma3_image_span_d256", "qwen25vl_vision_windows_d80", "text_left_padded_chunk_d64", "padding_holes_window_d32")]
if GPU:  # the tile plans' logic is the interpreter's to cover; compiled, one case per shape
    TILE_CASES = [("gemma3_image_span_d256", "m64n16"), ("text_left_padded_chunk_d64", "m16n64")]


@pytest.mark.parametrize("name, plan", TILE_CASES)
def test_parity_other_tile_shapes(name, plan):
    check_parity(Problem(seed=7, **FAMILY_CASES[name]), PLANS[plan])


# ------------------------------------------------------------------------------------------------
# Rows with nothing to attend, layouts, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_give_zero_output_and_grads(dtype):
    """Left padding under causality leaves the first queries of row 1 with no key; row 0's keys are all
    padding. Their outputs and dq must be exactly 0 with lse -inf, and keys nobody sees get 0 dk, dv."""
    length = LONG // 2
    real = torch.zeros(2, length, dtype=torch.bool)
    real[1, length // 3:] = True
    problem = Problem(batch=2, q_heads=4, kv_heads=2, q_len=length, kv_len=length, head_dim=64,
                      spec=AttentionSpec(causal=True, key_padding=real, window=length // 2),
                      dtype=dtype, seed=3)
    out, lse, dq, dk, dv = check_parity(problem)
    empty_rows = torch.zeros(2, length, dtype=torch.bool)
    empty_rows[0] = True
    empty_rows[1, : length // 3] = True
    empty_rows = empty_rows.to(out.device)
    for name, t in (("out", out), ("dq", dq)):
        assert t.isfinite().all(), name
        assert t.transpose(1, 2)[empty_rows].eq(0).all(), f"{name} not 0 on rows with no key"
    assert torch.isneginf(lse.transpose(1, 2)[empty_rows.cpu()]).all()
    for name, t in (("dk", dk), ("dv", dv)):
        assert t.transpose(1, 2)[~real.to(t.device)].eq(0).all(), f"{name} not 0 on padded keys"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scores_rising_along_the_keys(dtype):
    """Scores that climb 0.12 log2 units a key (q ~ 1, k ~ 0.0104 * key index, d64: q.k * scale * log2 e
    = 11.5 * 0.0104 per key), so every key tile raises each row's running maximum and the forward must
    rescale its sums and accumulators right (dropping one rescale fails this)."""
    length = LONG + 5

    def rising(q, k, v):
        ramp = torch.arange(k.shape[2], dtype=k.dtype, device=k.device)[:, None] * 0.0104
        return q * 0.25 + 1.0, k * 0.25 + ramp, v

    check_parity(Problem(batch=1, q_heads=4, kv_heads=2, q_len=length, kv_len=length, head_dim=64,
                         spec=AttentionSpec(causal=True), dtype=dtype, seed=13), shape_inputs=rising)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_very_negative_scores_after_masked_tiles(dtype):
    """Every score near -141 (exp underflows fp32 below -103): a row whose first visited key tile is
    wholly outside its window must still get its softmax, not be taken for a row with no key."""
    length = LONG // 2 + 3

    def far_apart(q, k, v):
        return torch.full_like(q, 5.0), torch.full_like(k, -5.0), v

    check_parity(Problem(batch=1, q_heads=2, kv_heads=1, q_len=length, kv_len=length, head_dim=32,
                         spec=AttentionSpec(causal=True, window=length // 3), dtype=dtype, seed=17),
                 shape_inputs=far_apart)


def test_transposed_views_keep_their_layout():
    """transformers hands (B, S, H, D) memory viewed as (B, H, S, D): no copy in, same layout out."""
    problem = Problem(layout="bshd", seed=11, **FAMILY_CASES["text_left_padded_chunk_d64"])
    q, k, v, _ = problem.tensors()
    out = attention(q, k, v, problem.device_spec)
    assert out.shape == q.shape and out.stride() == q.stride()
    assert out.transpose(1, 2).is_contiguous()


def test_dense_mask_is_rejected_by_name():
    q = torch.randn(1, 2, 8, 32, device=DEVICE)
    spec = AttentionSpec(dense_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="dense_mask"):
        attention(q, q, q, spec)


@pytest.mark.parametrize(
    "q_shape, kv_shape, softcap, match",
    [((1, 3, 8, 32), (1, 2, 8, 32), None, "Hq % Hkv"), ((1, 2, 9, 32), (1, 2, 8, 32), None, "Sq <= Sk"),
     ((1, 2, 8, 512), (1, 2, 8, 512), None, "head dim"), ((1, 2, 8, 32), (1, 2, 8, 32), 0.0, "softcap")],
)
def test_invalid_inputs_raise_value_error(q_shape, kv_shape, softcap, match):
    q, kv = torch.randn(q_shape, device=DEVICE), torch.randn(kv_shape, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        attention(q, kv, kv, AttentionSpec(softcap=softcap))


def test_accepts_use_sdpa_for_signature_parity():
    problem = Problem(seed=5, **FAMILY_CASES["siglip_odd_length_d72"])
    q, k, v, _ = problem.tensors()
    spec = problem.device_spec
    assert torch.equal(attention(q, k, v, spec, use_sdpa=False), attention(q, k, v, spec))


@pytest.mark.parametrize("name", ["gemma3_image_span_d256", "qwen2vl_vision_varlen_d80"])
def test_repeated_calls_are_identical(name):
    """From the second call on, compiled kernels are launched without Triton's dispatch (`_launch`):
    the same shapes must give the same bits, forward and backward."""
    problem = Problem(layout="bshd", seed=13, **FAMILY_CASES[name])
    q, k, v, grad = problem.tensors()
    spec = problem.device_spec
    first = _with_grads(lambda a, b, c: attention(a, b, c, spec), q, k, v, grad)
    second = _with_grads(lambda a, b, c: attention(a, b, c, spec), q, k, v, grad)
    for one, two in zip(first, second):
        assert torch.equal(one, two)


def _launch_spy(monkeypatch) -> list:
    """Records the attention kernels launched through the keyed path (`_launch_bound`); recorded launches
    skip it."""
    keyed = []
    real = launcher_module._launch_bound

    def spy(kernel, grid, *args, **kwargs):
        keyed.append(kernel.fn.__name__)
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launcher_module, "_launch_bound", spy)
    return keyed


def test_a_repeated_call_signature_reuses_its_launches_on_the_new_tensors(monkeypatch):
    """The second call has the first's shapes, strides and segment count, but other values and other
    segment boundaries: it goes straight to the recorded launches and must still read its own tensors."""
    keyed = _launch_spy(monkeypatch)
    shapes = dict(batch=1, q_heads=4, kv_heads=2, q_len=LONG, kv_len=LONG, head_dim=80, layout="bshd")
    cuts = ([0, LONG // 3, LONG // 2, LONG], [0, 5, LONG - 7, LONG])
    first, second = (Problem(seed=21 + i, spec=AttentionSpec(cu_seqlens=torch.tensor(cut, dtype=torch.int32)),
                             **shapes) for i, cut in enumerate(cuts))
    check_parity(first)
    launched_by_first = len(keyed)
    check_parity(second)
    # attention_forward (the lse check) is not recorded: its one forward launch is keyed
    assert keyed[launched_by_first:] == ["_attn_fwd_kernel"]


def test_calls_differing_only_in_scalars_are_not_mixed_up():
    """Scale, window and causality are kernel arguments a recorded launch fixes: each must get its own."""
    shapes = dict(batch=1, q_heads=2, kv_heads=1, q_len=LONG // 2 + 3, kv_len=LONG // 2 + 3, head_dim=64)
    for spec in (AttentionSpec(causal=True), AttentionSpec(causal=True, scale=0.3),
                 AttentionSpec(causal=True, window=9), AttentionSpec(), AttentionSpec(softcap=5.0)):
        check_parity(Problem(seed=3, spec=spec, **shapes))


DENSE_KERNELS = {"_attn_fwd_dense_kernel", "_attn_bwd_dq_dense_kernel", "_attn_bwd_dkdv_dense_kernel"}


def test_a_repeated_dense_call_reuses_its_launches_on_the_new_tensors(monkeypatch):
    """As above for a dense spec, whose three kernels read their tiles through TMA descriptors: the
    recorded launches must build them on the second call's tensors, not reuse the first call's."""
    keyed = _launch_spy(monkeypatch)
    monkeypatch.setattr(recorded_module, "_RECORDED", {})
    shapes = dict(batch=2, q_heads=4, kv_heads=2, q_len=LONG - 5, kv_len=LONG, head_dim=64, layout="bshd")
    first, second = (Problem(seed=31 + i, spec=AttentionSpec(causal=True), **shapes) for i in range(2))
    check_parity(first)
    launched_by_first = len(keyed)
    check_parity(second)
    assert set(keyed[:launched_by_first]) == DENSE_KERNELS
    assert keyed[launched_by_first:] == ["_attn_fwd_dense_kernel"]


@pytest.mark.parametrize("layout", ["broadcast", "unaligned"])
def test_a_dense_backward_copies_a_gradient_tma_cannot_read(monkeypatch, layout):
    """out.sum()'s gradient is a broadcast (zero strides), and a view can start off a 16-byte boundary:
    TMA can read neither, so the dense backward copies such a gradient and still runs its own kernels."""
    keyed = _launch_spy(monkeypatch)
    monkeypatch.setattr(recorded_module, "_RECORDED", {})

    def reshape(grad):
        if layout == "broadcast":
            return grad[:, :, :1].expand_as(grad)
        flat = torch.empty(grad.numel() + 1, device=grad.device, dtype=grad.dtype)
        flat[1:] = grad.flatten()
        return flat[1:].view_as(grad)

    problem = Problem(batch=2, q_heads=4, kv_heads=2, q_len=LONG - 3, kv_len=LONG, head_dim=64,
                      spec=AttentionSpec(causal=True), seed=8)
    check_parity(problem, shape_grad=reshape)
    assert set(keyed) == DENSE_KERNELS


@pytest.mark.parametrize("by_head", [True, False], ids=["by_head", "by_tile"])
def test_both_tile_orders_cover_every_query_tile(monkeypatch, by_head):
    """A GPU picks _tile_order's order by grid size; either must visit every (head, query tile) once, in
    the forward and dQ, dense and general (key padding takes the general kernels)."""
    monkeypatch.setattr(launcher_module, "_by_head", lambda *args: by_head)
    monkeypatch.setattr(recorded_module, "_RECORDED", {})  # a recorded launch would keep the other order
    length = LONG + 7
    padding = torch.ones(2, length, dtype=torch.bool)
    padding[1, :5] = False
    for spec in (AttentionSpec(causal=True), AttentionSpec(causal=True, key_padding=padding)):
        check_parity(Problem(batch=2, q_heads=4, kv_heads=2, q_len=length, kv_len=length, head_dim=64, spec=spec,
                             seed=5))


def test_only_dense_specs_on_tma_readable_tensors_take_the_dense_kernel():
    """The dense forward has no mask structure: anything beyond causal or full must take the general one."""
    dtype = DTYPES[-1]
    q = torch.randn(1, 4, 40, 64, device=DEVICE, dtype=dtype)
    kv = torch.randn(1, 2, 48, 64, device=DEVICE, dtype=dtype)
    assert uses_dense_kernel(q, kv, kv, AttentionSpec(causal=True))
    assert uses_dense_kernel(q, kv, kv, AttentionSpec(scale=0.2))
    for spec in (AttentionSpec(causal=True, window=8), AttentionSpec(softcap=30.0), AttentionSpec(scale=-0.1),
                 AttentionSpec(key_padding=torch.ones(1, 48, dtype=torch.bool, device=DEVICE)),
                 AttentionSpec(causal=True, span_ids=torch.zeros(1, 48, dtype=torch.int64, device=DEVICE)),
                 AttentionSpec(cu_seqlens=torch.tensor([0, 20, 48], dtype=torch.int32, device=DEVICE))):
        assert not uses_dense_kernel(q, kv, kv, spec), spec
    odd_dim = torch.randn(1, 4, 40, 80, device=DEVICE, dtype=dtype)  # runs as 64 + 16 columns
    assert not uses_dense_kernel(odd_dim, odd_dim[:, :2], odd_dim[:, :2], AttentionSpec(causal=True))
    unaligned = torch.randn(4 * 40 * 64 + 1, device=DEVICE, dtype=dtype)[1:].view(1, 4, 40, 64)
    assert not uses_dense_kernel(unaligned, kv, kv, AttentionSpec(causal=True))
    causal = AttentionSpec(causal=True)
    assert uses_dense_backward(q, kv, kv, torch.randn_like(q), causal)
    assert not uses_dense_backward(q, kv, kv, unaligned, causal)
    assert not uses_dense_backward(q, kv, kv, q[:, :, :1].expand_as(q), causal)  # zero stride
    assert not uses_dense_backward(q, kv, kv, q, AttentionSpec(causal=True, window=8))
