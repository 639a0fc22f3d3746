"""Pixtral's vision mask as segments, not as a dense (N x N) float tensor.

`PixtralVisionModel.forward` packs every image into one sequence and, under any key without "flash",
calls `generate_block_attention_mask`, which fills an N x N tensor with finfo.min off the diagonal
blocks (N = 4096 for four 1024-patch images: 32 MB in bf16 per forward, and SDPA's flash and cuDNN
paths refuse it). While an optimized vision tower runs, that function returns the same structure as
an `AttentionSpec` with `cu_seqlens` instead. Other models' calls, reference ones included, get the
original function's result: the switch is a context variable set only around optimized towers. The
module-level swap itself lasts only while an optimized Pixtral model is alive (`shared_state`).
"""

from __future__ import annotations

import contextvars

import torch
from transformers.models.pixtral import modeling_pixtral

from optimized.patches import switched_on
from reference.families import FamilySpec
from reference.instance_methods import weakly_bound
from reference.ops.attention import AttentionSpec
from reference.shared_state import module_attribute

_structured = contextvars.ContextVar("fastvision_pixtral_structured_mask", default=False)
_original_generate = modeling_pixtral.generate_block_attention_mask


def _generate_block_attention_mask(patch_embeds_list, tensor):
    if not _structured.get():
        return _original_generate(patch_embeds_list, tensor)
    lengths = torch.tensor([0, *patch_embeds_list], dtype=torch.int32, device=tensor.device)
    return AttentionSpec(cu_seqlens=lengths.cumsum(0, dtype=torch.int32))


# Inert unless switched on, and in place only while a model holds it.
_STRUCTURED_MASK = module_attribute(modeling_pixtral, "generate_block_attention_mask", _generate_block_attention_mask)


def patch(model, family: FamilySpec) -> list:
    """Route the model's Pixtral vision towers' masks through structure; returns them (for undo). Any
    family whose tower is `PixtralVisionModel` (`vision_patch="pixtral_segments"`) is served alike."""
    _STRUCTURED_MASK.hold(model)
    towers = [m for m in model.modules() if isinstance(m, modeling_pixtral.PixtralVisionModel)]
    for tower in towers:
        tower.forward = switched_on(_structured, weakly_bound(type(tower).forward, tower))
    return towers


def unpatch(towers: list) -> None:
    for tower in towers:
        del tower.forward
