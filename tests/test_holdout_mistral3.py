"""A Mistral 3 checkpoint the zoo never built: both backends must give transformers' own eager logits on it.

The suite's Mistral 3 checks all run on the zoo's checkpoint, a Mistral-Small-3.1 shape written with the
records; a record that only fits that one shape would pass them. This one is Ministral 3's: a `ministral3`
text model (YaRN RoPE and the Llama-4 query scaling, which grows past 16 positions here, tied embeddings),
text hidden 128 = 4 query heads of 48 (not hidden / heads) over 1 KV head (GQA 4), 3 text layers, and a
sliding window of 12 tokens that the prompts outgrow (Mistral-Small's config has none: this is the
"sliding window where the config has one"); a 3-layer Pixtral tower of width 32 (2 heads of 16); its own
word-level tokenizer. The batch is the hard case: two samples of different lengths, left-padded, each with an
image of another shape (so the tower packs two images of 8 and 6 merged tokens under one block mask).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton reads this when its kernels are defined: before the imports below
    os.environ.setdefault("TRITON_INTERPRET", "1")

from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Ministral3Config,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
)

import optimized
import reference
from tests import holdout as holdout_checkpoint

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
WORDS = ["what", "is", "in", "this", "image", "describe", "the", "picture", "?", "and", "then", "say", "why"]
WINDOW = 12


def _processor() -> PixtralProcessor:
    vocab = {token: i for i, token in enumerate([*SPECIALS, *WORDS])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    words.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    # Patch 8, merge 2: sides round up to multiples of 16; a 64x32 (h x w) image is 4x2 merged tokens, 32x48 2x3.
    return PixtralProcessor(image_processor=PixtralImageProcessor(size={"longest_edge": 64}, patch_size=8),
                            tokenizer=tokenizer, patch_size=8, spatial_merge_size=2)


def _config(tokenizer) -> Mistral3Config:
    ids = tokenizer.convert_tokens_to_ids
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 16,
            "llama_4_scaling_beta": 0.1, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    text = Ministral3Config(vocab_size=32, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=48, max_position_embeddings=64,
                            rope_parameters=rope, sliding_window=WINDOW, tie_word_embeddings=True,
                            bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>"))
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=64, patch_size=8, hidden_act="silu")  # head_dim = 32 / 2, computed
    return Mistral3Config(text_config=text, vision_config=vision, image_token_index=ids("[IMG]"),
                          spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    """(checkpoint directory, left-padded batch) of the holdout model."""
    path = tmp_path_factory.mktemp("mistral3_holdout")
    processor = _processor()
    pixels = holdout_checkpoint.build(Mistral3ForConditionalGeneration, _config(processor.tokenizer), processor, path,
                                      seed=23, image_shapes=((64, 32), (32, 48)))
    prompts = ["[INST][IMG]describe the picture and then say why[/INST]",
               "[INST][IMG]what is in this image ?[/INST]the picture[INST]what is this ?[/INST]"]
    processor.tokenizer.padding_side = "left"
    batch = processor(text=prompts, images=[Image.fromarray(p) for p in pixels], padding=True, return_tensors="pt")
    return path, batch


def test_the_batch_is_left_padded_with_two_image_shapes_past_the_window(holdout):
    path, batch = holdout
    mask = batch["attention_mask"]
    assert not mask.all() and (mask.cummax(dim=1).values == mask).all()  # padding only on the left
    assert batch["image_sizes"].tolist() == [[64, 32], [32, 48]]
    tokenizer = _processor().tokenizer
    assert (batch["input_ids"] == tokenizer.convert_tokens_to_ids("[IMG]")).sum(dim=1).tolist() == [8, 6]
    assert not (batch["input_ids"] == tokenizer.unk_token_id).any()
    assert mask.sum(dim=1).min() > WINDOW  # every row has keys the window hides
    config = Mistral3Config.from_pretrained(path)
    assert config.text_config.model_type == "ministral3" and config.text_config.sliding_window == WINDOW


@pytest.mark.parametrize("backend", [reference, optimized], ids=["reference", "optimized"])
def test_a_holdout_checkpoint_gives_transformers_eager_logits(holdout, backend):
    path, batch = holdout
    holdout_checkpoint.assert_eager_logits(backend, Mistral3ForConditionalGeneration, path, batch)
