"""The language model's per-token layers as fused Triton ops, in every family.

A profile of one 4-bit training step (Llava-1.5-7B widths, 4 x 2,000 tokens, H100) puts ~40% of GPU time
in elementwise kernels between the matmuls: RMSNorm's fp32 upcast and five ops per norm, the gated MLP's
activation and product, rotate-half RoPE's cat and four products, and the loss's fp32 copy of the logits
(8.4 GB for Gemma3's 262k vocabulary on 8,000 tokens) and its log-softmax forward and backward. Each is
replaced by one kernel forward and one backward (`optimized/kernels/`):

- RMSNorm modules (Llama-style cast, or Gemma3's `1 + weight` in fp32): the instance's `forward`;
- gated MLPs `down(act(gate(x)) * up(x))` with SiLU or tanh-GELU: the instance's `forward`; where `down` is a
  LoRA projection on the fused op, the activation and that projection are one op (`gated_lora_down`), which
  keeps neither act(gate) * up nor its gradient beside gate and up in the backward;
- the text attention's `apply_rotary_pos_emb`: the modeling module's global, switched on by a context
  variable only inside the optimized model's own attention modules, so every other model (reference
  ones included) calls the original function; the global is swapped only while an optimized model
  lives (`reference.shared_state`);
- the causal-LM loss, with the LM head fused into it while training (`optimized/patches/fused_head.py`).

Everything is set per instance and undone by `unpatch`.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys

from optimized import ops
from optimized.patches import fused_lora, switched_on
from reference.families import FAMILIES
from reference.instance_methods import weakly_bound
from reference.shared_state import SharedChange, module_attribute

# What to fuse comes from the family records (`FamilySpec.norm_classes`, `gated_mlp_classes`,
# `rotary_modules`): every class any record names, whatever the model's family, so a checkpoint that mixes
# parts (a Llava with a Mistral language model) gets each part fused.
# RMSNorm classes -> Gemma style (fp32 `x * (1 + w)` before the cast) or Llama style (cast, then `w *`).
NORM_CLASSES = {name: spec.norm_style == "gemma" for spec in FAMILIES.values() for name in spec.norm_classes}
GATED_MLP_CLASSES = frozenset(name for spec in FAMILIES.values() for name in spec.gated_mlp_classes)
ROTARY_MODULES = tuple(dict.fromkeys(name for spec in FAMILIES.values() for name in spec.rotary_modules))
# Activation modules by class name (transformers' ACT2FN classes; nn.SiLU for "swish") -> the kernel's name.
ACTIVATION_CLASSES = {"silu": ("SiLUActivation", "SiLU"), "gelu_tanh": ("GELUTanh", "PytorchGELUTanh")}

_fused_rotary = contextvars.ContextVar("fastvision_fused_rotary", default=False)


def _activation_of(act_fn) -> str | None:
    """The fused kernel's name for a transformers activation module, None for one it does not fuse."""
    return next((name for name, classes in ACTIVATION_CLASSES.items() if type(act_fn).__name__ in classes), None)


def _norm_forward(module, hidden_states, *, gemma: bool):
    eps = module.eps if gemma else module.variance_epsilon
    return ops.rms_norm(hidden_states, module.weight, eps, gemma=gemma)


def _gated_mlp_forward(module, x, *, activation: str):
    gate, up = module.gate_proj(x), module.up_proj(x)
    down = fused_lora.direct_arguments(module.down_proj)
    if down is None:
        return module.down_proj(ops.gated_activation(gate, up, activation))
    # A LoRA down projection on the fused op: activation and projection in one op that keeps neither
    # act(gate) * up nor its gradient beside gate and up (optimized/kernels/gated_lora_down.py).
    return ops.gated_lora_down(gate, up, activation, *down)


def _gated_rotary(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not _fused_rotary.get():
            return original(q, k, cos, sin, unsqueeze_dim)
        return ops.apply_rotary(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.fastvision_original = original
    return apply_rotary_pos_emb


_ROTARY_SWAPS: dict[str, SharedChange] = {}


def _hold_rotary_globals(model) -> list:
    """Swap each text modeling module's `apply_rotary_pos_emb` for the switched one while `model` lives;
    returns the modules, whose attention forwards read that global."""
    installed = []
    for name in ROTARY_MODULES:
        module = sys.modules.get(f"transformers.models.{name}.modeling_{name}")
        if module is None or not hasattr(module, "apply_rotary_pos_emb"):
            continue
        if name not in _ROTARY_SWAPS:
            original = module.apply_rotary_pos_emb
            _ROTARY_SWAPS[name] = module_attribute(module, "apply_rotary_pos_emb", _gated_rotary(original))
        _ROTARY_SWAPS[name].hold(model)
        installed.append(module)
    return installed


def _calls_rotary(module, modeling_modules) -> bool:
    forward = inspect.unwrap(type(module).forward)  # decorators (e.g. deprecate_kwarg) wrap it
    return any(forward.__globals__ is m.__dict__ for m in modeling_modules) and \
        "apply_rotary_pos_emb" in forward.__code__.co_names


def patch(model) -> list:
    """Fuse the model's norms, gated MLPs and text rotary embedding; returns what to undo."""
    modeling_modules = _hold_rotary_globals(model)
    patched = []
    for module in model.modules():
        name = type(module).__name__
        if name in NORM_CLASSES:
            module.forward = weakly_bound(_norm_forward, module, gemma=NORM_CLASSES[name])
        elif name in GATED_MLP_CLASSES and (activation := _activation_of(module.act_fn)) is not None:
            module.forward = weakly_bound(_gated_mlp_forward, module, activation=activation)
        elif _calls_rotary(module, modeling_modules):
            module.forward = switched_on(_fused_rotary, weakly_bound(type(module).forward, module))
        else:
            continue
        patched.append(module)
    return patched


def unpatch(model, patched: list) -> None:
    for module in patched:
        del module.forward  # the class's forward shows through again
