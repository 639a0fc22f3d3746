"""QuantPlan: which module is stored how, and why — data, computed from the family record.

The default 4-bit plan quantizes every `nn.Linear` of the language model to NF4 (double quantization,
compute dtype = model dtype) and keeps the vision tower, the projector/merger, `lm_head`, embeddings and
norms in 16-bit, each with its reason. The plan is computed before loading (it becomes the
bitsandbytes config), checked against the modules actually loaded, attached to the model as
`model.quantization_plan`, and round-trips through JSON so two backends' plans can be diffed.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn

from reference.families import FamilySpec

QUANTIZED_KINDS = ("nf4", "fp4", "int8")
KEEP = "keep"

# Why each part stays in 16-bit (the reason printed beside it in the plan).
KEEP_REASONS = {
    "vision tower": "vision tower: 4-bit vision encoders garble VLM outputs (unslothai/unsloth#1347, #3639)",
    "projector": "projector/merger: small, and every image feature passes through it",
    "lm_head": "lm_head: logits precision; small next to the language model",
    "embedding": "embedding: a lookup, not a matmul; bitsandbytes quantizes only nn.Linear",
    "norm": "norm: a few parameters that set every activation's scale",
    "other": "not a linear layer of the language model",
    "16bit": "16-bit load: nothing is quantized",
    "full": "full finetuning: every parameter is trained in 16/32-bit",
}


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    module: str
    kind: str  # "nf4" | "fp4" | "int8" | "keep"
    dtype: str  # compute dtype of a quantized layer, storage dtype of a kept one
    reason: str


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    mode: str  # "4bit" | "8bit" | "16bit" | "full" | "quantized"
    source: str  # "fastvision", "user quantization_config" or "checkpoint quantization_config"
    entries: tuple[PlanEntry, ...]
    notes: tuple[str, ...] = ()  # what the load decided that a user should know (a twin replaced by its original)

    def kinds(self) -> dict[str, str]:
        return {e.module: e.kind for e in self.entries}

    def quantized(self) -> list[str]:
        return [e.module for e in self.entries if e.kind in QUANTIZED_KINDS]

    def kept(self) -> list[str]:
        return [e.module for e in self.entries if e.kind == KEEP]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> QuantPlan:
        data = json.loads(text)
        entries = tuple(PlanEntry(**e) for e in data["entries"])
        return cls(data["mode"], data["source"], entries, tuple(data.get("notes", ())))

    def table(self) -> list[tuple[str, str, str, str]]:
        return [(e.module, e.kind, e.dtype, e.reason) for e in self.entries]


def part_of(name: str, family: FamilySpec) -> str:
    """Which part of the model a module belongs to, from the family record's module paths."""

    def under(root: str | None) -> bool:
        return root is not None and (name == root or name.startswith(root + "."))

    if under(family.projector):  # checked first: Qwen's merger sits inside the vision tower
        return "projector"
    if under(family.vision_tower):
        return "vision tower"
    if under(family.lm_head):
        return "lm_head"
    if under(family.language_model):
        return "language model"
    return "other"


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _leaf_modules_with_weights(model: nn.Module):
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            yield name, module


def _keep_reason(name: str, module: nn.Module, family: FamilySpec) -> str:
    if isinstance(module, nn.Embedding):
        return KEEP_REASONS["embedding"]
    if _is_norm(module):
        return KEEP_REASONS["norm"]
    part = part_of(name, family)
    return KEEP_REASONS.get(part, KEEP_REASONS["other"])  # a language-model non-linear falls to "other"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def expected_plan(
    skeleton: nn.Module, family: FamilySpec, mode: str, dtype: torch.dtype, quantize_vision: bool = False
) -> QuantPlan:
    """The plan fastvision builds for `mode` ("4bit", "8bit", "16bit", "full") on a model's structure
    (a meta-device skeleton is enough)."""
    kind = {"4bit": "nf4", "8bit": "int8"}.get(mode)
    entries = []
    for name, module in _leaf_modules_with_weights(skeleton):
        part = part_of(name, family)
        quantize = (
            kind is not None
            and isinstance(module, nn.Linear)
            and (part == "language model" or (part == "vision tower" and quantize_vision))
        )
        if quantize:
            reason = "language-model linear" if part == "language model" else "vision linear (quantize_vision=True)"
            entries.append(PlanEntry(name, kind, _dtype_name(dtype), reason))
        else:
            reason = KEEP_REASONS[mode] if kind is None else _keep_reason(name, module, family)
            entries.append(PlanEntry(name, KEEP, _dtype_name(dtype), reason))
    return QuantPlan(mode, "fastvision", tuple(entries))


def skip_modules(family: FamilySpec, quantize_vision: bool) -> list[str]:
    """bitsandbytes' `llm_int8_skip_modules`: the roots of the parts kept in 16-bit. Roots, not every
    module name: transformers matches a key as a module-boundary prefix of each name."""
    roots = [family.projector, family.lm_head]
    if not quantize_vision:
        roots.insert(0, family.vision_tower)
    return [r for r in roots if r]


def observed_kind(module: nn.Module) -> str:
    """What a loaded module actually is: nf4/fp4 (bitsandbytes Linear4bit), int8 (Linear8bitLt), or keep."""
    weight = getattr(module, "weight", None)
    quant_type = getattr(getattr(weight, "quant_state", None), "quant_type", None) or getattr(
        weight, "quant_type", None
    )
    class_name = type(module).__name__
    if class_name == "Linear4bit":
        return quant_type or "nf4"
    if class_name in ("Linear8bitLt", "Linear8bit"):
        return "int8"
    return KEEP


def observed_plan(model: nn.Module, family: FamilySpec, mode: str, source: str) -> QuantPlan:
    """The plan as the loaded modules show it, with each entry's reason."""
    entries = []
    for name, module in _leaf_modules_with_weights(model):
        kind = observed_kind(module)
        if kind == KEEP:
            dtype = next(module.parameters(recurse=False)).dtype
            reason = KEEP_REASONS[mode] if mode in ("16bit", "full") else _keep_reason(name, module, family)
        else:
            dtype = getattr(module, "compute_dtype", None) or torch.float16
            reason = f"{part_of(name, family)} linear" + ("" if source == "fastvision" else f" ({source})")
        entries.append(PlanEntry(name, kind, _dtype_name(dtype), reason))
    return QuantPlan(mode, source, tuple(entries))


def dequantized(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`module`'s parameter or buffer `name` as a float tensor: bitsandbytes' NF4/FP4 and int8 weights
    dequantized (their compute dtype), everything else as it is."""
    kind = observed_kind(module)
    if name != "weight" or kind == KEEP:
        return tensor
    import bitsandbytes.functional as bnb_functional

    if kind in ("nf4", "fp4"):
        return bnb_functional.dequantize_4bit(tensor.data, tensor.quant_state)
    # LLM.int8: each row holds int8 codes (CB) and its absmax (SCB); weight = CB * SCB / 127.
    codes = getattr(tensor, "CB", None)
    codes = tensor.data if codes is None else codes
    scales = getattr(tensor, "SCB", None)
    if scales is None:
        scales = module.state.SCB
    return codes.float() * scales.float()[:, None] / 127.0
