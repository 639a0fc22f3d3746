"""The mask builder reads transformers' mask compositions into structure: every composition the five
families use must give exactly the mask transformers' own `sdpa_mask` would have built."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import masking_utils as mu

from reference import hf_attention
from reference.hf_attention import build_mask_spec, spec_for_call
from reference.ops.attention import AttentionSpec, build_mask


def token_type_ids_mask_function(token_type_ids, image_group_ids):
    """Gemma3's image-block mask as transformers < 5.20 wrote it (same name, same closure variables, so
    the mask reader meets it as it would there): tokens of type 1 in the same group see each other."""

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        inside = kv_idx < token_type_ids.shape[1]
        kv = torch.where(inside, kv_idx, 0)
        kv_image = inside & (token_type_ids[batch_idx, kv] == 1)
        same = image_group_ids[batch_idx, q_idx] == torch.where(inside, image_group_ids[batch_idx, kv], -1)
        return (token_type_ids[batch_idx, q_idx] == 1) & kv_image & same

    return inner_mask


@st.composite
def mask_calls(draw):
    """Arguments of one mask-builder call as transformers makes them, with the composition it uses."""
    batch = draw(st.integers(1, 3))
    q_length = draw(st.integers(1, 24))
    past = draw(st.sampled_from([0, 0, draw(st.integers(1, 16))]))
    kv_length = past + q_length
    window = draw(st.integers(1, 12))
    spans = torch.full((batch, kv_length), -1)
    for row in range(batch):
        if draw(st.booleans()) and kv_length > 2:
            start = draw(st.integers(0, kv_length - 2))
            spans[row, start : draw(st.integers(start + 1, kv_length))] = row + 1
    token_types = (spans >= 0).long()
    legacy = token_type_ids_mask_function(token_types, torch.where(spans >= 0, spans, -1))
    compositions = {
        "causal": mu.causal_mask_function,
        "sliding": mu.sliding_window_causal_mask_function(window),
        "gemma3_full": mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(spans)),
        "gemma3_sliding": mu.and_masks(
            mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(spans)), mu.sliding_window_overlay(window)
        ),
        "bidirectional": mu.bidirectional_mask_function,
        "gemma3_legacy_full": mu.or_masks(mu.causal_mask_function, legacy),
        "gemma3_legacy_sliding": mu.or_masks(mu.sliding_window_causal_mask_function(window), legacy),
    }
    name = draw(st.sampled_from(sorted(compositions)))
    padding = torch.ones(batch, kv_length, dtype=torch.bool)
    for row in range(batch):
        pad = draw(st.integers(0, kv_length))
        if draw(st.booleans()):
            padding[row, :pad] = False  # left padding
        else:
            padding[row, kv_length - pad :] = False
    kwargs = dict(
        batch_size=batch,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=past,
        kv_offset=0,
        mask_function=compositions[name],
        attention_mask=padding,
        device="cpu",
    )
    spans_fit_window = int((spans >= 0).sum(dim=1).max()) <= window  # one span per row
    return name, kwargs, spans_fit_window


@settings(max_examples=150)  # each example is ~1 ms: cheap enough to cover every composition
@given(mask_calls())
def test_structure_read_from_transformers_masks_equals_their_dense_mask(call):
    name, kwargs, spans_fit_window = call
    expected = mu.sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})
    spec = build_mask_spec(**kwargs)
    # Older Gemma3 sliding layers do not clip image spans by the window: structure only while they fit.
    fits = name != "gemma3_legacy_sliding" or spans_fit_window
    assert spec.is_structured == fits, f"{name}: structured={spec.is_structured}, spans fit the window={fits}"
    got = build_mask(spec, kwargs["batch_size"], kwargs["q_length"], kwargs["kv_length"], "cpu")
    assert torch.equal(got.expand_as(expected), expected), name


def test_unknown_composition_falls_back_to_transformers_dense_mask():
    def diagonal_only(batch_idx, head_idx, q_idx, kv_idx):
        return q_idx == kv_idx

    kwargs = dict(batch_size=1, q_length=5, kv_length=5, mask_function=diagonal_only, device="cpu")
    spec = build_mask_spec(**kwargs)
    assert not spec.is_structured
    assert torch.equal(build_mask(spec, 1, 5, 5, "cpu")[0, 0], torch.eye(5, dtype=torch.bool))


def sliding_window_overlay(sliding_window):
    """transformers' overlay as a later release might write it: same mask, captured variable renamed."""
    window = sliding_window

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx > q_idx - window

    return inner_mask


def test_a_closure_the_reader_cannot_read_falls_back_with_one_warning(recwarn):
    hf_attention._warn_reader_failed.cache_clear()  # once per process: another test may have warned already
    renamed = mu.and_masks(sliding_window_overlay(3), mu.causal_mask_function)
    kwargs = dict(batch_size=1, q_length=6, kv_length=6, mask_function=renamed, device="cpu")
    specs = [build_mask_spec(**kwargs) for _ in range(3)]  # every layer of a forward builds its mask
    expected = mu.sdpa_mask(**kwargs, allow_is_causal_skip=False)
    for spec in specs:
        assert not spec.is_structured
        assert torch.equal(build_mask(spec, 1, 6, 6, "cpu").expand_as(expected), expected)
    said = [w for w in recwarn if "could not read the structure" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in recwarn]


def test_additive_block_mask_becomes_boolean():
    # Pixtral passes a (B, 1, N, N) float mask: 0 inside each image's block, finfo.min elsewhere.
    blocked = torch.full((1, 1, 4, 4), torch.finfo(torch.float32).min)
    blocked[..., :2, :2] = 0
    blocked[..., 2:, 2:] = 0
    q = torch.zeros(1, 2, 4, 8)
    spec = spec_for_call(torch.nn.Module(), q, q, blocked, 0.5, {"is_causal": False})
    assert torch.equal(spec.dense_mask, blocked == 0)
    assert spec.scale == 0.5


def test_additive_bias_is_refused_not_dropped():
    bias = torch.zeros(1, 1, 3, 3)
    bias[..., 0, 1] = -2.0
    q = torch.zeros(1, 1, 3, 4)
    try:
        spec_for_call(torch.nn.Module(), q, q, bias, None, {})
    except ValueError as error:
        assert "bias" in str(error)
    else:
        raise AssertionError("an additive bias was silently turned into a boolean mask")


def test_no_mask_means_causal_only_for_modules_that_are_causal():
    class Text(torch.nn.Module):
        is_causal = True

    q = torch.zeros(1, 1, 3, 4)
    assert spec_for_call(Text(), q, q, None, None, {}).causal
    assert not spec_for_call(torch.nn.Module(), q, q, None, None, {"is_causal": False}).causal
    # A single decode query attends to every cached key: causal or not gives the same mask.
    assert build_mask(spec_for_call(Text(), q[:, :, :1], q, None, None, {}), 1, 1, 3, "cpu").all()


def test_spec_keeps_its_fields_when_scaled():
    spec = AttentionSpec(causal=True, window=3)
    scaled = spec_for_call(torch.nn.Module(), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), spec, 0.25, {})
    assert (scaled.causal, scaled.window, scaled.scale) == (True, 3, 0.25)
