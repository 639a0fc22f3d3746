"""Quantization placement: the plan a load reports, the modules it loaded, and what docs/contract.md asks —
all three equal, exactly, for every family and mode.

The expectation is computed here, from the suite's own module paths (`conformance.families`), never
from a backend's records: in 4-bit every `nn.Linear` under the language model is NF4 with double
quantization and compute dtype = the model's dtype (8-bit: LLM.int8); the vision tower (unless
`quantize_vision=True`), the projector/merger, `lm_head`, embeddings and norms stay 16-bit, each with
a reason. A user's `quantization_config` is applied as given (its own skip list, quant type, double
quantization, compute dtype), and a checkpoint that is already quantized keeps its quantization even
when loaded with `load_in_4bit=False`; the plan says which of the three decided.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import BitsAndBytesConfig

from conformance import checks, families, zoo

KEEP = "keep"
MODES = {  # mode -> the from_pretrained kwargs that ask for it (docs/contract.md)
    "4bit": {"load_in_4bit": True},
    "8bit": {"load_in_4bit": False, "load_in_8bit": True},
    "16bit": {"load_in_4bit": False, "load_in_16bit": True},
    "full": {"load_in_4bit": False, "full_finetuning": True},
}
QUANTIZED_KIND = {"4bit": "nf4", "8bit": "int8"}


# ---------------------------------------------------------------------------------- the suite's view
def _holders(model: nn.Module):
    """(name, module) of every module that holds parameters itself: what a plan must place."""
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            yield name, module


def _under_any(name: str, roots) -> bool:
    return any(root == "" or name == root or name.startswith(root + ".") for root in roots)


def expected_kinds(model: nn.Module, *, kind: str | None, quantized_roots, kept_roots) -> dict[str, str]:
    """{module: kind}: an nn.Linear under a quantized root and under no kept root is `kind`; the rest keep."""
    return {
        name: kind
        if kind is not None and isinstance(module, nn.Linear) and _under_any(name, quantized_roots)
        and not _under_any(name, kept_roots)
        else KEEP
        for name, module in _holders(model)
    }


def fastvision_expectation(model: nn.Module, family: str, mode: str, quantize_vision: bool) -> dict[str, str]:
    """docs/contract.md's default placement for `mode`."""
    record = families.FAMILIES[family]
    quantized = [record.language_model] + ([record.vision_tower] if quantize_vision else [])
    kept = [record.projector, record.lm_head, record.embed_tokens]  # the merger sits inside Qwen's tower
    return expected_kinds(model, kind=QUANTIZED_KIND.get(mode), quantized_roots=quantized, kept_roots=kept)


def observed_kind(module: nn.Module) -> str:
    if isinstance(module, bnb.nn.Linear4bit):
        return module.weight.quant_state.quant_type
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return KEEP


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def observed_dtype(module: nn.Module, model_dtype: torch.dtype) -> str:
    """A quantized layer's compute dtype (LLM.int8 computes in its input's dtype: the model's); a kept
    module's storage dtype."""
    if isinstance(module, bnb.nn.Linear4bit):
        return _dtype_name(module.compute_dtype)
    if isinstance(module, bnb.nn.Linear8bitLt):
        return _dtype_name(model_dtype)
    return _dtype_name(next(module.parameters(recurse=False)).dtype)


# ---------------------------------------------------------------------------------------- checking
def _diff(actual: dict[str, str], expected: dict[str, str]) -> str:
    wrong = sorted(n for n in set(actual) | set(expected) if actual.get(n) != expected.get(n))
    shown = "; ".join(f"{n}: {actual.get(n, 'missing')} (expected {expected.get(n, 'absent')})" for n in wrong[:8])
    return f"{len(wrong)} modules differ: {shown}" + (" ..." if len(wrong) > 8 else "")


def check_placement(model, family: str, expected: dict[str, str], *, what: str, repro: str) -> None:
    """The plan equals the modules' reality, and both equal the expectation; every entry has a reason;
    the plan round-trips through JSON."""
    plan = model.quantization_plan
    modules = dict(_holders(model))
    reality = {name: observed_kind(module) for name, module in modules.items()}
    checks.check(reality == expected, f"{what}: loaded modules differ from docs/contract.md's placement, "
                 f"{_diff(reality, expected)}", repro=repro)
    checks.check(plan.kinds() == reality, f"{what}: model.quantization_plan differs from the loaded modules, "
                 f"{_diff(plan.kinds(), reality)}", repro=repro)
    checks.check(len(plan.entries) == len(plan.kinds()), f"{what}: the plan lists a module twice", repro=repro)
    for entry in plan.entries:
        checks.check(bool(entry.reason and entry.reason.strip()), f"{what}: plan entry {entry.module} "
                     f"({entry.kind}) has no reason", repro=repro)
        actual_dtype = observed_dtype(modules[entry.module], _model_dtype(model, family))
        checks.check(_dtype_name(entry.dtype) == actual_dtype, f"{what}: plan says {entry.module} is "
                     f"{entry.dtype}, the module is {actual_dtype}", repro=repro)
    again = type(plan).from_json(plan.to_json())
    checks.check(again == plan and again.kinds() == plan.kinds(), f"{what}: the plan does not survive "
                 "to_json/from_json", repro=repro)


def check_4bit_layers(model, *, quant_type: str, double_quant: bool, compute_dtype, what: str, repro: str):
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            checks.check(state.quant_type == quant_type, f"{what}: {name} is {state.quant_type}, "
                         f"expected {quant_type}", repro=repro)
            nested = bool(getattr(state, "nested", False)) and getattr(state, "state2", None) is not None
            checks.check(nested == double_quant, f"{what}: {name} double quantization is {nested}, "
                         f"expected {double_quant}", repro=repro)
            checks.check(module.compute_dtype == compute_dtype, f"{what}: {name} computes in "
                         f"{module.compute_dtype}, expected {compute_dtype}", repro=repro)


def _model_dtype(model, family: str) -> torch.dtype:
    """The dtype the model was loaded in: the input embedding's, which is never quantized or upcast."""
    return model.get_submodule(families.FAMILIES[family].embed_tokens).weight.dtype


def _load(backend, path, device, **kwargs):
    model, _ = backend.FastVisionModel.from_pretrained(str(path), device_map=device, **kwargs)
    return model


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("quantize_vision", [False, True], ids=["vision_kept", "quantize_vision"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", families.params())
def test_default_placement(backend, device, family, mode, quantize_vision):
    kwargs = {**MODES[mode], **({"quantize_vision": True} if quantize_vision else {})}
    repro = checks.call(checks.zoo_path(family), device_map=device, **kwargs)
    with checks.reproducing(repro):
        model = _load(backend, zoo.checkpoint(family), device, **kwargs)
    what = f"{family} {mode}" + (" quantize_vision=True" if quantize_vision else "")
    check_placement(model, family, fastvision_expectation(model, family, mode, quantize_vision), what=what, repro=repro)
    checks.check_equal(model.quantization_plan.source, "fastvision", f"{what}: plan source", repro=repro)
    checks.check_equal(model.quantization_plan.mode, mode, f"{what}: plan mode", repro=repro)
    if mode == "4bit":
        check_4bit_layers(model, quant_type="nf4", double_quant=True, compute_dtype=_model_dtype(model, family),
                          what=what, repro=repro)


def _user_config(family: str, skip_vision: bool) -> BitsAndBytesConfig:
    """A user's own 4-bit config that differs from fastvision's default wherever it can: FP4, no double
    quantization, its own skip list (one MLP of the language model kept; the vision tower quantized
    unless listed), float32 compute."""
    record = families.FAMILIES[family]
    skip = [record.lm_head, f"{record.text_layers}.0.mlp"] + ([record.vision_tower] if skip_vision else [])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                              bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)


@pytest.mark.parametrize("skip_vision", [True, False], ids=["user_skips_vision", "user_quantizes_vision"])
@pytest.mark.parametrize("family", families.params())
def test_user_quantization_config_wins(backend, device, family, skip_vision):
    config = _user_config(family, skip_vision)
    repro = checks.call(checks.zoo_path(family), device_map=device, quantization_config=config)
    with checks.reproducing(repro):
        model = _load(backend, zoo.checkpoint(family), device, quantization_config=config)
    embed = families.FAMILIES[family].embed_tokens
    expected = expected_kinds(model, kind="fp4", quantized_roots=[""],
                              kept_roots=[*config.llm_int8_skip_modules, embed])
    what = f"{family} with a user BitsAndBytesConfig (skip {config.llm_int8_skip_modules})"
    check_placement(model, family, expected, what=what, repro=repro)
    checks.check("user" in model.quantization_plan.source,
                 f"{what}: plan source is {model.quantization_plan.source!r}, not the user's config", repro=repro)
    checks.check_equal(model.quantization_plan.mode, "4bit", f"{what}: plan mode", repro=repro)
    check_4bit_layers(model, quant_type="fp4", double_quant=False, compute_dtype=torch.float32, what=what,
                      repro=repro)


def _saved_4bit(backend, family: str, device: str, folder) -> str:
    model, processor = backend.FastVisionModel.from_pretrained(str(zoo.checkpoint(family)), load_in_4bit=True,
                                                               device_map=device)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("family", families.params())
def test_prequantized_checkpoint_keeps_its_quantization(backend, device, family, tmp_path):
    path = _saved_4bit(backend, family, device, tmp_path / "saved-4bit")
    repro = (f"{checks.call(checks.zoo_path(family), load_in_4bit=True, device_map=device)}[0].save_pretrained(d); "
             f"{checks.call(checks.Raw('d'), load_in_4bit=False, device_map=device)}")
    with checks.reproducing(repro):
        model = _load(backend, path, device, load_in_4bit=False)
    what = f"{family} 4-bit checkpoint reloaded with load_in_4bit=False"
    check_placement(model, family, fastvision_expectation(model, family, "4bit", False), what=what, repro=repro)
    checks.check("checkpoint" in model.quantization_plan.source,
                 f"{what}: plan source is {model.quantization_plan.source!r}, not the checkpoint", repro=repro)
    checks.check_equal(model.quantization_plan.mode, "4bit", f"{what}: plan mode", repro=repro)
    check_4bit_layers(model, quant_type="nf4", double_quant=True, compute_dtype=_model_dtype(model, family),
                      what=what, repro=repro)
