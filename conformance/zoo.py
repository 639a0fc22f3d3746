"""Tiny, deterministic, offline checkpoints of each VLM family.

No weights can be downloaded here, and users' CI often can't either, so every test and the README's
run command use these instead. Each checkpoint is structurally real — the family's own config class
with its distinguishing features (GQA 3:1, M-RoPE sections, Qwen2.5-VL window attention, Gemma3's
sliding/full layer mix and query scalar, Pixtral's 2-D RoPE), the family's stock processor and image
processor, a locally trained byte-level BPE tokenizer with the family's special tokens and a chat
template that places image tokens the way the real family does — but only a few MB of fp32 weights.

    >>> from conformance import zoo
    >>> path = zoo.checkpoint("gemma3")            # built once, then cached
    >>> model = AutoModelForImageTextToText.from_pretrained(path)

A family (one of `conformance.families.NAMES`) is one `FamilyRecipe`; `build` is the same code for all of
them. Bump `ZOO_VERSION` whenever a recipe, the corpus or the perturbation changes, so stale caches are not
reused.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import random
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from filelock import FileLock
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    Mistral3Config,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipVisionConfig,
)

from conformance.families import FAMILIES as SUITE_FAMILIES
from conformance.families import NAMES

ZOO_VERSION = 2  # 2: Gemma3's zero-initialised image projection drawn at random
FAMILIES: tuple[str, ...] = NAMES  # the suite's family records say which families there are; RECIPES builds each

VOCAB_SIZE = 512
# Every language model: hidden 192 = 6 query heads x head_dim 32 over 2 KV heads. A GQA ratio of 3
# (not 2) catches a kernel that repeats KV heads by the wrong factor or interleaves them wrongly;
# head_dim 32 lets Qwen's M-RoPE sections [4, 6, 6] sum to head_dim / 2 like the real [16, 24, 24].
TEXT = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 192,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 1024,
}
# Every vision tower: 2 layers of width 64 with 2 heads (head_dim 32; Pixtral's 2-D RoPE needs a
# multiple of 4).
VISION = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
# Norm weights and biases are drawn around their init with this spread: at init they are exactly 1
# (or 0) and 0, so a backend that dropped a bias or a norm's weight would still match bit for bit.
PERTURB_STD = 0.1

# The BPE training text: fixed, so the merges (and thus every token id) are fixed. Varied enough to
# fill all 512 ids with merges; it has newlines because chat templates and Gemma3's image sequence
# ("\n\n<start_of_image>...") use them.
_CORPUS = (
    "What is in this image? Describe the picture in detail.\n\n",
    "The image shows a red circle, a blue square and a green triangle on a gradient background.\n",
    "There are three shapes: one small yellow star near the top left corner, a large purple rectangle "
    "in the middle, and an orange ellipse at the bottom right.\n",
    "The colours fade from dark to light across the picture. A cat sits on a mat next to a dog; the "
    "dog is brown and the cat is black with white paws.\n\n",
    "Count the objects, name their colours, and tell me where each one is. How many circles can you "
    "see? Which shape is the largest?\n",
    "Answer briefly: yes, no, left, right, above, below, inside, outside, zero, one, two, three, "
    "four, five, six, seven, eight, nine, ten.\n",
    "The quick brown fox jumps over the lazy dog. Vision language models read pixels as patches and "
    "text as tokens, then attend over both.\n\n",
    "Photographs, diagrams, charts, screenshots, documents, handwriting, maps and paintings.\n",
    "0123456789 +-*/=()[]{}<>.,;:!?'\"#%&@_ ~^|\\$\n",
)


@dataclasses.dataclass(frozen=True)
class FamilyRecipe:
    """Everything that differs between families; `build` does the rest the same way for all."""

    family: str
    # Special tokens, in id order from 0 (the real families also put theirs at fixed ids).
    specials: tuple[str, ...]
    # Tokenizer roles (bos_token, eos_token, pad_token, unk_token) -> token.
    roles: dict[str, str]
    # Named extra special tokens that become tokenizer attributes (Gemma3Processor reads
    # `tokenizer.boi_token`, Qwen2VLProcessor `tokenizer.image_token`).
    extra: dict[str, str]
    # Whether the tokenizer's post-processor prepends BOS (Llama/Mistral/Gemma do, Qwen doesn't).
    # The chat templates never render BOS themselves, so there is exactly one.
    add_bos: bool
    chat_template: str
    # (ids: token -> id of every special, the LM's config kwargs) -> the model config.
    make_config: Callable[[dict[str, int], dict[str, Any]], PreTrainedConfig]
    make_processor: Callable[[PreTrainedTokenizerFast, str], ProcessorMixin]
    # Extra tokens that end a generation besides EOS (the end-of-turn marker of chat families).
    stop: tuple[str, ...] = ()


# --- chat templates: compact versions of the real ones, same image placement -----------------------

# Qwen2-VL-Instruct: ChatML with the default system turn; each image is one <|image_pad|> between
# vision start/end, which the processor repeats once per merged 2x2 patch group.
_QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-Instruct: the same ChatML, without a default system turn.
_QWEN3_TEMPLATE = _QWEN_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "",
)
# llava-1.5-hf: images first, then text, "USER: ... ASSISTANT:".
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for item in message['content'] if item['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }} {% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# pixtral-12b: "[INST]...[IMG]...[/INST]answer</s>"; the processor expands each [IMG] into rows of
# [IMG] separated by [IMG_BREAK] and closed by [IMG_END]. `add_generation_prompt` adds nothing:
# the model answers right after [/INST], as in the real template.
_PIXTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}[IMG]{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}[/INST]"
    "{% else %}{{ message['content'] if message['content'] is string "
    "else message['content'] | map(attribute='text') | join }}{{ eos_token }}{% endif %}{% endfor %}"
)
# Mistral-Small-3.1/3.2-Instruct: Pixtral's turns after a system prompt the template always renders (the real
# one is Mistral's long default text), "[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[IMG]...[/INST]".
_MISTRAL3_TEMPLATE = "[SYSTEM_PROMPT]You are a helpful assistant.[/SYSTEM_PROMPT]" + _PIXTRAL_TEMPLATE
# gemma-3-it: the processor replaces <start_of_image> (its `boi_token`) with
# "\n\n<start_of_image>" + 16 x <image_soft_token> + "<end_of_image>\n\n".
_GEMMA3_TEMPLATE = (
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


# --- configs -----------------------------------------------------------------------------------------


def _qwen_config(
    config_cls: type[PreTrainedConfig], vision: dict[str, Any]
) -> Callable[[dict[str, int], dict[str, Any]], PreTrainedConfig]:
    def make(ids: dict[str, int], text: dict[str, Any]) -> PreTrainedConfig:
        # mrope_section splits head_dim/2 = 16 rotary frequencies into (temporal, height, width).
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
        return config_cls(
            text_config={**text, "rope_parameters": rope},
            # The merger projects vision features to the LM width, as in the real models.
            vision_config={"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, **vision},
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )

    return make


def _qwen3_vl_config(ids: dict[str, int], text: dict[str, Any]) -> PreTrainedConfig:
    # Interleaved M-RoPE: the real [24, 20, 20] of head_dim/2 = 64, scaled to 16 -> [6, 5, 5] (t takes every
    # third frequency from 0, h from 1, w from 2). Vision: 3 blocks of patch 16 (the real 16, not Qwen2's 14);
    # DeepStack taps blocks 0 and 1, whose merged features are added after text layers 0 and 1 (the 4B model
    # taps blocks 5, 11, 17 of 24 into text layers 0-2). A learned 8x8 position grid (the real 48x48) is
    # resampled bilinearly to each image's grid. Width 48 (head_dim 24, a multiple of 4 for the 2-D RoPE), not
    # VISION's 64: each of the 3 mergers is (4 x width)^2 + 4 x width x 192 weights, and at 64 they put the
    # checkpoint at 4.99 MB against test_zoo's 5 MB budget.
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5], "mrope_interleaved": True}
    vision = {
        "depth": 3,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_heads": VISION["num_attention_heads"],
        "patch_size": 16,
        "spatial_merge_size": 2,
        "out_hidden_size": TEXT["hidden_size"],
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],
    }
    return Qwen3VLConfig(
        text_config={**text, "rope_parameters": rope},
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _llava_config(ids: dict[str, int], text: dict[str, Any]) -> PreTrainedConfig:
    # CLIP 32x32 in 8x8 patches: 16 patches + CLS; the "default" strategy drops CLS, -2 takes the
    # penultimate layer, as llava-1.5 does.
    vision = CLIPVisionConfig(**VISION, image_size=32, patch_size=8, projection_dim=64)
    return LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text),
        image_token_index=ids["<image>"],
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


# The Pixtral encoder (2-D RoPE, any aspect ratio) of Pixtral and Mistral 3: 64 px at most, patches of 8.
_PIXTRAL_VISION = {**VISION, "image_size": 64, "patch_size": 8}


def _pixtral_config(ids: dict[str, int], text: dict[str, Any]) -> PreTrainedConfig:
    # Pixtral is Llava with the Pixtral encoder and a Mistral LM; it keeps every patch ("full") of the
    # last layer.
    vision = PixtralVisionConfig(**_PIXTRAL_VISION)
    return LlavaConfig(
        vision_config=vision,
        text_config=MistralConfig(**text, sliding_window=None),
        image_token_index=ids["[IMG]"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )


def _mistral3_config(ids: dict[str, int], text: dict[str, Any]) -> PreTrainedConfig:
    # Mistral-Small-3.1: the Pixtral encoder (SiLU-gated, as the real tower) whose last layer goes through an
    # RMSNorm and a learned 2x2 patch merger (4 x 64 -> 64) before a bias-free two-layer projector; a Mistral
    # LM with no sliding window (the real config's is null) and its own lm_head (not tied, unlike the
    # config class's default).
    return Mistral3Config(
        vision_config=PixtralVisionConfig(**_PIXTRAL_VISION, hidden_act="silu"),
        text_config=MistralConfig(**text, sliding_window=None, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 1e9}),
        image_token_index=ids["[IMG]"],
        spatial_merge_size=2,
        multimodal_projector_bias=False,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _gemma3_config(ids: dict[str, int], text: dict[str, Any]) -> PreTrainedConfig:
    # Sliding window 8 is far shorter than a one-image prompt (~40 tokens), so the sliding layers
    # really mask; query_pre_attn_scalar 24 != head_dim 32 (the 27B model has 168 vs 128), so a
    # backend that scales by 1/sqrt(head_dim) is caught.
    text_config = Gemma3TextConfig(
        **{**text, "num_hidden_layers": 3},
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=8,
        query_pre_attn_scalar=24,
    )
    # SigLIP 64x64 in 8x8 patches = 8x8 features, average-pooled 2x2 down to 16 image tokens.
    vision = SiglipVisionConfig(**VISION, image_size=64, patch_size=8, vision_use_head=False)
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision,
        mm_tokens_per_image=16,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )


# --- processors: the stock classes, sized so a 96x80 image costs 9-56 tokens -------------------------


def _qwen_processor(
    processor_cls: type[ProcessorMixin],
) -> Callable[[PreTrainedTokenizerFast, str], ProcessorMixin]:
    def make(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> ProcessorMixin:
        # 56^2..112^2 pixels: a 96x80 image resizes to 84x84 = 6x6 patches of 14 = 3x3 merged tokens.
        size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
        return processor_cls(
            image_processor=Qwen2VLImageProcessor(size=size),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(size=size),
            chat_template=chat_template,
        )

    return make


def _qwen3_vl_processor(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> ProcessorMixin:
    # Patch 16, merge 2: sides round to multiples of 32, so a 96x80 image resizes to 96x64 = 6x4 patches =
    # 3x2 merged tokens. Qwen3VLProcessor requires a video processor (its own class) beside the image one.
    size = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
    vision = {"patch_size": 16, "merge_size": 2, "size": size}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**vision),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**vision),
        chat_template=chat_template,
    )


def _llava_processor(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> ProcessorMixin:
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped again by the "default" strategy
        chat_template=chat_template,
    )


def _pixtral_processor(merge: int = 1) -> Callable[[PreTrainedTokenizerFast, str], ProcessorMixin]:
    # PixtralProcessor resizes to multiples of patch x merge and writes one [IMG] per merged patch group.
    def make(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> ProcessorMixin:
        patch = _PIXTRAL_VISION["patch_size"]
        image_processor = PixtralImageProcessor(size={"longest_edge": _PIXTRAL_VISION["image_size"]}, patch_size=patch)
        return PixtralProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, spatial_merge_size=merge,
            chat_template=chat_template,
        )

    return make


def _gemma3_processor(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> ProcessorMixin:
    image_processor = Gemma3ImageProcessor(size={"height": 64, "width": 64})
    return Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=16, chat_template=chat_template
    )


# --- the recipes ---------------------------------------------------------------------------------

_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN_TOKENS = {
    "specials": _QWEN_SPECIALS,
    # As in Qwen2-VL-*-Instruct: no BOS, EOS is the end of turn, padding uses <|endoftext|>.
    "roles": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "extra": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    "add_bos": False,
    "chat_template": _QWEN_TEMPLATE,
    "stop": ("<|endoftext|>",),
}
_LLAMA_ROLES = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

RECIPES: dict[str, FamilyRecipe] = {
    "qwen2_vl": FamilyRecipe(
        family="qwen2_vl",
        **_QWEN_TOKENS,
        make_config=_qwen_config(
            Qwen2VLConfig, {"embed_dim": 64, "mlp_ratio": 2, "hidden_size": TEXT["hidden_size"]}
        ),
        make_processor=_qwen_processor(Qwen2VLProcessor),
    ),
    "qwen2_5_vl": FamilyRecipe(
        family="qwen2_5_vl",
        **_QWEN_TOKENS,
        # window_size 56 px = 2x2 merged tokens: the 3x3 merged grid of a 96x80 image splits into 4
        # windows (2x2, 2x1, 1x2, 1x1); block 1 attends over the whole image, as blocks 7/15/23/31 do
        # in the real 32-block tower.
        make_config=_qwen_config(
            Qwen2_5_VLConfig,
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "out_hidden_size": TEXT["hidden_size"],
                "window_size": 56,
                "fullatt_block_indexes": [1],
            },
        ),
        make_processor=_qwen_processor(Qwen2_5_VLProcessor),
    ),
    "qwen3_vl": FamilyRecipe(
        family="qwen3_vl",
        **{**_QWEN_TOKENS, "chat_template": _QWEN3_TEMPLATE},
        make_config=_qwen3_vl_config,
        make_processor=_qwen3_vl_processor,
    ),
    "llava": FamilyRecipe(
        family="llava",
        specials=("<unk>", "<s>", "</s>", "<pad>", "<image>"),
        roles=_LLAMA_ROLES,
        extra={"image_token": "<image>"},
        add_bos=True,
        chat_template=_LLAVA_TEMPLATE,
        make_config=_llava_config,
        make_processor=_llava_processor,
    ),
    "pixtral": FamilyRecipe(
        family="pixtral",
        specials=("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"),
        roles=_LLAMA_ROLES,
        extra={},
        add_bos=True,
        chat_template=_PIXTRAL_TEMPLATE,
        make_config=_pixtral_config,
        make_processor=_pixtral_processor(),
    ),
    "mistral3": FamilyRecipe(
        family="mistral3",
        # Mistral-Small-3.1's tekken specials in their real order (ids 0-4, then [IMG] 10, <pad> 11,
        # [IMG_BREAK] 12, [IMG_END] 13, [SYSTEM_PROMPT] 17, [/SYSTEM_PROMPT] 18), packed from 0.
        specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                  "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
        roles=_LLAMA_ROLES,
        extra={},
        add_bos=True,
        chat_template=_MISTRAL3_TEMPLATE,
        make_config=_mistral3_config,
        # Merge 2: sides round up to multiples of 16, so a 96x80 image resizes to 64x64 = 8x8 patches = 4x4 merged
        # tokens, 20 with the breaks and the end.
        make_processor=_pixtral_processor(merge=2),
    ),
    "gemma3": FamilyRecipe(
        family="gemma3",
        specials=(
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ),
        roles={"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"},
        extra={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        add_bos=True,
        chat_template=_GEMMA3_TEMPLATE,
        make_config=_gemma3_config,
        make_processor=_gemma3_processor,
        stop=("<end_of_turn>",),
    ),
}


def recipe(family: str) -> FamilyRecipe:
    """The recipe of `family`; ValueError naming the argument, the value and the accepted values."""
    if family not in RECIPES:
        raise ValueError(f"family={family!r} is not a zoo family; expected one of {', '.join(FAMILIES)}")
    return RECIPES[family]


# --- building -----------------------------------------------------------------------------------------


def _tokenizer(rec: FamilyRecipe) -> PreTrainedTokenizerFast:
    """A byte-level BPE of VOCAB_SIZE ids trained on `_CORPUS`, specials first (ids 0..n-1)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(rec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    if rec.add_bos:
        bos = rec.roles["bos_token"]
        bos_id = rec.specials.index(bos)
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        **rec.roles,
        extra_special_tokens=rec.extra,
        model_max_length=TEXT["max_position_embeddings"],
    )


def _config(rec: FamilyRecipe) -> PreTrainedConfig:
    """The family config with every special-token id taken from the tokenizer's id order."""
    ids = {token: i for i, token in enumerate(rec.specials)}
    # The LM's bos/eos/pad (from which generation defaults are derived) are the tokenizer's roles;
    # a role the family lacks (Qwen has no BOS) is None rather than the config's out-of-vocab default.
    roles = {f"{role}_token_id": ids.get(rec.roles.get(f"{role}_token")) for role in ("bos", "eos", "pad")}
    config = rec.make_config(ids, {**TEXT, **roles})
    config.dtype = torch.float32
    return config


def _perturb_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    """Move every norm weight and bias off its constant init by N(0, PERTURB_STD)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()  # LayerNorm and every *RMSNorm
            for name, param in module.named_parameters(recurse=False):
                if is_norm or name == "bias":
                    param.add_(torch.randn(param.shape, generator=generator) * PERTURB_STD)


def _draw_constant_weights(model: torch.nn.Module, seed: int) -> None:
    """Draw N(0, 1/fan_in) into every matrix transformers initialises to a constant. Gemma3's
    `mm_input_projection_weight` starts at zero, so a checkpoint saved at init would give logits that do
    not depend on the image and vision LoRA no gradient; a real checkpoint's is trained."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "norm" not in name and bool((param == param.flatten()[0]).all()):
                param.copy_(torch.randn(param.shape, generator=generator) * param.shape[0] ** -0.5)


def build(family: str, out_dir: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny `family` checkpoint (weights, config, processor) into `out_dir`."""
    rec = recipe(family)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(rec)
    config = _config(rec)
    # fork_rng: seeding must not leak into the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _perturb_norms_and_biases(model, seed)
    _draw_constant_weights(model, seed)
    stops = [rec.roles["eos_token"], *rec.stop]
    model.generation_config.eos_token_id = [rec.specials.index(t) for t in stops]
    model.save_pretrained(out)  # safetensors
    rec.make_processor(tokenizer, rec.chat_template).save_pretrained(out)
    return out


def cache_dir() -> pathlib.Path:
    """Where `checkpoint` keeps its builds: $FASTVISION_CACHE, else ~/.cache/fastvision/zoo."""
    root = os.environ.get("FASTVISION_CACHE") or pathlib.Path.home() / ".cache" / "fastvision" / "zoo"
    return pathlib.Path(root)


def checkpoint(family: str, *, seed: int = 0) -> pathlib.Path:
    """The directory of the tiny `family` checkpoint, built on first use and cached."""
    recipe(family)  # validate before touching the disk
    return _cached(f"{family}-seed{seed}-v{ZOO_VERSION}", lambda out: build(family, out, seed=seed))


def prequantized(family: str, *, seed: int = 0) -> pathlib.Path:
    """A pre-quantized copy of the tiny `family` checkpoint, as the hub's `-bnb-4bit` twins are: NF4
    language-model linears saved packed, `quantization_config` in config.json, the processor beside it."""
    source = checkpoint(family, seed=seed)
    return _cached(f"{family}-seed{seed}-v{ZOO_VERSION}-bnb-4bit", lambda out: _quantize(family, source, out))


def _quantize(family: str, source: pathlib.Path, out: pathlib.Path) -> None:
    from transformers import BitsAndBytesConfig

    family_record = SUITE_FAMILIES[family]
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=[family_record.vision_tower, family_record.projector, family_record.lm_head],
    )
    model = AutoModelForImageTextToText.from_pretrained(source, quantization_config=config, device_map="cpu")
    model.save_pretrained(out)
    for file in source.iterdir():
        if not file.name.endswith(".safetensors") and file.name not in ("config.json", "generation_config.json"):
            shutil.copy(file, out / file.name)


def _cached(name: str, build_into: Callable[[pathlib.Path], object]) -> pathlib.Path:
    """`cache_dir() / name`, built by `build_into(directory)` on first use.

    Safe when several processes (pytest-xdist workers) ask at once: the build goes to a private temp
    dir in the same parent and is renamed into place, under a file lock; a process that lost the
    race finds the finished directory and uses it.
    """
    root = cache_dir()
    final = root / name
    if final.is_dir():  # only ever created by a rename of a complete build
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():
            return final
        # Same parent, so the rename below is atomic: readers see no directory or a complete one.
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
        try:
            build_into(tmp)
            tmp.chmod(0o755)  # mkdtemp made it owner-only; a CI cache may be shared between users
            try:
                os.replace(tmp, final)
            except OSError:
                # A non-empty `final` appeared although we hold the lock (a filesystem where locks are
                # advisory no-ops, such as some NFS mounts): the other build is as good as ours.
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # already gone after a successful rename
    return final


# --- inputs ------------------------------------------------------------------------------------------


def sample_image(seed: int = 0, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A deterministic RGB test image of `size` = (width, height): a gradient and a few shapes.

    Not square and larger than every tower's input, so every image processor resizes it (Pixtral
    keeps the aspect: 8x7 patches), and no two patches are equal (a gradient), so a transposed or
    shuffled patch order changes the logits.
    """
    rng = random.Random(seed)
    width, height = size
    r0, g0, b0 = (rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", size)
    image.putdata(
        [
            ((r0 + 255 * x // width) % 256, (g0 + 255 * y // height) % 256, (b0 + 2 * (x + y)) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    draw = ImageDraw.Draw(image)
    for shape in (draw.ellipse, draw.rectangle, draw.ellipse):
        x0, y0 = rng.randrange(width - 8), rng.randrange(height - 8)
        x1, y1 = rng.randrange(x0 + 4, width), rng.randrange(y0 + 4, height)
        shape((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def sample_conversation(text: str = "What is in this image?") -> list[dict]:
    """One user turn with an image and `text`, for `processor.apply_chat_template`."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
