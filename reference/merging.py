"""Saving a fine-tune: adapters alone, or merged into 16-bit (or re-quantized 4-bit) weights.

PEFT's `merge_and_unload()` on a 4-bit model adds the LoRA delta to the NF4 weights and quantizes the
sum again; the delta is far below NF4's step, so nearly all of it rounds away (Gemma3 zoo checkpoint: a
6.0e-2 logit change before the merge, 1.9e-3 after). Here the delta (`B @ A * scale`, PEFT's own
`get_delta_weight`) is added in fp32 to 16-bit weights instead: the checkpoint's 16-bit original where it
is local or cached (never downloaded: a save works offline), else the dequantized NF4 weights the adapters
were trained on, with a warning that says so. The result is a plain transformers checkpoint (safetensors,
no quantization_config) with the processor beside it; `"merged_4bit_forced"` quantizes that once more.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

from reference import naming, quantization
from reference.errors import ArgumentValueError, OfflineError
from reference.families import FAMILIES

logger = logging.getLogger("fastvision")
SAVE_METHODS = ("merged_16bit", "lora", "merged_4bit_forced")


def save_pretrained_merged(
    model, save_directory, processor=None, save_method="merged_16bit", *, tokenizer=None, **_unsloth_options
) -> Path:
    """Write the fine-tune to `save_directory` as `save_method` says; returns the directory. `tokenizer=` is
    Unsloth's name for `processor`; Unsloth's hub and GGUF options are accepted and not used."""
    processor = processor if processor is not None else tokenizer
    if processor is None:
        processor = getattr(_base(model), "fastvision_processor", None)
    if save_method == "merged_4bit":
        raise ArgumentValueError(
            "save_method",
            save_method,
            ", ".join(map(repr, SAVE_METHODS)),
            "Merging into 4-bit weights re-quantizes them and loses precision; pass "
            "save_method='merged_4bit_forced' if that is what you want.",
        )
    if save_method not in SAVE_METHODS:
        raise ArgumentValueError("save_method", save_method, ", ".join(map(repr, SAVE_METHODS)))
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    if save_method == "lora":
        model.save_pretrained(out)
    elif save_method == "merged_16bit":
        _merged_16bit(model).save_pretrained(out)
    else:
        _merged_4bit(model, out)
    if processor is not None:
        processor.save_pretrained(out)
    return out


def _is_peft(model) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def _base(model) -> nn.Module:
    return model.get_base_model() if _is_peft(model) else model


def _merged_16bit(model) -> nn.Module:
    """A 16-bit transformers model holding the base weights plus every LoRA delta, on the CPU."""
    base = _base(model)
    merged = _sixteen_bit_base(base)
    if _is_peft(model):
        _add_deltas(model, merged)
    return merged


def _sixteen_bit_base(base: nn.Module) -> nn.Module:
    """The 16-bit weights the model came from: its checkpoint's 16-bit original if at hand, else (a
    pre-quantized checkpoint with no 16-bit sibling cached) its own NF4 weights dequantized."""
    dtype = _dtype(base)
    if base.quantization_plan.mode not in ("4bit", "8bit", "quantized"):
        return _copy_of(base, dtype)
    source = _original_of(base.config._name_or_path)
    if source is not None:
        return AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, device_map="cpu", use_kernels=False)
    warnings.warn(
        f"save_pretrained_merged: the 16-bit original of {base.config._name_or_path} is neither a local "
        "directory nor cached, so the LoRA deltas are merged into the dequantized 4-bit weights the "
        "adapters were trained on (NF4 rounding stays in the merged weights).",
        stacklevel=4,
    )
    return _copy_of(base, dtype)


def _dtype(base: nn.Module) -> torch.dtype:
    """The dtype the model was loaded in (bf16/fp16 on a GPU, fp32 on the CPU): fp32 master weights of a
    full finetune are saved in it too."""
    return getattr(base, "fastvision_dtype", None) or base.get_input_embeddings().weight.dtype


def _original_of(name_or_path: str) -> str | None:
    """A local path to the 16-bit checkpoint behind `name_or_path`, without reaching the network."""
    path = Path(name_or_path)
    if path.is_dir() and not _is_prequantized(path):
        return str(path)
    for candidate in (naming.SIXTEEN_BIT_TWINS.get(name_or_path), name_or_path):
        if candidate is None:
            continue
        try:
            resolved = naming.resolve(candidate, to_4bit_twin=False, hub_kwargs={"local_files_only": True})
        except OfflineError:
            continue
        if not _is_prequantized(resolved.path):
            return str(resolved.path)
    return None


def _is_prequantized(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def _copy_of(base: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A 16-bit copy of `base` built from its config (quantization removed), holding its weights with every
    bitsandbytes layer dequantized."""
    config = base.config.__class__.from_dict(base.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.random.fork_rng(devices=[]):
        copy = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    held = {}  # the base's own name of every tensor -> (module, attribute, tensor)
    for name, module in base.named_modules():
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            held[_base_name(f"{name}.{key}" if name else key)] = (module, key, tensor)
    state, missing = {}, []
    for key in copy.state_dict():
        if key not in held:
            missing.append(key)
            continue
        module, attribute, tensor = held[key]
        value = quantization.dequantized(module, attribute, tensor).detach().cpu()
        state[key] = value.to(dtype) if value.is_floating_point() else value
    copy.load_state_dict(state, strict=False)
    copy.tie_weights()
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied:
        raise RuntimeError(f"merging: the model holds no weight for {sorted(set(missing) - tied)[:3]}")
    return copy


def _base_name(key: str) -> str:
    """The base model's own name of a tensor of a PEFT-wrapped layer (`.base_layer`, `.original_module`)."""
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def _add_deltas(peft_model, merged: nn.Module) -> None:
    """merged.<layer>.weight += B @ A * scale for every LoRA layer; modules_to_save copies replace theirs."""
    import peft

    prefix = "base_model.model."
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                target = merged.get_submodule(name.removeprefix(prefix))
                for adapter in module.active_adapters:
                    delta = module.get_delta_weight(adapter).float().cpu()
                    target.weight += delta.to(target.weight.dtype)
            elif isinstance(module, peft.utils.ModulesToSaveWrapper):
                trained = module.modules_to_save[module.active_adapter]
                merged.get_submodule(name.removeprefix(prefix)).load_state_dict(trained.state_dict())


def _merged_4bit(model, out: Path) -> None:
    """merged_16bit, then quantized to NF4 with fastvision's placement and saved pre-quantized."""
    family = FAMILIES[_base(model).fastvision_family]
    warnings.warn(
        "save_method='merged_4bit_forced': the merged weights are quantized to NF4 again, which rounds "
        "away part of the fine-tune; merged_16bit keeps it all.",
        stacklevel=4,
    )
    with tempfile.TemporaryDirectory(prefix="fastvision-merge-") as staging:
        _merged_16bit(model).save_pretrained(staging)
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_dtype(_base(model)),
            llm_int8_skip_modules=quantization.skip_modules(family, quantize_vision=False),
        )
        quantized = AutoModelForImageTextToText.from_pretrained(staging, quantization_config=config, device_map="cpu",
                                                                use_kernels=False)  # no hub kernels: see loader
        quantized.save_pretrained(out)
