"""Whole-model parity: the backend's model against transformers' own eager model, same tiny checkpoint.

Per family and input (one prompt with an image; a left-padded batch of two; a batch whose long prompt
runs past Gemma3's sliding window), on valid tokens only (padded positions are undefined):
  - 16-bit: logits, and the gradient of a next-token cross-entropy with respect to the language
    model's input embeddings (captured where the embedding module returns them, so image features and
    everything after are on the path), against the fp32 eager model: within twice the error of the
    eager model run in the backend's own dtype plus a floor (`tolerances.model_logits_bound`,
    `tolerances.model_grads_bound`); in fp32 that is the floor alone;
  - 4-bit: the backend's NF4 logits against the eager 16-bit model's by signal-to-noise ratio,
    at least `tolerances.nf4_logits_min_sqnr_db(family)`.
The reference is `AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager")`:
transformers' plain matmul-softmax attention, no backend code on its path.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForImageTextToText

from conformance import checks, families, inputs, tolerances, zoo

# Three prompts of different lengths; the long one (~3x the longest of inputs.PROMPTS) keeps every
# family's batch well past Gemma3's sliding window and left-pads its partner by dozens of tokens.
LONG_PROMPT = " ".join(inputs.PROMPTS[1] for _ in range(3))
INPUTS = {
    "one_prompt": inputs.PROMPTS[:1],
    "left_padded_batch": inputs.PROMPTS,
    "past_sliding_window": (inputs.PROMPTS[0], LONG_PROMPT),
}


@functools.cache
def _backend_model(backend, family: str, device: str, mode: str):
    kwargs = {"load_in_4bit": True} if mode == "4bit" else {"load_in_4bit": False, "load_in_16bit": True}
    return backend.FastVisionModel.from_pretrained(str(zoo.checkpoint(family)), device_map=device, **kwargs)


@functools.cache
def _eager_model(family: str, device: str, dtype: torch.dtype):
    model = AutoModelForImageTextToText.from_pretrained(zoo.checkpoint(family), attn_implementation="eager",
                                                        dtype=dtype)
    return model.to(device).eval().requires_grad_(False)  # only the input embeddings need a gradient


def _batch(processor, family: str, name: str, device: str):
    batch = inputs.image_batch(processor, INPUTS[name]).to(device)
    valid = batch["attention_mask"].bool()
    if name == "past_sliding_window":
        window = getattr(_text_config(family), "sliding_window", None)
        if window is not None and not bool((valid.sum(dim=1) > window).all()):
            raise RuntimeError(f"suite bug: {family}'s '{name}' batch does not pass its sliding window {window}")
    return batch, valid


def _text_config(family: str):
    config = AutoConfig.from_pretrained(zoo.checkpoint(family))
    return getattr(config, "text_config", config)


def _logits_and_grads(model, family: str, batch, valid: torch.Tensor, *, repro: str):
    """(logits, d loss / d input embeddings) for the mean next-token cross-entropy on valid pairs."""
    with families.capturing_input_embeddings(model, family) as captured:
        logits = model(**batch).logits
    pairs = valid[:, 1:] & valid[:, :-1]
    loss = F.cross_entropy(logits[:, :-1][pairs].float(), batch["input_ids"][:, 1:][pairs])
    loss.backward()
    checks.check(len(captured) == 1, f"{family}: the input embedding ran {len(captured)} times in one forward",
                 repro=repro)
    return logits.detach(), captured[0].grad


def _repro(family: str, name: str, device: str, **kwargs) -> str:
    load = checks.call(checks.zoo_path(family), device_map=device, **kwargs)
    return f"model, processor = {load}; model(**inputs.image_batch(processor, {INPUTS[name]!r}))"


@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("family", families.params())
def test_16bit_logits_and_grads_match_transformers_eager(backend, device, family, name):
    repro = _repro(family, name, device, load_in_4bit=False, load_in_16bit=True)
    with checks.reproducing(repro):
        model, processor = _backend_model(backend, family, device, "16bit")
    dtype = model.get_input_embeddings().weight.dtype
    batch, valid = _batch(processor, family, name, device)
    got_logits, got_grads = _logits_and_grads(model, family, batch, valid, repro=repro)
    truth_logits, truth_grads = _logits_and_grads(_eager_model(family, device, torch.float32), family, batch, valid,
                                                  repro=repro)
    eager_logits, eager_grads = _logits_and_grads(_eager_model(family, device, dtype), family, batch, valid,
                                                  repro=repro)
    what = f"{family} {name} ({tuple(batch['input_ids'].shape)} tokens, {dtype})"
    err, eager_err = _error(got_logits, truth_logits, valid), _error(eager_logits, truth_logits, valid)
    bound = tolerances.model_logits_bound(eager_err, dtype)
    checks.check(err <= bound, f"{what}: logits differ from transformers' fp32 eager model by {err:.3g} > {bound:.3g}"
                 f" (its {dtype} eager model: {eager_err:.3g}) on valid tokens", repro=repro)
    checks.check(got_grads is not None, f"{what}: no gradient reached the input embeddings", repro=repro)
    err, eager_err = _error(got_grads, truth_grads, valid), _error(eager_grads, truth_grads, valid)
    bound = tolerances.model_grads_bound(eager_err, truth_grads[valid], dtype)
    checks.check(err <= bound, f"{what}: d(loss)/d(input embeddings) differs from transformers' fp32 eager model by "
                 f"{err:.3g} > {bound:.3g} (its {dtype} eager model: {eager_err:.3g}) on valid tokens",
                 repro=repro)


def _error(got: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> float:
    """Max absolute error on valid tokens; NaN or inf never passes."""
    got = got[valid].double()
    if not torch.isfinite(got).all():
        return float("inf")
    return (got - truth[valid].double()).abs().max().item()


@pytest.mark.parametrize("name", ["one_prompt", "left_padded_batch"])
@pytest.mark.parametrize("family", families.params())
def test_4bit_logits_keep_the_signal(backend, device, family, name):
    repro = _repro(family, name, device, load_in_4bit=True)
    with checks.reproducing(repro):
        model, processor = _backend_model(backend, family, device, "4bit")
    eager = _eager_model(family, device, torch.float32)  # the 16-bit truth, in full precision
    batch, valid = _batch(processor, family, name, device)
    with torch.no_grad():
        got = model(**batch).logits[valid]
        want = eager(**batch).logits[valid]
    sqnr = tolerances.sqnr_db(want, got)
    bound = tolerances.nf4_logits_min_sqnr_db(family)
    checks.check(sqnr >= bound, f"{family} {name}: 4-bit logits keep {sqnr:.1f} dB of the 16-bit eager model's "
                 f"signal, below {bound} dB", repro=repro)


# ---------------------------------------------------------------- a mask transformers changed under us
def sliding_window_overlay(sliding_window: int):
    """transformers' `sliding_window_overlay` as a future release might write it: the same mask, its
    captured variable renamed (`window`). Same function name, so a reader keyed on the factory's
    qualified name takes it for the one it knows and meets a closure it cannot read."""
    window = sliding_window

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx > q_idx - window

    return inner_mask


@pytest.mark.parametrize("mode", ["16bit", "4bit"])
def test_a_mask_closure_the_backend_cannot_read_never_breaks_a_forward(backend, device, monkeypatch, mode):
    # docs/contract.md: the attention falls back to the dense mask transformers builds, so a forward always runs
    # and computes the model's own mask. A family's sliding layers are built by this overlay (one family with a
    # sliding window shows it: Gemma3); the batch runs past the window, so a mask without it changes the logits.
    from transformers import masking_utils

    family = next(f.name for f in families.FAMILIES.values() if f.has_sliding_window)
    name = "past_sliding_window"
    monkeypatch.setattr(masking_utils, "sliding_window_overlay", sliding_window_overlay)
    kwargs = {"load_in_4bit": True} if mode == "4bit" else {"load_in_4bit": False, "load_in_16bit": True}
    repro = _repro(family, name, device, **kwargs) + "  # masking_utils.sliding_window_overlay's variable renamed"
    with checks.reproducing(repro):
        model, processor = _backend_model(backend, family, device, mode)
        batch, valid = _batch(processor, family, name, device)
        with torch.no_grad():
            got = model(**batch).logits
            truth = _eager_model(family, device, torch.float32)(**batch).logits
    if mode == "4bit":
        sqnr, bound = tolerances.sqnr_db(truth[valid], got[valid]), tolerances.nf4_logits_min_sqnr_db(family)
        checks.check(sqnr >= bound, f"4-bit logits keep {sqnr:.1f} dB of the eager model's signal, below {bound} dB "
                     "(the sliding window lost?)", repro=repro)
        return
    dtype = model.get_input_embeddings().weight.dtype
    with torch.no_grad():
        eager_err = _error(_eager_model(family, device, dtype)(**batch).logits, truth, valid)
    err, bound = _error(got, truth, valid), tolerances.model_logits_bound(eager_err, dtype)
    checks.check(err <= bound, f"logits differ from transformers' eager model by {err:.3g} > {bound:.3g} (the "
                 "sliding window lost?)", repro=repro)


@pytest.mark.parametrize("family", families.params())
def test_logits_and_gradients_depend_on_the_image(backend, device, family):
    # Otherwise vision LoRA gets no gradient and a broken image path goes unseen by every logits check.
    repro = _repro(family, "left_padded_batch", device, load_in_4bit=False, load_in_16bit=True)
    with checks.reproducing(repro):
        model, processor = _backend_model(backend, family, device, "16bit")
        first, second = (inputs.image_batch(processor, seed=seed).to(device) for seed in (0, 5))
        valid = first["attention_mask"].bool()
        pixels = first["pixel_values"].clone().requires_grad_(True)
        logits = model(**{**first, "pixel_values": pixels}).logits
        with torch.no_grad():
            other = model(**second).logits
    change = (logits[valid] - other[valid]).abs().max().item()
    floor = tolerances.IMAGE_DEPENDENCE_MIN_LOGIT_CHANGE
    checks.check(change >= floor, f"{family}: another image changes the logits by {change:.3g} < {floor}: the "
                 "image does not reach the language model", repro=repro)
    logits[valid].float().logsumexp(-1).mean().backward()
    gradient = pixels.grad.abs().max().item() if pixels.grad is not None else 0.0
    checks.check(gradient > 0, f"{family}: no gradient reaches pixel_values (vision LoRA would learn nothing)",
                 repro=repro)
