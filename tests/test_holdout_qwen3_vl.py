"""A Qwen3-VL checkpoint the zoo never built: both backends must give transformers' own eager logits on it.

The suite's Qwen3-VL checks all run on the zoo's checkpoint, whose recipe was written with the records; a
record that only fits that one shape (a head count, the DeepStack taps, an M-RoPE split) would pass them.
This checkpoint differs in every width: text hidden 128 = 4 query heads over 1 KV head (GQA 4, not 3),
M-RoPE [8, 4, 4], 3 text layers; a 4-block tower of width 32 (2 heads of 16) tapping blocks 1 and 2 for
DeepStack; its own word-level tokenizer. The batch is the hard case: two samples of different lengths,
left-padded, each with an image of another shape (so the tower packs two images of 6 and 4 merged tokens).
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
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

import optimized
import reference
from tests import holdout as holdout_checkpoint

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
WORDS = ["user", "assistant", "\n", "what", "is", "in", "this", "image", "describe", "the", "picture", "?"]


def _processor() -> Qwen3VLProcessor:
    vocab = {token: i for i, token in enumerate([*SPECIALS, *WORDS, "[UNK]"])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated")]
    )
    words.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    # Patch 16, merge 2: a 96x64 image is 6x4 patches = 6 merged tokens, a 64x64 one 4.
    vision = {"patch_size": 16, "merge_size": 2, "size": {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}}
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**vision), tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(**vision))


def _config(tokenizer) -> Qwen3VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=64, hidden_size=128, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=1, head_dim=32, max_position_embeddings=512, pad_token_id=ids("<|endoftext|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 4, 4],
                                 "mrope_interleaved": True})
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  out_hidden_size=128, num_position_embeddings=16, deepstack_visual_indexes=[1, 2])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                         video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                         vision_end_token_id=ids("<|vision_end|>"))


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    """(checkpoint directory, left-padded batch) of the holdout model."""
    path = tmp_path_factory.mktemp("qwen3_vl_holdout")
    processor = _processor()
    pixels = holdout_checkpoint.build(Qwen3VLForConditionalGeneration, _config(processor.tokenizer), processor, path,
                                      seed=17, image_shapes=((64, 96), (64, 64)))
    prompts = ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>describe the picture<|im_end|>\n"
               "<|im_start|>assistant\n",
               "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is in this image ?<|im_end|>\n"
               "<|im_start|>user\nwhat is this<|im_end|>\n<|im_start|>assistant\n"]
    processor.tokenizer.padding_side = "left"
    batch = processor(text=prompts, images=[Image.fromarray(p) for p in pixels], padding=True, return_tensors="pt")
    return path, batch


def test_the_batch_is_left_padded_with_two_image_shapes(holdout):
    _, batch = holdout
    mask = batch["attention_mask"]
    assert not mask.all() and (mask.cummax(dim=1).values == mask).all()  # padding only on the left
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4]]
    tokenizer = _processor().tokenizer
    assert (batch["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum(dim=1).tolist() == [6, 4]
    assert not (batch["input_ids"] == tokenizer.unk_token_id).any()


@pytest.mark.parametrize("backend", [reference, optimized], ids=["reference", "optimized"])
def test_a_holdout_checkpoint_gives_transformers_eager_logits(holdout, backend):
    path, batch = holdout
    holdout_checkpoint.assert_eager_logits(backend, Qwen3VLForConditionalGeneration, path, batch)
