"""The optimized backend: the reference pipeline and contract, with the Triton attention op, the
per-family patches that let one kernel launch serve a whole multi-image vision batch, and the fused
per-token layers (norms, gated MLPs, rotary embedding, loss) of every family."""

from __future__ import annotations

import functools
import weakref

from optimized import ops
from optimized.patches import fused_head, fused_layers, fused_lora, pixtral, qwen_vision
from reference.families import FamilySpec
from reference.hf_attention import register
from reference.loader import Backend

TRITON = register("fastvision_triton", ops.attention)  # registered while an optimized model lives

# The vision patches a family record names (`FamilySpec.vision_patch`): only where transformers would
# otherwise loop per image/window or build a dense mask.
VISION_PATCHES = {"qwen_varlen": qwen_vision, "pixtral_segments": pixtral}


def patch_model(model, family: FamilySpec) -> None:
    undo = []
    if family.vision_patch is not None and _served_by_us(model):
        module = VISION_PATCHES[family.vision_patch]
        undo.append(functools.partial(module.unpatch, module.patch(model, family)))
    fused, head_fused = fused_layers.patch(model), fused_head.patch(model)
    model_ref = weakref.ref(model)  # held weakly: the model holds this function (no reference cycle)
    undo.append(lambda: fused_layers.unpatch(model_ref(), fused))
    undo.append(lambda: fused_head.unpatch(model_ref(), head_fused))
    fused_lora.patch(model)
    undo.append(lambda: fused_lora.unpatch(model_ref()))

    def unpatch():
        for step in reversed(undo):
            step()

    model.fastvision_unpatch = unpatch


def _served_by_us(model) -> bool:
    """Patches route through our attention key; a user's attn_implementation="sdpa" gets none."""
    vision = getattr(model.config, "vision_config", model.config)
    return vision._attn_implementation == TRITON.key


OPTIMIZED = Backend(name="optimized", attention=lambda request: TRITON, patch=patch_model)
