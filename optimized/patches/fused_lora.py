"""PEFT's LoRA projections as one op each (`optimized/kernels/lora_linear.py`), set per instance when
adapters are attached.

fastvision's get_peft_model (and an adapter reload) attaches adapters through PEFT as usual, then calls the
`fastvision_on_adapters` hook this patch sets on the model at load. Each `lora.Linear` / `lora.bnb.Linear4bit`
that fits -- vanilla LoRA, no dropout, no DoRA or LoRA bias, a bias-free adapter pair, a plain or 4-bit
base -- gets an instance `forward` that runs the fused op while exactly one adapter is active, none is
merged or disabled, and the base is frozen (the op gives it no gradient). Any other call -- PEFT's
`disable_adapter()` context, several adapters, `adapter_names`, a base bias that trains (`bias="all"`) --
is PEFT's own forward. `use_peft_lora(model)` takes the fused forwards off: PEFT's modules exactly.
`direct_arguments` lets a gated MLP fold its down projection into the op that runs its activation, where
calling the module would have run the fused op and nothing else (no hooks).
"""

from __future__ import annotations

import torch

from optimized import ops
from reference.instance_methods import weakly_bound


def _base_tensors(base):
    """(weight, quant_state) of a base layer the op reads, or None for one it does not."""
    quant_state = getattr(base.weight, "quant_state", None)
    if type(base) is torch.nn.Linear:
        return base.weight, None
    if type(base).__name__ == "Linear4bit" and quant_state is not None:
        return base.weight, quant_state
    return None


def fits(module) -> bool:
    """A PEFT LoRA linear whose every adapter is vanilla LoRA the op computes exactly."""
    if not hasattr(module, "lora_A") or not hasattr(module, "get_base_layer"):
        return False
    if getattr(module, "fan_in_fan_out", False) or _base_tensors(module.get_base_layer()) is None:
        return False
    for name in module.lora_A:
        pair = (module.lora_A[name], module.lora_B[name])
        if any(type(layer) is not torch.nn.Linear or layer.bias is not None for layer in pair):
            return False
        if not isinstance(module.lora_dropout[name], torch.nn.Identity) or name in getattr(module, "lora_variant", {}):
            return False
    return not getattr(module, "lora_bias", {}) or not any(module.lora_bias.values())


def _arguments(module):
    """(weight, quant_state, bias, lora_A, lora_B, scaling) of the fused op for a call of `module` now -- one
    adapter active, none merged or disabled, the base frozen -- else None (PEFT's own forward serves)."""
    active = [name for name in module.active_adapters if name in module.lora_A]
    base = module.get_base_layer()
    base_trains = any(p is not None and p.requires_grad for p in (base.weight, base.bias))  # e.g. bias="all"
    if module.disable_adapters or module.merged or len(active) != 1 or base_trains:
        return None
    weight, quant_state = _base_tensors(base)
    name = active[0]
    return weight, quant_state, base.bias, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]


def _fused_forward(module, x, *args, **kwargs):
    arguments = None if args or kwargs else _arguments(module)
    if arguments is None:
        return type(module).forward(module, x, *args, **kwargs)
    return ops.lora_linear(x, *arguments)


def direct_arguments(module):
    """The fused op's arguments for computing `module`'s projection without calling it: only where calling it
    would run the fused op and nothing else -- its fused forward set, no hooks on it or its base layer (an
    accelerate offload hook wraps forward itself, and so fails the first test) -- else None."""
    if getattr(vars(module).get("forward"), "__name__", "") != "_fused_forward":
        return None
    hooked = [m for m in (module, module.get_base_layer()) if m._forward_hooks or m._forward_pre_hooks]
    if hooked or torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return None
    return _arguments(module)


def _on_adapters(model, peft_model) -> None:
    for module in peft_model.modules():
        if fits(module):
            module.forward = weakly_bound(_fused_forward, module)


def patch(model) -> None:
    model.fastvision_on_adapters = weakly_bound(_on_adapters, model)


def use_peft_lora(model) -> None:
    """PEFT's own LoRA modules from now on: the fused forwards taken off, none set by later adapters."""
    for module in model.modules():
        if "forward" in vars(module) and getattr(vars(module)["forward"], "__name__", "") == "_fused_forward":
            del module.forward
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vars(base).pop("fastvision_on_adapters", None)


def unpatch(model) -> None:
    use_peft_lora(model)


__all__ = ["direct_arguments", "fits", "patch", "unpatch", "use_peft_lora"]
