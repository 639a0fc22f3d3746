"""The optimized backend: the reference pipeline and contract, with the Triton attention op, the
per-family patches that let one kernel launch serve a whole multi-image vision batch, and the fused
per-token layers (norms, gated MLPs, rotary embedding, loss) of every family."""

from __future__ import annotations

import functools

from optimized import ops
from optimized.patches import fused_layers, pixtral, qwen_vision
from reference.families import FamilySpec
from reference.hf_attention import register
from reference.loader import Backend

TRITON_KEY = register("fastvision_triton", ops.attention)

# Patches per family: only where transformers would otherwise loop per image/window or build a dense mask.
FAMILY_PATCHES = {"qwen2_vl": qwen_vision, "qwen2_5_vl": qwen_vision, "pixtral": pixtral}


def patch_model(model, family: FamilySpec) -> None:
    undo = []
    module = FAMILY_PATCHES.get(family.name)
    if module is not None and _served_by_us(model):
        undo.append(functools.partial(module.unpatch, module.patch(model)))
    undo.append(functools.partial(fused_layers.unpatch, fused_layers.patch(model)))

    def unpatch():
        for step in reversed(undo):
            step()

    model.fastvision_unpatch = unpatch


def _served_by_us(model) -> bool:
    """Patches route through our attention key; a user's attn_implementation="sdpa" gets none."""
    vision = getattr(model.config, "vision_config", model.config)
    return vision._attn_implementation == TRITON_KEY


OPTIMIZED = Backend(name="optimized", attention_key=lambda request: TRITON_KEY, patch=patch_model)
