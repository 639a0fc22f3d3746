"""The vision data collator (docs/contract.md, "The vision data collator"): `UnslothVisionDataCollator` of the
backend turns chat examples with images into batches whose labels mask padding, every image placeholder
token of the family and, when asked, everything but the responses; mixed text-only and image batches work,
and a max_seq_length that would cut through an image's tokens is an error, never a silent mismatch."""

from __future__ import annotations

import pytest
import torch

from conformance import checks
from conformance.families import FAMILIES
from conformance.test_finetune import ALL, ANSWER, QUESTION, conversation, load


def collate(backend, family: str, device: str, examples, **kwargs):
    model, processor, load_repro = load(backend, family, device)
    repro = f"model, processor = {load_repro}; UnslothVisionDataCollator(model, processor, **{kwargs!r})(examples)"
    with checks.reproducing(repro):
        batch = backend.UnslothVisionDataCollator(model, processor, **kwargs)(examples)
    return batch, processor, repro


def _ids(processor, tokens) -> list[int]:
    vocab = getattr(processor, "tokenizer", processor).get_vocab()
    return [vocab[t] for t in tokens if t in vocab]


@pytest.mark.parametrize("family", ALL)
def test_collator_masks_pads_and_every_image_token(backend, device, family):
    examples = [conversation(0), conversation(1, answer="Short."), conversation(None, answer="Text only.")]
    batch, processor, repro = collate(backend, family, device, examples)
    labels, mask = batch["labels"], batch["attention_mask"].bool()
    checks.check(bool((labels[~mask] == -100).all()), "padding positions are not masked in the labels", repro=repro)
    image_ids = _ids(processor, FAMILIES[family].image_tokens)
    present = torch.isin(batch["input_ids"], torch.tensor(image_ids))
    checks.check(
        bool(present[:2].any(dim=1).all()) and not bool(present[2].any()),
        "image tokens are not where the images are (mixed batch)",
        repro=repro,
    )
    checks.check(
        not bool(torch.isin(labels, torch.tensor(image_ids)).any()), "image tokens are left in the labels", repro=repro
    )
    checks.check(bool((labels != -100).any(dim=1).all()), "a sample has no trained label at all", repro=repro)


@pytest.mark.parametrize("family", ALL)
def test_collator_trains_on_responses_only_when_asked(backend, device, family):
    instruction, response = FAMILIES[family].turn_markers
    kwargs = {"train_on_responses_only": True, "instruction_part": instruction, "response_part": response}
    batch, processor, repro = collate(backend, family, device, [conversation(0), conversation(1)], **kwargs)
    tokenizer = getattr(processor, "tokenizer", processor)
    for row in range(2):
        trained = tokenizer.decode(batch["labels"][row][batch["labels"][row] != -100], skip_special_tokens=True)
        checks.check(
            ANSWER in trained and QUESTION not in trained,
            f"responses-only labels of sample {row} decode to {trained!r}",
            repro=repro,
        )


def test_collator_refuses_a_max_seq_length_that_cuts_an_image(backend, device):
    model, processor, load_repro = load(backend, "pixtral", device)  # 56 image tokens a 96x80 image
    repro = f"model, processor = {load_repro}; UnslothVisionDataCollator(model, processor, max_seq_length=20)(...)"
    collator = backend.UnslothVisionDataCollator(model, processor, max_seq_length=20)
    checks.expect_error(lambda: collator([conversation(0)]), ValueError, names=("max_seq_length",), repro=repro)
    checks.expect_error(
        lambda: backend.UnslothVisionDataCollator(model, processor.tokenizer),
        TypeError,
        repro=f"model, processor = {load_repro}; UnslothVisionDataCollator(model, processor.tokenizer)",
    )
