"""The optimized backend: the reference pipeline and contract, with the Triton attention op and the
per-family patches that let one kernel launch serve a whole multi-image vision batch."""

from __future__ import annotations

from optimized import ops
from optimized.patches import pixtral, qwen_vision
from reference.families import FamilySpec
from reference.hf_attention import register
from reference.loader import Backend

TRITON_KEY = register("fastvision_triton", ops.attention)

# Patches per family: only where transformers would otherwise loop per image/window or build a dense mask.
FAMILY_PATCHES = {"qwen2_vl": qwen_vision, "qwen2_5_vl": qwen_vision, "pixtral": pixtral}


def patch_model(model, family: FamilySpec) -> None:
    module = FAMILY_PATCHES.get(family.name)
    if module is None or not _served_by_us(model):
        return
    patched = module.patch(model)
    model.fastvision_unpatch = lambda: module.unpatch(patched)


def _served_by_us(model) -> bool:
    """Patches route through our attention key; a user's attn_implementation="sdpa" gets none."""
    vision = getattr(model.config, "vision_config", model.config)
    return vision._attn_implementation == TRITON_KEY


OPTIMIZED = Backend(name="optimized", attention_key=lambda request: TRITON_KEY, patch=patch_model)
