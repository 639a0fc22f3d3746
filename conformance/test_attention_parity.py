"""Attention parity: each family's attention, as transformers calls it, against the float64 oracle.

The suite reaches a backend's attention the way a model does: it loads the family's tiny checkpoint
through the backend, reads the attention key from the config of the family's real attention module
(`module.config._attn_implementation`, per sub-config), and fetches the registered functions from
transformers' `ALL_ATTENTION_FUNCTIONS` and `ALL_MASK_ATTENTION_FUNCTIONS`. Text masks are built
through the key's mask builder from transformers' own mask functions (causal, sliding window, Gemma3's
image blocks, a 2-D padding mask), composed as `create_causal_mask` and Gemma3's
`create_masks_for_vision_model` compose them; vision calls are made as each tower makes them (Qwen:
once per image with no mask; Pixtral: one call with the block-diagonal float mask; CLIP and SigLIP: a
batch with no mask). A backend that ignores padding or maps GQA heads wrongly therefore fails here.

Judged by FlashAttention's rule on rows that have a key to attend to:
    err(backend, oracle) <= kernel_bound(err(plain reference in the same dtype, oracle), dtype)
for the output and for dq, dk, dv. The plain reference is transformers' own `sdpa_attention_forward`
(or Gemma2's eager attention where a softcap is drawn) on the dense mask transformers' `sdpa_mask`
evaluates, run in the case's dtype. Rows with no key must be exactly 0, never NaN.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect

import pytest
import torch
from hypothesis import event, example, given
from transformers import masking_utils as mu
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as softcap_eager_forward
from transformers.models.pixtral.modeling_pixtral import generate_block_attention_mask

from conformance import checks, families, oracle, tolerances, zoo
from conformance.strategies import AttentionCase, text_attention_cases, vision_attention_cases

# Which mask features a language model uses and how a vision tower calls attention are on each family's
# record (`Family.text_mask_features`, `Family.vision_call`).
PACKED_FAMILIES = tuple(f.name for f in families.FAMILIES.values() if f.packs_vision_batch)
BATCHED_FAMILIES = tuple(f.name for f in families.FAMILIES.values() if not f.packs_vision_batch)

# Explicit examples, each exercising one feature alone, so a fault is reported by the feature it breaks.
GQA = AttentionCase(batch=1, q_heads=6, kv_heads=2, q_len=12, kv_len=12, head_dim=32, scale=32**-0.5, seed=1)
LEFT_PADDING = AttentionCase(batch=2, q_heads=4, kv_heads=4, q_len=10, kv_len=10, head_dim=64, scale=64**-0.5,
                             padding=(("left", 4), ("left", 0)), seed=2)
DECODE = AttentionCase(batch=2, q_heads=4, kv_heads=4, q_len=3, kv_len=16, head_dim=64, scale=64**-0.5, seed=3)
SCALE = AttentionCase(batch=1, q_heads=2, kv_heads=2, q_len=9, kv_len=9, head_dim=32, scale=24**-0.5, seed=4)
WINDOW = AttentionCase(batch=1, q_heads=2, kv_heads=2, q_len=20, kv_len=20, head_dim=32, scale=32**-0.5,
                       window=5, seed=5)
SPANS = AttentionCase(batch=2, q_heads=2, kv_heads=2, q_len=24, kv_len=24, head_dim=32, scale=32**-0.5,
                      spans=(((3, 8),), ((10, 6), (18, 4))), seed=6)
SOFTCAP = AttentionCase(batch=1, q_heads=2, kv_heads=2, q_len=8, kv_len=8, head_dim=32, scale=32**-0.5,
                        softcap=2.0, seed=7)
PACKED = AttentionCase(batch=1, q_heads=2, kv_heads=2, q_len=20, kv_len=20, head_dim=80, scale=80**-0.5,
                       causal=False, segments=(12, 8), seed=8)
BATCHED = AttentionCase(batch=2, q_heads=2, kv_heads=2, q_len=17, kv_len=17, head_dim=72, scale=72**-0.5,
                        causal=False, seed=9)


# ------------------------------------------------------------------------------- the backend's model
@functools.cache
def _model(backend, family: str, device: str):
    model, _ = backend.FastVisionModel.from_pretrained(str(zoo.checkpoint(family)), load_in_4bit=False,
                                                       device_map=device)
    return model


def _attention_module(model, family: str, role: str, *, sliding: bool | None = None):
    """The family's first real attention module of the language model ("text") or vision tower."""
    record = families.FAMILIES[family]
    root, class_name = {
        "text": (record.language_model, record.text_attention_class),
        "vision": (record.vision_tower, record.vision_attention_class),
    }[role]
    for module in model.get_submodule(root).modules():
        if type(module).__name__ == class_name:
            if sliding is None or bool(getattr(module, "sliding_window", None)) == sliding:
                return module
    raise AssertionError(f"{family}: no {class_name} under {root} (sliding={sliding})")


def _twin(module, case: AttentionCase):
    """A shallow copy of the family's attention module (same class, same config) carrying the drawn
    case's head layout: transformers' functions, and a backend's, read these attributes."""
    twin = copy.copy(module)
    twin.__dict__.update(num_key_value_groups=case.q_heads // case.kv_heads, head_dim=case.head_dim,
                         scaling=case.scale, training=False)
    for name in ("num_heads", "num_attention_heads"):
        if name in module.__dict__:
            twin.__dict__[name] = case.q_heads
    if "sliding_window" in module.__dict__:
        twin.__dict__["sliding_window"] = case.window
    return twin


# ------------------------------------------------------------------------------------------- masks
def _composition(case: AttentionCase, span_ids):
    """(mask function, extra mask-builder kwargs), composed as transformers composes them."""
    if case.spans is not None and case.window is not None:  # Gemma3 sliding layers: AND(window, OR(causal, block))
        function = mu.and_masks(mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(span_ids)),
                                mu.sliding_window_overlay(case.window))
        return function, {"allow_is_causal_skip": False, "use_vmap": True}
    if case.spans is not None:  # Gemma3 full layers: create_causal_mask(block_sequence_ids=...)
        return mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(span_ids)), {"allow_is_causal_skip": False}
    if case.window is not None:  # create_sliding_window_causal_mask
        return mu.sliding_window_causal_mask_function(case.window), {"local_size": case.window}
    return mu.causal_mask_function, {}


def _text_mask_arguments(case: AttentionCase, config, device) -> dict:
    span_ids = case.span_ids()
    function, extra = _composition(case, None if span_ids is None else span_ids.to(device))
    padding = case.key_padding()
    padding = torch.ones(case.batch, case.kv_len, dtype=torch.bool) if padding is None else padding
    return dict(batch_size=case.batch, **_sizes(case, device), kv_offset=0, mask_function=function,
                attention_mask=padding.to(device), dtype=case.dtype, config=config, device=device,
                **{"allow_is_causal_skip": True, "use_vmap": False, **extra})


def _sizes(case: AttentionCase, device) -> dict:
    """Query and key sizes in the installed transformers' mask-builder convention: q_length/q_offset
    (>= 5.20), or the query positions as cache_position (5.17-5.19). Queries end at the last key."""
    if "q_length" in inspect.signature(mu.sdpa_mask).parameters:
        return {"q_length": case.q_len, "q_offset": case.kv_len - case.q_len, "kv_length": case.kv_len}
    return {"cache_position": torch.arange(case.kv_len - case.q_len, case.kv_len, device=device),
            "kv_length": case.kv_len}


def _dense(case: AttentionCase, mask: torch.Tensor | None) -> torch.Tensor:
    """The (B, 1, Sq, Sk) bool mask of the plain reference; it must say exactly what the case's spec
    says, or the suite itself is wrong (and its bound would be meaningless)."""
    dense = mask if mask is not None else torch.ones(case.batch, 1, case.q_len, case.kv_len, dtype=torch.bool)
    dense = dense.expand(case.batch, 1, case.q_len, case.kv_len).cpu()
    if not torch.equal(dense[:, 0], case.allowed()):
        raise RuntimeError(f"suite bug: transformers' mask for {case!r} differs from the case's spec")
    return dense


# ------------------------------------------------------------------------------------------ judging
def _plain_reference(twin, q, k, v, dense: torch.Tensor, case: AttentionCase):
    """transformers' own attention in the case's dtype on the dense mask."""
    dense = dense.to(q.device)
    if case.softcap is None:
        return sdpa_attention_forward(twin, q, k, v, dense, dropout=0.0, scaling=case.scale)[0]
    additive = torch.zeros(dense.shape, dtype=q.dtype, device=q.device).masked_fill(~dense, torch.finfo(q.dtype).min)
    return softcap_eager_forward(twin, q, k, v, additive, dropout=0.0, scaling=case.scale, softcap=case.softcap)[0]


def _leaves(case: AttentionCase, device):
    return [t.requires_grad_(True) for t in case.tensors(device)]


def _run(call, case: AttentionCase, device, grad_out: torch.Tensor):
    """out (B, Sq, Hq, D) and (dq, dk, dv) of `call(q, k, v)` with the backward of sum(out * grad_out)."""
    q, k, v = _leaves(case, device)
    out = call(q, k, v)
    out.backward(grad_out.to(device=out.device, dtype=out.dtype))
    return out.detach(), (q.grad, k.grad, v.grad)


def _judge(what: str, case: AttentionCase, dense, call, plain_call, device, *, repro: str) -> None:
    """Compare `call` (the backend) and `plain_call` (transformers' plain attention) with the oracle."""
    rows = dense.any(dim=-1).transpose(1, 2)[..., None]  # (B, Sq, 1, 1): the row has a key
    generator = torch.Generator().manual_seed(case.seed + 1)
    grad_out = torch.randn(case.batch, case.q_len, case.q_heads, case.head_dim, generator=generator) * rows
    q, k, v = case.tensors("cpu")
    want, _ = oracle.attention_oracle(q, k, v, case.spec())
    want_grads = oracle.attention_oracle_grads(q, k, v, case.spec(), grad_out.transpose(1, 2))
    got, got_grads = _run(call, case, device, grad_out)
    plain, plain_grads = _run(plain_call, case, device, grad_out)
    expected_shape = (case.batch, case.q_len, case.q_heads, case.head_dim)
    checks.check(tuple(got.shape) == expected_shape,
                 f"{what} returned shape {tuple(got.shape)}, transformers expects (B, Sq, Hq, D) = {expected_shape}",
                 repro=repro)
    got64 = got.double().cpu()
    masked = ~rows.expand_as(got64)
    checks.check(bool(torch.isfinite(got64[~masked]).all()), f"{what} gave NaN/inf on rows with keys: {case}",
                 repro=repro)
    _check_bound(f"{what} output", case, got64, plain, want.transpose(1, 2), rows, grad=False, repro=repro)
    if not bool((got64[masked] == 0).all()):
        raise checks.fail(f"{what} gave {_describe_nonzero(got64[masked])} on {case.fully_masked_rows()} fully "
                          f"masked query rows (must be exactly 0, never NaN): {case}", repro)
    for name, g, p, w in zip(("dq", "dk", "dv"), got_grads, plain_grads, want_grads):
        layout_rows = rows.transpose(1, 2) if name == "dq" else None  # dq is (B, Hq, Sq, D); dk, dv: every row
        _check_bound(f"{what} {name}", case, g.double().cpu(), p, w, layout_rows, grad=True, repro=repro)


def _describe_nonzero(values: torch.Tensor) -> str:
    if torch.isnan(values).any():
        return "NaN"
    return f"non-zero values (max |x| = {values.abs().max().item():.3g})"


def _check_bound(what, case, got64, plain, want, rows, *, grad: bool, repro: str) -> None:
    select = (lambda t: t[rows.expand_as(t)]) if rows is not None else (lambda t: t.flatten())
    want = want.double()
    err = (select(got64) - select(want)).abs().max().item() if select(want).numel() else 0.0
    plain_err = (select(plain.double().cpu()) - select(want)).abs().max().item() if select(want).numel() else 0.0
    bound = tolerances.kernel_bound(plain_err, case.dtype, grad=grad)
    checks.check(err <= bound,  # a NaN error fails here too
                 f"{what} differs from the float64 oracle by {err:.3g} > bound {bound:.3g} (transformers' plain "
                 f"attention in {case.dtype}: {plain_err:.3g}) on {case}", repro=repro)


# ------------------------------------------------------------------------------------------ checks
def check_text_attention(backend, family: str, case: AttentionCase, device: str = "cpu") -> None:
    """The family's registered text attention on `case`, called as its language model calls it."""
    case = _for_family(case, family)
    model = _model(backend, family, device)
    sliding = case.window is not None if families.FAMILIES[family].has_sliding_window else None
    module = _attention_module(model, family, "text", sliding=sliding)
    key = module.config._attn_implementation
    twin = _twin(module, case)
    arguments = _text_mask_arguments(case, module.config, device)
    # What _preprocess_mask_arguments does: a key without a mask builder gets attention_mask=None.
    builder = mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(key)
    mask = builder(**arguments) if builder is not None else None
    dense = _dense(case, mu.sdpa_mask(**{**arguments, "allow_is_causal_skip": False}))
    function = ALL_ATTENTION_FUNCTIONS[key]
    extra = {"sliding_window": case.window} | ({"softcap": case.softcap} if case.softcap is not None else {})

    def call(q, k, v):
        return function(twin, q, k, v, mask, dropout=0.0, scaling=case.scale, **extra)[0]

    repro = f"check_text_attention({backend.__name__}, {family!r}, {case!r}, {device!r})"
    _judge(f"{family} text attention ({key!r})", case, dense, call,
           lambda q, k, v: _plain_reference(twin, q, k, v, dense, case), device, repro=repro)


def _for_family(case: AttentionCase, family: str) -> AttentionCase:
    """Drop mask features the family's language model never uses (a drawn case is family-agnostic)."""
    features = families.FAMILIES[family].text_mask_features
    return dataclasses.replace(case, window=case.window if "window" in features else None,
                               spans=case.spans if "spans" in features else None)


def check_vision_attention(backend, family: str, case: AttentionCase, device: str = "cpu") -> None:
    """The family's registered vision attention on `case`, called as its vision tower calls it."""
    model = _model(backend, family, device)
    module = _attention_module(model, family, "vision")
    key = module.config._attn_implementation
    twin = _twin(module, case)
    function = ALL_ATTENTION_FUNCTIONS[key]
    how = families.FAMILIES[family].vision_call
    segments = list(case.segments or ())
    if how == "per_image":
        dense_from_transformers = _packed_mask(case)

        def call(q, k, v):
            parts = zip(*(t.split(segments, dim=2) for t in (q, k, v)))
            outs = [function(twin, qi, ki, vi, attention_mask=None, scaling=case.scale, dropout=0.0, is_causal=False)[0]
                    for qi, ki, vi in parts]
            return torch.cat(outs, dim=1)
    elif how == "block_mask":
        dense_from_transformers = _packed_mask(case)

        def call(q, k, v):
            like = torch.empty(1, case.q_len, 1, dtype=q.dtype, device=q.device)  # only its dtype and length are read
            mask = generate_block_attention_mask(segments, like)
            return function(twin, q, k, v, mask, dropout=0.0, scaling=case.scale)[0]
    else:
        dense_from_transformers = None
        extra = {"is_causal": False} if how == "batched_not_causal" else {}

        def call(q, k, v):
            return function(twin, q, k, v, None, scaling=case.scale, dropout=0.0, **extra)[0]

    dense = _dense(case, dense_from_transformers)
    repro = f"check_vision_attention({backend.__name__}, {family!r}, {case!r}, {device!r})"
    _judge(f"{family} vision attention ({key!r}, {how})", case, dense, call,
           lambda q, k, v: _plain_reference(twin, q, k, v, dense, case), device, repro=repro)


def _packed_mask(case: AttentionCase) -> torch.Tensor:
    """Packed images as transformers' own mask functions describe them: bidirectional within a segment."""
    segment = torch.repeat_interleave(torch.arange(len(case.segments)), torch.tensor(case.segments))[None]
    function = mu.and_masks(mu.bidirectional_mask_function, mu.packed_sequence_mask_function(segment))
    return mu.sdpa_mask(batch_size=1, **_sizes(case, "cpu"), mask_function=function, allow_is_causal_skip=False)


# ------------------------------------------------------------------------------------------- tests
def _record(case: AttentionCase) -> None:
    """What was drawn, for `--hypothesis-show-statistics`."""
    for tag in case.tags():
        event(tag)


@pytest.mark.parametrize("family", families.params())
@given(case=text_attention_cases(window=True, spans=True))
@example(case=GQA)
@example(case=LEFT_PADDING)
@example(case=DECODE)
@example(case=SCALE)
@example(case=WINDOW)
@example(case=SPANS)
@example(case=SOFTCAP)
def test_text_attention_matches_oracle(backend, device, family, case):
    _record(_for_family(case, family))
    check_text_attention(backend, family, case, device)


@pytest.mark.parametrize("family", families.params(PACKED_FAMILIES))
@given(case=vision_attention_cases(packed=True))
@example(case=PACKED)
def test_vision_attention_on_packed_images_matches_oracle(backend, device, family, case):
    _record(case)
    check_vision_attention(backend, family, case, device)


@pytest.mark.parametrize("family", families.params(BATCHED_FAMILIES))
@given(case=vision_attention_cases(packed=False))
@example(case=BATCHED)
def test_vision_attention_on_image_batches_matches_oracle(backend, device, family, case):
    _record(case)
    check_vision_attention(backend, family, case, device)
