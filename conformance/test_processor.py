"""The processor a load returns: the family's own class, left padding on it and its tokenizer, a pad
token (EOS where the checkpoint has none), the chat template; and saving it and loading it again with
`AutoProcessor` gives the same class and the same inputs (Unsloth's reloaded finetunes lost their image
processor, unslothai/unsloth#4085)."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from transformers import AutoProcessor

from conformance import checks, inputs, zoo
from conformance.families import FAMILIES, params

ALL = params()


@pytest.fixture(scope="module")
def loaded(backend):
    """family -> (processor, repro) of the plain call `from_pretrained(zoo.checkpoint(family))`."""

    def load(family):
        repro = checks.call(checks.zoo_path(family))
        with checks.reproducing(repro):
            _, processor = backend.FastVisionModel.from_pretrained(zoo.checkpoint(family))
        return processor, repro

    return functools.cache(load)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


@pytest.mark.parametrize("family", ALL)
def test_processor_is_the_familys_class(loaded, family):
    processor, repro = loaded(family)
    checks.check_equal(type(processor).__name__, FAMILIES[family].processor_class, "processor class", repro=repro)


@pytest.mark.parametrize("family", ALL)
def test_padding_side_is_left_on_processor_and_tokenizer(loaded, family):
    processor, repro = loaded(family)
    checks.check_equal(tokenizer_of(processor).padding_side, "left", "processor.tokenizer.padding_side", repro=repro)
    checks.check_equal(getattr(processor, "padding_side", None), "left", "processor.padding_side", repro=repro)


@pytest.mark.parametrize("family", ALL)
def test_pad_token_is_set(loaded, family):
    tokenizer = tokenizer_of(loaded(family)[0])
    repro = loaded(family)[1]
    checks.check(tokenizer.pad_token is not None and tokenizer.pad_token_id is not None,
                 f"no pad token: pad_token={tokenizer.pad_token!r}", repro=repro)


@pytest.mark.parametrize("family", ALL)
def test_pad_token_defaults_to_eos(backend, family, tmp_path):
    path = shutil.copytree(zoo.checkpoint(family), tmp_path / family)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    repro = f"{checks.call(path, load_in_4bit=False)}  # tokenizer_config.json without pad_token"
    with checks.reproducing(repro):
        _, processor = backend.FastVisionModel.from_pretrained(path, load_in_4bit=False)
    tokenizer = tokenizer_of(processor)
    checks.check_equal(tokenizer.pad_token, tokenizer.eos_token, "pad token of a checkpoint without one", repro=repro)


@pytest.mark.parametrize("family", ALL)
def test_chat_template_is_on_the_processor(loaded, family):
    processor, repro = loaded(family)
    checks.check(bool(getattr(processor, "chat_template", None)), "processor.chat_template is empty", repro=repro)
    prompt = "Which shapes are red?"
    text = processor.apply_chat_template(zoo.sample_conversation(prompt), add_generation_prompt=True, tokenize=False)
    checks.check(prompt in text, f"the chat template drops the prompt: {text!r}", repro=repro)


@pytest.mark.parametrize("family", ALL)
def test_a_batch_is_left_padded_with_the_pad_token(loaded, family):
    processor, repro = loaded(family)
    batch = inputs.image_batch(processor)
    mask, ids = batch["attention_mask"], batch["input_ids"]
    checks.check(bool((mask == 0).any()), "the sample batch has no padding; it cannot show the side", repro=repro)
    # Left padding: each row's mask is 0...0 1...1, so it never decreases along the sequence.
    checks.check(bool((mask.diff(dim=1) >= 0).all()), f"padding is not on the left: attention_mask {mask.tolist()}",
                 repro=repro)
    pad = tokenizer_of(processor).pad_token_id
    checks.check(bool((ids[mask == 0] == pad).all()), f"padded positions do not hold the pad token {pad}", repro=repro)


@pytest.mark.parametrize("family", ALL)
def test_saved_processor_reloads_as_the_same_class_with_the_same_inputs(loaded, family, tmp_path):
    processor, repro = loaded(family)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    repro = f"{repro}; processor.save_pretrained(d); AutoProcessor.from_pretrained(d)"
    checks.check_equal(type(reloaded).__name__, type(processor).__name__, "reloaded processor class", repro=repro)
    want, got = inputs.image_batch(processor), inputs.image_batch(reloaded)
    checks.check_equal(sorted(got.keys()), sorted(want.keys()), "reloaded processor's batch keys", repro=repro)
    differ = [key for key in want if not torch.equal(want[key], got[key])]
    checks.check(not differ, f"the reloaded processor gives different {differ}", repro=repro)
