"""The suite's own knowledge of each family: where its parts live in a loaded model, what it is called,
how its attention is called and masked, which hub ids it has, and where its tolerances differ, with why.
Tests pick families by these properties (`one_each`, `Family.has_sliding_window`), never by name; the zoo's
recipe for each name is in `conformance/zoo.py` (it needs transformers' config classes, and this module
is read by the CLI before torch is imported).

Written from transformers 5's `...ForConditionalGeneration` classes and docs/contract.md, independently of
every backend (the suite never reads a backend's family records: a backend whose records were wrong
would otherwise agree with itself). Module paths are the in-memory ones (`model.language_model`, not the
on-disk `language_model.model` whose rename broke Unsloth's skip list, unslothai/unsloth#4208).

    >>> from conformance.families import FAMILIES, part_of
    >>> part_of("model.visual.merger.mlp.0", FAMILIES["qwen2_vl"])
    'projector'
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads the family names: no torch or pytest at import
    from torch import nn


@dataclasses.dataclass(frozen=True)
class Loosened:
    """A tolerance a family is allowed past the suite's default (`conformance/tolerances.py`), and why."""

    bound: float
    reason: str


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # the zoo's name, the `family(name)` marker, the CLI's --family
    model_type: str  # config.model_type
    vision_model_type: str  # config.vision_config.model_type (tells Pixtral from Llava)
    model_class: str  # the transformers class a load must return
    processor_class: str  # the processor class AutoProcessor gives for the checkpoint
    vision_tower: str  # module path of the vision encoder
    projector: str  # module path of the projector / merger (inside the tower for Qwen)
    vision_layers: str  # module path of the vision tower's layer list
    text_attention_class: str  # attention module class of the language model
    vision_attention_class: str  # attention module class of the vision tower
    # How the vision tower calls attention under a key without "flash" in its name (transformers 5):
    # "per_image" (once per image or window, no mask), "block_mask" (one call, a block-diagonal float mask),
    # "batched" (a batch of images, no mask, module.is_causal False) or "batched_not_causal" (the same,
    # passing is_causal=False).
    vision_call: str
    four_bit_twin: tuple[str, str]  # (16-bit hub id, its pre-quantized twin): docs/contract.md's name table
    language_model: str = "model.language_model"
    text_layers: str = "model.language_model.layers"
    embed_tokens: str = "model.language_model.embed_tokens"
    lm_head: str = "lm_head"
    tied_embeddings: bool = False  # lm_head shares the input embedding's weight (offload is refused)
    fast_inference: bool = False  # docs/contract.md: fast_inference is allowed for Qwen2.5-VL and Gemma3 only
    # Children of a vision layer / text layer that hold its attention and its MLP (LoRA placement).
    vision_blocks: tuple[str, str] = ("self_attn", "mlp")
    text_blocks: tuple[str, str] = ("self_attn", "mlp")
    # Tokens standing for image content in the text, which a collator's labels must mask.
    image_tokens: tuple[str, ...] = ()
    # Chat-template markers that open a user turn and an assistant turn (responses-only masking).
    turn_markers: tuple[str, str] = ("", "")
    # Mask features the language model really uses beyond causal GQA: "window" (sliding window), "spans"
    # (image tokens bidirectional within an image).
    text_mask_features: frozenset[str] = frozenset()
    nf4_logits_min_sqnr_db: Loosened | None = None  # 4-bit logits against 16-bit (tolerances.py)

    @property
    def has_sliding_window(self) -> bool:
        return "window" in self.text_mask_features

    @property
    def packs_vision_batch(self) -> bool:
        """The vision tower packs its images into one sequence (per-image calls or a block mask)."""
        return self.vision_call in ("per_image", "block_mask")


GEMMA3_NF4_NOISE = (
    "Gemma3 puts a norm after attention and after the MLP (post_attention_layernorm, post_feedforward_layernorm), "
    "so every layer's NF4 noise reaches the residual at full scale instead of being diluted by the unquantized "
    "embedding stream: transformers' own NF4 load of the zoo's gemma3 checkpoint (vision, projector and lm_head "
    "kept) measures 8.5 dB against fp32 (FP4: 7.0 dB), where the other four families measure 17-19 dB. A bound "
    "1.5 dB under the measurement still fails a broken 4-bit path (weights dequantized wrongly, a layer run on its "
    "packed bytes), whose logits no longer follow the model's: ~0 dB or less. (Placement faults cost ~1-2 dB "
    "here; test_quant_placement judges placement exactly.)"
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="qwen2_vl",
            model_type="qwen2_vl",
            vision_model_type="qwen2_vl_vision",
            model_class="Qwen2VLForConditionalGeneration",
            processor_class="Qwen2VLProcessor",
            vision_tower="model.visual",
            projector="model.visual.merger",
            vision_layers="model.visual.blocks",
            text_attention_class="Qwen2VLAttention",
            vision_attention_class="VisionAttention",
            vision_blocks=("attn", "mlp"),
            image_tokens=("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
            turn_markers=("<|im_start|>user\n", "<|im_start|>assistant\n"),
            vision_call="per_image",  # VisionAttention: torch.split by cu_seqlens, mask None, is_causal=False
            four_bit_twin=("unsloth/Qwen2-VL-2B-Instruct", "unsloth/Qwen2-VL-2B-Instruct-bnb-4bit"),
        ),
        Family(
            name="qwen2_5_vl",
            model_type="qwen2_5_vl",
            vision_model_type="qwen2_5_vl_vision",
            model_class="Qwen2_5_VLForConditionalGeneration",
            processor_class="Qwen2_5_VLProcessor",
            vision_tower="model.visual",
            projector="model.visual.merger",
            vision_layers="model.visual.blocks",
            text_attention_class="Qwen2_5_VLAttention",
            vision_attention_class="Qwen2_5_VLVisionAttention",
            vision_blocks=("attn", "mlp"),
            image_tokens=("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
            turn_markers=("<|im_start|>user\n", "<|im_start|>assistant\n"),
            fast_inference=True,
            vision_call="per_image",  # the same, once per 64-patch window or per image
            four_bit_twin=("unsloth/Qwen2.5-VL-3B-Instruct", "unsloth/Qwen2.5-VL-3B-Instruct-bnb-4bit"),
        ),
        Family(
            name="qwen3_vl",
            model_type="qwen3_vl",
            vision_model_type="qwen3_vl_vision",
            model_class="Qwen3VLForConditionalGeneration",
            processor_class="Qwen3VLProcessor",
            vision_tower="model.visual",
            # The final merger; the DeepStack mergers (model.visual.deepstack_merger_list) also project to the
            # LM width but sit in the tower's namespace, so they count as vision tower (kept 16-bit either way).
            projector="model.visual.merger",
            vision_layers="model.visual.blocks",
            text_attention_class="Qwen3VLTextAttention",
            vision_attention_class="Qwen3VLVisionAttention",
            vision_blocks=("attn", "mlp"),
            image_tokens=("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
            turn_markers=("<|im_start|>user\n", "<|im_start|>assistant\n"),
            vision_call="per_image",  # Qwen3VLVisionAttention: split by cu_seqlens, mask None, is_causal=False
            four_bit_twin=("unsloth/Qwen3-VL-4B-Instruct", "unsloth/Qwen3-VL-4B-Instruct-bnb-4bit"),
        ),
        Family(
            name="llava",
            model_type="llava",
            vision_model_type="clip_vision_model",
            model_class="LlavaForConditionalGeneration",
            processor_class="LlavaProcessor",
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            vision_layers="model.vision_tower.encoder.layers",
            text_attention_class="LlamaAttention",
            vision_attention_class="CLIPAttention",
            image_tokens=("<image>",),
            turn_markers=("USER:", "ASSISTANT:"),
            vision_call="batched",  # CLIPAttention
            four_bit_twin=("unsloth/llava-1.5-7b-hf", "unsloth/llava-1.5-7b-hf-bnb-4bit"),
        ),
        Family(
            name="pixtral",
            model_type="llava",
            vision_model_type="pixtral",
            model_class="LlavaForConditionalGeneration",
            processor_class="PixtralProcessor",
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            vision_layers="model.vision_tower.transformer.layers",
            text_attention_class="MistralAttention",
            vision_attention_class="PixtralAttention",
            vision_blocks=("attention", "feed_forward"),
            image_tokens=("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
            turn_markers=("[INST]", "[/INST]"),
            vision_call="block_mask",  # generate_block_attention_mask: (1, 1, N, N), finfo.min off the blocks
            four_bit_twin=("unsloth/Pixtral-12B-2409", "unsloth/Pixtral-12B-2409-bnb-4bit"),
        ),
        Family(
            name="mistral3",
            model_type="mistral3",
            vision_model_type="pixtral",
            model_class="Mistral3ForConditionalGeneration",
            processor_class="PixtralProcessor",
            vision_tower="model.vision_tower",
            # Mistral3MultiModalProjector: an RMSNorm, the 2x2 patch merger's linear, then linear_1 / linear_2.
            projector="model.multi_modal_projector",
            vision_layers="model.vision_tower.transformer.layers",
            text_attention_class="MistralAttention",
            vision_attention_class="PixtralAttention",
            vision_blocks=("attention", "feed_forward"),
            image_tokens=("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
            turn_markers=("[INST]", "[/INST]"),
            vision_call="block_mask",  # the same PixtralVisionModel as Pixtral's
            four_bit_twin=("unsloth/Mistral-Small-3.1-24B-Instruct-2503",
                           "unsloth/Mistral-Small-3.1-24B-Instruct-2503-bnb-4bit"),
            # Mistral-Small-3.1/3.2's text config has sliding_window null: causal GQA only.
        ),
        Family(
            name="gemma3",
            model_type="gemma3",
            vision_model_type="siglip_vision_model",
            model_class="Gemma3ForConditionalGeneration",
            processor_class="Gemma3Processor",
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            vision_layers="model.vision_tower.encoder.layers",
            text_attention_class="Gemma3Attention",
            vision_attention_class="SiglipAttention",
            image_tokens=("<start_of_image>", "<image_soft_token>", "<end_of_image>"),
            turn_markers=("<start_of_turn>user\n", "<start_of_turn>model\n"),
            tied_embeddings=True,
            fast_inference=True,
            vision_call="batched_not_causal",  # SiglipAttention
            four_bit_twin=("unsloth/gemma-3-4b-it", "unsloth/gemma-3-4b-it-bnb-4bit"),
            # Sliding window on 5 of 6 layers, image tokens bidirectional within an image. (Qwen2-VL's sliding
            # window is off by default; Pixtral-12B's Mistral has none.)
            text_mask_features=frozenset({"window", "spans"}),
            nf4_logits_min_sqnr_db=Loosened(7.0, GEMMA3_NF4_NOISE),
        ),
    )
}
NAMES: tuple[str, ...] = tuple(FAMILIES)


def params(names=NAMES) -> list:
    """`pytest.param(name, id=name, marks=family(name))` for each family: parametrize with this so the
    runner's table and `-m`/`-k` selections see the family."""
    import pytest

    return [pytest.param(name, id=name, marks=pytest.mark.family(name)) for name in names]


def one_each(kind: Callable[[Family], object]) -> list:
    """`params` of the first family (in NAMES order) of each value of `kind`: for a test too costly to run on
    every family that must still meet each kind (tied embeddings and not, say)."""
    first = {}
    for family in FAMILIES.values():
        first.setdefault(kind(family), family.name)
    return params(list(first.values()))


def _under(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def part_of(module_name: str, family: Family) -> str:
    """"projector", "vision tower", "lm_head", "embedding", "language model" or "other"."""
    if _under(module_name, family.projector):  # first: Qwen's merger sits inside the vision tower
        return "projector"
    if _under(module_name, family.vision_tower):
        return "vision tower"
    if _under(module_name, family.lm_head):
        return "lm_head"
    if _under(module_name, family.embed_tokens):
        return "embedding"
    if _under(module_name, family.language_model):
        return "language model"
    return "other"


def language_model(model: nn.Module, family: Family) -> nn.Module:
    return model.get_submodule(family.language_model)


def input_embedding(model: nn.Module, family: Family) -> nn.Module:
    return model.get_submodule(family.embed_tokens)


@contextlib.contextmanager
def capturing_input_embeddings(model: nn.Module, family: str):
    """Make the language model's input embeddings a leaf that requires grad, and keep it (a list, one
    entry per forward)."""
    captured = []

    def hook(_module, _args, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = input_embedding(model, FAMILIES[family]).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
