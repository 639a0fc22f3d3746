"""One record per model family: everything fastvision knows of it.

Where its parts live, what its attention looks like, its LoRA targets, image tokens, chat template and
4-bit twins, and which layers the optimized backend fuses. Quantization placement, the fast-inference
rule, name resolution, the collator and the optimized backend's patches read these records; nothing else
branches on a family's name, and nothing matches module names by substring. The optimized backend's part
is named by class and module names and by string keys that `optimized` resolves, so `reference` never
imports `optimized`; adding a family is adding a record. Module paths are those of transformers 5's
`...ForConditionalGeneration` classes in memory (`model.language_model`, not the on-disk
`language_model.model` that broke Unsloth's skip list when transformers renamed it).
"""

from __future__ import annotations

import dataclasses

from reference.chat_template_texts import CHATML, GEMMA3, LLAVA, MISTRAL, QWEN3
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
    # The chat template `get_chat_template` sets, under each of Unsloth's names for it.
    chat_template: str = ""
    chat_template_names: tuple[str, ...] = ()
    # (16-bit hub id, its pre-quantized `-bnb-4bit` twin): `reference.naming`'s table.
    four_bit_twins: tuple[tuple[str, str], ...] = ()
    # (16-bit unsloth/ mirror, Unsloth's dynamic quant of it, `-unsloth-bnb-4bit`: some layers kept 16-bit by its
    # own skip list). A 4-bit load reads the dynamic id as given (pre-quantized); any other load maps it back to
    # the mirror, as a `-bnb-4bit` twin is. A 16-bit id still maps to its plain `-bnb-4bit` twin.
    dynamic_four_bit_twins: tuple[tuple[str, str], ...] = ()
    # What the optimized backend fuses (`optimized/patches/fused_layers.py`), by transformers' class and
    # module names. RMSNorm classes, in Llama's style (cast, then `weight *`) or Gemma's (fp32 `x * (1 + w)`):
    norm_classes: tuple[str, ...] = ()
    norm_style: str = "llama"  # "llama" or "gemma"
    # MLPs whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)).
    gated_mlp_classes: tuple[str, ...] = ()
    # transformers.models.<name>.modeling_<name> whose `apply_rotary_pos_emb` the text attention calls.
    rotary_modules: tuple[str, ...] = ()
    # The optimized backend's vision patch, by key (`optimized.loader.VISION_PATCHES`): "qwen_varlen" (one
    # launch for the per-image/per-window loop of `vision_attention_classes`), "pixtral_segments" (the
    # block-diagonal mask as segments), or None (transformers' tower already makes one batched call).
    vision_patch: str | None = None
    vision_attention_classes: tuple[str, ...] = ()


# Qwen2-VL's vision span: <|vision_start|> <|image_pad|>... <|vision_end|>, and the video/vision pads.
QWEN_IMAGE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")


# Each 16-bit model is on the hub under its maker's id and as Unsloth's mirror; both map to the one twin.
def _twins(mirror: str, *originals: str) -> tuple[tuple[str, str], ...]:
    return tuple((sixteen, f"{mirror}-bnb-4bit") for sixteen in (*originals, mirror))


# Unsloth's dynamic quant of a mirror (the 16-bit id it maps back to, the id it is published under).
def _dynamic(*mirrors: str) -> tuple[tuple[str, str], ...]:
    return tuple((mirror, f"{mirror}-unsloth-bnb-4bit") for mirror in mirrors)


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
            chat_template=CHATML,
            chat_template_names=("qwen-2", "qwen2-vl"),
            four_bit_twins=(*_twins("unsloth/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-2B-Instruct"),
                            *_twins("unsloth/Qwen2-VL-7B-Instruct", "Qwen/Qwen2-VL-7B-Instruct")),
            norm_classes=("Qwen2RMSNorm", "Qwen2VLRMSNorm"),  # Qwen2RMSNorm: transformers 5.17's name
            gated_mlp_classes=("Qwen2MLP",),  # the vision tower's VisionMlp is fc2(act(fc1(x))), not gated
            rotary_modules=("qwen2_vl",),
            vision_patch="qwen_varlen",
            vision_attention_classes=("VisionAttention",),
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
            chat_template=CHATML,
            chat_template_names=("qwen-2.5", "qwen2.5"),
            four_bit_twins=(*_twins("unsloth/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct"),
                            *_twins("unsloth/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")),
            dynamic_four_bit_twins=_dynamic("unsloth/Qwen2.5-VL-7B-Instruct"),
            norm_classes=("Qwen2RMSNorm", "Qwen2_5_VLRMSNorm"),  # Qwen2RMSNorm: transformers 5.17's name
            gated_mlp_classes=("Qwen2MLP", "Qwen2_5_VLMLP"),  # text, vision
            rotary_modules=("qwen2_5_vl",),
            vision_patch="qwen_varlen",
            vision_attention_classes=("Qwen2_5_VLVisionAttention",),
        ),
        FamilySpec(
            name="qwen3_vl",
            model_type="qwen3_vl",
            vision_model_type="qwen3_vl_vision",
            vision_tower="model.visual",
            projector="model.visual.merger",  # the DeepStack mergers sit beside it in the tower, kept 16-bit too
            vision_attention="full attention per image (varlen cu_seqlens), 2-D RoPE",
            text_attention="causal GQA, interleaved M-RoPE, QK-norm; DeepStack adds vision features to early layers",
            vision_layers="model.visual.blocks",
            vision_blocks=("attn", "mlp"),
            image_tokens=QWEN_IMAGE_TOKENS,
            chat_template=QWEN3,
            chat_template_names=("qwen-3", "qwen3"),
            four_bit_twins=(*_twins("unsloth/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-2B-Instruct"),
                            *_twins("unsloth/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-4B-Instruct"),
                            *_twins("unsloth/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-8B-Instruct")),
            # The text norms, q_norm/k_norm on (..., head_dim) included; the tower's norms are LayerNorms.
            norm_classes=("Qwen3VLTextRMSNorm",),
            gated_mlp_classes=("Qwen3VLTextMLP",),  # the tower's Qwen3VLVisionMLP is fc2(act(fc1(x))), not gated
            rotary_modules=("qwen3_vl",),
            vision_patch="qwen_varlen",
            vision_attention_classes=("Qwen3VLVisionAttention",),
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
            chat_template=LLAVA,
            chat_template_names=("llava",),
            four_bit_twins=_twins("unsloth/llava-1.5-7b-hf", "llava-hf/llava-1.5-7b-hf"),
            norm_classes=("LlamaRMSNorm",),  # CLIP's LayerNorms stay
            gated_mlp_classes=("LlamaMLP",),
            rotary_modules=("llama",),
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
            chat_template=MISTRAL,
            chat_template_names=("mistral", "pixtral"),
            four_bit_twins=_twins("unsloth/Pixtral-12B-2409", "mistral-community/pixtral-12b"),
            norm_classes=("MistralRMSNorm", "PixtralRMSNorm"),
            gated_mlp_classes=("MistralMLP", "PixtralMLP"),
            rotary_modules=("mistral",),  # Pixtral's own 2-D rotary runs inside its vision attention, unfused
            vision_patch="pixtral_segments",
        ),
        FamilySpec(
            name="mistral3",
            model_type="mistral3",
            vision_model_type="pixtral",
            vision_tower="model.vision_tower",
            # RMSNorm, the 2x2 patch merger (merging_layer) and linear_1/linear_2, all kept 16-bit.
            projector="model.multi_modal_projector",
            vision_attention="2-D RoPE, block-diagonal across images; a learned 2x2 patch merger after the tower",
            text_attention="causal GQA (Mistral; a sliding window where the config sets one, none in Mistral-Small)",
            vision_layers="model.vision_tower.transformer.layers",
            vision_blocks=("attention", "feed_forward"),
            image_tokens=("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
            # No chat template of ours: Unsloth's one Mistral name, "mistral", is Pixtral's [INST] template
            # (the checkpoint's own template, with its [SYSTEM_PROMPT], stays on the processor).
            four_bit_twins=(*_twins("unsloth/Mistral-Small-3.1-24B-Instruct-2503",
                                    "mistralai/Mistral-Small-3.1-24B-Instruct-2503"),
                            *_twins("unsloth/Mistral-Small-3.2-24B-Instruct-2506",
                                    "mistralai/Mistral-Small-3.2-24B-Instruct-2506")),
            dynamic_four_bit_twins=_dynamic("unsloth/Mistral-Small-3.1-24B-Instruct-2503",
                                            "unsloth/Mistral-Small-3.2-24B-Instruct-2506"),
            # Mistral-Small's text is `mistral`, Ministral 3's `ministral3` (YaRN, Llama-4 query scaling, both
            # applied around the same rotate-half RoPE); Mistral3RMSNorm is the projector's norm.
            norm_classes=("MistralRMSNorm", "Ministral3RMSNorm", "PixtralRMSNorm", "Mistral3RMSNorm"),
            gated_mlp_classes=("MistralMLP", "Ministral3MLP", "PixtralMLP"),
            rotary_modules=("mistral", "ministral3"),  # Pixtral's 2-D rotary runs inside its vision attention
            vision_patch="pixtral_segments",
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
            chat_template=GEMMA3,
            chat_template_names=("gemma-3", "gemma3"),
            four_bit_twins=(*_twins("unsloth/gemma-3-4b-it", "google/gemma-3-4b-it"),
                            *_twins("unsloth/gemma-3-12b-it", "google/gemma-3-12b-it")),
            norm_classes=("Gemma3RMSNorm",),  # SigLIP's LayerNorms stay
            norm_style="gemma",
            gated_mlp_classes=("Gemma3MLP",),
            rotary_modules=("gemma3",),
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
