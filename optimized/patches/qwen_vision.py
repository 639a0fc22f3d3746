"""Qwen-style varlen vision attention (Qwen2-VL, Qwen2.5-VL: `vision_patch="qwen_varlen"`) in one launch per layer.

transformers' vision attention, under any key without "flash" in it, splits q/k/v per image (Qwen2-VL)
or per 64-patch window (Qwen2.5-VL: 81 windows for one 1008x1008 image) after a `.tolist()` host sync,
and calls attention once per piece. This forward hands the packed sequence to the attention function
once, with the pieces as `cu_seqlens` segments. It is set on each module instance of an optimized model
(never on the class), so reference models in the same process are untouched.
"""

from __future__ import annotations

import sys

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from reference.families import FamilySpec
from reference.instance_methods import weakly_bound
from reference.ops.attention import AttentionSpec


def varlen_vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    seq_length = hidden_states.shape[0]
    qkv = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3)
    query, key, value = qkv.unbind(0)
    cos, sin = position_embeddings
    # Each modeling file has its own rotary helper (fp32 math, then cast): use the module's own.
    apply_rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    query, key = apply_rotary(query, key, cos, sin)
    query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    attention_function = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, _ = attention_function(
        self, query, key, value, AttentionSpec(cu_seqlens=cu_seqlens), scaling=self.scaling, is_causal=False
    )
    return self.proj(out.reshape(seq_length, -1))


def patch(model, family: FamilySpec) -> list:
    """Set the one-launch forward on every vision attention module of the family's classes
    (`FamilySpec.vision_attention_classes`); returns them (for undo)."""
    patched = []
    for module in model.modules():
        if type(module).__name__ in family.vision_attention_classes and hasattr(module, "qkv"):
            module.forward = weakly_bound(varlen_vision_attention_forward, module)
            patched.append(module)
    return patched


def unpatch(modules: list) -> None:
    for module in modules:
        del module.forward  # the instance attribute goes; the class's forward shows through again
