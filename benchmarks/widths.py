"""The real widths of each family's representative model, which the step benchmarks build random-weight
checkpoints at (benchmarks/model.py, finetune.py, finetune_ablation.py): one record a family, with the image
size its processor is set to and how to set it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class BenchFamily:
    representative: str
    text: dict  # text_config fields of the representative model
    vision: dict  # vision_config fields
    top: dict  # top-level config fields
    image_size: tuple[int, int]  # (width, height) fed to the processor
    processor: dict  # image-processor / processor fields for that image size
    # (zoo processor, `processor` fields) -> the processor at that image size; the processors differ in what they read
    resize: Callable
    vision_depth_key: str = "num_hidden_layers"  # the vision config's layer count ("depth" in Qwen's)


def _resize_qwen(processor, fields: dict):
    image_processor = processor.image_processor
    image_processor.size = {"shortest_edge": fields["pixels"], "longest_edge": fields["pixels"]}
    image_processor.min_pixels = image_processor.max_pixels = fields["pixels"]
    return processor


def _resize_llava(processor, fields: dict):
    image_processor = processor.image_processor
    image_processor.size = {"shortest_edge": fields["shortest_edge"]}
    image_processor.crop_size = {"height": fields["shortest_edge"], "width": fields["shortest_edge"]}
    processor.patch_size = fields["patch_size"]
    return processor


def _resize_pixtral(processor, fields: dict):
    processor.image_processor.size = {"longest_edge": fields["longest_edge"]}
    processor.image_processor.patch_size = processor.patch_size = fields["patch_size"]
    return processor


def _resize_gemma3(processor, fields: dict):
    # Gemma3Processor fixes its image_seq_length when built: a new one, around the resized image processor.
    image_processor = processor.image_processor
    image_processor.size = {"height": fields["height"], "width": fields["width"]}
    return type(processor)(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        chat_template=processor.chat_template,
        image_seq_length=fields["image_seq_length"],
    )


VISION_LAYERS, TEXT_LAYERS = 8, 6  # Gemma3's 5 sliding : 1 full, and Qwen2.5-VL's 1 full block in 8

# The Pixtral vision tower's widths, which Mistral Small 3.x carries too (at its own image and patch size).
PIXTRAL_TOWER = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, head_dim=64)

FAMILIES = {
    "qwen2_vl": BenchFamily(
        "Qwen2-VL-2B",
        dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            mrope_section=[16, 24, 24],
        ),
        dict(embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2),
        {},
        (448, 448),
        dict(pixels=448 * 448),
        resize=_resize_qwen,
        vision_depth_key="depth",
    ),
    "qwen2_5_vl": BenchFamily(
        "Qwen2.5-VL-3B",
        dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
            mrope_section=[16, 24, 24],
        ),
        dict(
            hidden_size=1280,
            out_hidden_size=2048,
            intermediate_size=3420,
            num_heads=16,
            patch_size=14,
            spatial_merge_size=2,
            window_size=112,
            fullatt_block_indexes=[VISION_LAYERS - 1],
        ),
        {},
        (448, 448),
        dict(pixels=448 * 448),
        resize=_resize_qwen,
        vision_depth_key="depth",
    ),
    "qwen3_vl": BenchFamily(
        "Qwen3-VL-4B",
        dict(
            hidden_size=2560,
            intermediate_size=9728,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            mrope_section=[24, 20, 20],  # interleaved (the zoo config's mrope_interleaved), over head_dim/2 = 64
        ),
        dict(
            hidden_size=1024,
            out_hidden_size=2560,
            intermediate_size=4096,
            num_heads=16,
            patch_size=16,
            spatial_merge_size=2,
            num_position_embeddings=2304,
            # The 4B taps blocks 5, 11, 17 of 24 (every 6th from the 6th): the same places in the cut tower.
            deepstack_visual_indexes=[1, 3, 5],
        ),
        {},
        (448, 448),
        dict(pixels=448 * 448),  # 28x28 patches of 16 = 14x14 = 196 merged tokens
        resize=_resize_qwen,
        vision_depth_key="depth",
    ),
    "llava": BenchFamily(
        "Llava-1.5-7B",
        dict(
            hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064
        ),
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        dict(image_seq_length=576),
        (336, 336),
        dict(shortest_edge=336, patch_size=14),
        resize=_resize_llava,
    ),
    "pixtral": BenchFamily(
        "Pixtral-12B",
        dict(
            hidden_size=5120,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=131072,
        ),
        {**PIXTRAL_TOWER, "image_size": 1024, "patch_size": 16},
        {},
        (512, 512),
        dict(longest_edge=512, patch_size=16),
        resize=_resize_pixtral,
    ),
    "mistral3": BenchFamily(
        "Mistral-Small-3.1-24B",
        dict(
            hidden_size=5120,
            intermediate_size=32768,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=131072,
        ),
        {**PIXTRAL_TOWER, "image_size": 1540, "patch_size": 14},  # Pixtral's tower, its own patches
        {},  # spatial_merge_size 2, bias-free projector, untied head: the zoo config's, as the real one's
        (448, 448),
        dict(longest_edge=448, patch_size=14),  # 32x32 patches of 14 -> the 2x2 merger's 16x16 = 256 tokens
        resize=_resize_pixtral,
    ),
    "gemma3": BenchFamily(
        "Gemma3-4B",
        dict(
            hidden_size=2560,
            intermediate_size=10240,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            vocab_size=262208,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
        ),
        dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=896, patch_size=14),
        dict(mm_tokens_per_image=256),
        (896, 896),
        dict(height=896, width=896, image_seq_length=256),
        resize=_resize_gemma3,
    ),
}
