"""One record per model family: where its parts live and what its attention looks like.

Quantization placement, the fast-inference rule and the per-family patches read these records; nothing
in fastvision matches module names by substring. Module paths are those of transformers 5's
`...ForConditionalGeneration` classes in memory (`model.language_model`, not the on-disk
`language_model.model` that broke Unsloth's skip list when transformers renamed it).
"""

from __future__ import annotations

import dataclasses

from reference.errors import UnknownFamilyError


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    name: str  # fastvision's key: the CLI's --family, the zoo's directory name
    model_type: str  # config.model_type
    vision_model_type: str  # config.vision_config.model_type: tells Pixtral from Llava
    vision_tower: str  # module path of the vision encoder
    projector: str | None  # module path of the projector/merger (Gemma3's has no Linear, still kept)
    language_model: str = "model.language_model"
    lm_head: str = "lm_head"
    vision_attention: str = ""  # what the vision tower's attention computes, for people and the CLI
    text_attention: str = ""
    fast_inference: bool = False  # vLLM serves this family (Unsloth: Qwen2.5-VL and Gemma3 among ours)
    # LoRA targets: the layer lists of the vision tower and the language model, and the names of each
    # layer's attention and MLP blocks; every linear inside a selected block is a target.
    vision_layers: str = ""
    vision_blocks: tuple[str, str] = ("self_attn", "mlp")  # (attention, MLP) child names in a vision layer
    text_layers: str = "model.language_model.layers"
    text_blocks: tuple[str, str] = ("self_attn", "mlp")
    # Tokens that stand for image content in the text: the collator masks them out of the labels.
    image_tokens: tuple[str, ...] = ()


# Qwen2-VL's vision span: <|vision_start|> <|image_pad|>... <|vision_end|>, and the video/vision pads.
QWEN_IMAGE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="qwen2_vl",
            model_type="qwen2_vl",
            vision_model_type="qwen2_vl_vision",
            vision_tower="model.visual",
            projector="model.visual.merger",
            vision_attention="full attention per image (varlen cu_seqlens), 2-D RoPE",
            text_attention="causal GQA, M-RoPE",
            vision_layers="model.visual.blocks",
            vision_blocks=("attn", "mlp"),
            image_tokens=QWEN_IMAGE_TOKENS,
        ),
        FamilySpec(
            name="qwen2_5_vl",
            model_type="qwen2_5_vl",
            vision_model_type="qwen2_5_vl_vision",
            vision_tower="model.visual",
            projector="model.visual.merger",
            vision_attention="windows of 64 patches, full attention on a few blocks",
            text_attention="causal GQA, M-RoPE",
            fast_inference=True,
            vision_layers="model.visual.blocks",
            vision_blocks=("attn", "mlp"),
            image_tokens=QWEN_IMAGE_TOKENS,
        ),
        FamilySpec(
            name="llava",
            model_type="llava",
            vision_model_type="clip_vision_model",
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            vision_attention="CLIP, no mask",
            text_attention="causal, Llama RoPE",
            vision_layers="model.vision_tower.encoder.layers",
            image_tokens=("<image>",),
        ),
        FamilySpec(
            name="pixtral",
            model_type="llava",
            vision_model_type="pixtral",
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            vision_attention="2-D RoPE, block-diagonal across images",
            text_attention="causal GQA (Mistral)",
            vision_layers="model.vision_tower.transformer.layers",
            vision_blocks=("attention", "feed_forward"),
            image_tokens=("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
        ),
        FamilySpec(
            name="gemma3",
            model_type="gemma3",
            vision_model_type="siglip_vision_model",
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            vision_attention="SigLIP, no mask",
            text_attention="causal GQA, sliding window on most layers, image tokens bidirectional",
            fast_inference=True,
            vision_layers="model.vision_tower.encoder.layers",
            image_tokens=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        ),
    )
}


def family_of(config) -> FamilySpec:
    """The family record of a transformers config, by model_type and the vision tower's model_type."""
    vision_type = getattr(getattr(config, "vision_config", None), "model_type", None)
    candidates = [spec for spec in FAMILIES.values() if spec.model_type == config.model_type]
    if len(candidates) == 1:  # only `llava` needs the vision tower's type (CLIP vs Pixtral)
        return candidates[0]
    for spec in candidates:
        if spec.vision_model_type == vision_type:
            return spec
    known = ", ".join(f"{s.model_type}/{s.vision_model_type}" for s in FAMILIES.values())
    raise UnknownFamilyError(
        f"model_type={config.model_type!r} with vision model_type={vision_type!r} is not a family fastvision "
        f"supports; supported (model_type/vision model_type): {known}."
    )
