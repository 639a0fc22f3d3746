"""After loading: LoRA adapters over PEFT, and switching a model between training and generation.

`get_peft_model` has Unsloth's signature and defaults; the adapters are PEFT's own (`LoraConfig`,
`peft.get_peft_model`), placed on exactly the modules of the LoRA plan (`reference.lora`), seeded by
`random_state`, trained in fp32 with every other parameter frozen. `for_training` and `for_inference` flip
train/eval, gradient checkpointing, `use_cache` and the processor's padding side through the model's own
attributes: no environment variables, no global state, harmless when repeated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import warnings

import peft
import torch
from torch import nn

from reference import lora, merging, training
from reference.contract import checkpointing_mode
from reference.errors import ArgumentTypeError, ArgumentValueError, UnsupportedCombinationError
from reference.families import FAMILIES
from reference.instance_methods import weakly_bound

BIASES = ("none", "all", "lora_only")
INIT_LORA_WEIGHTS = (True, False, "gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal")
# LoraConfig fields get_peft_model sets itself; any other LoraConfig field may pass through **kwargs.
_OWN_FIELDS = {
    "r",
    "target_modules",
    "lora_alpha",
    "lora_dropout",
    "bias",
    "use_rslora",
    "modules_to_save",
    "init_lora_weights",
    "loftq_config",
    "task_type",
    "ensure_weight_tying",
    "layers_to_transform",
    "layers_pattern",
}


@dataclasses.dataclass(frozen=True)
class LoraRequest:
    """One get_peft_model call, validated."""

    r: int
    lora_alpha: float
    lora_dropout: float
    bias: str
    selection: lora.Selection
    use_gradient_checkpointing: bool | str
    random_state: int
    use_rslora: bool
    modules_to_save: list | None
    init_lora_weights: object
    loftq_config: object
    task_type: peft.TaskType
    extra: dict  # further LoraConfig fields (use_dora, rank_pattern, ...)


def get_peft_model(model, **arguments):
    """Attach LoRA adapters as `arguments` (get_peft_model's, defaults filled in) say; returns the PEFT model."""
    if _is_peft(model):
        raise ArgumentValueError(
            "model",
            type(model).__name__,
            "a model without adapters",
            "It has adapters already; load the base model again to start over.",
        )
    if getattr(getattr(model, "quantization_plan", None), "mode", None) == "full":
        warnings.warn(
            "get_peft_model has no effect on a model loaded with full_finetuning=True: every parameter "
            "trains already; it is returned unchanged.",
            stacklevel=3,
        )
        return model
    request = _validate(model, arguments)
    family = FAMILIES[model.fastvision_family]
    plan = lora.plan_targets(model, family, request.selection, request.r, request.lora_alpha)
    config = peft.LoraConfig(
        r=request.r,
        lora_alpha=request.lora_alpha,
        lora_dropout=request.lora_dropout,
        bias=request.bias,
        target_modules=plan.targets(),
        use_rslora=request.use_rslora,
        modules_to_save=request.modules_to_save,
        init_lora_weights=request.init_lora_weights,
        loftq_config=request.loftq_config or {},
        task_type=request.task_type,
        **request.extra,
    )
    with _seeded(request.random_state, model):
        peft_model = peft.get_peft_model(model, config)
    mode = checkpointing_mode(request.use_gradient_checkpointing, getattr(model, "max_seq_length", 2048))
    training.enable_checkpointing(model, mode)
    model.fastvision_checkpointing = mode
    return _ready(peft_model, plan)


def attach_saved_adapter(model, adapter_dir):
    """`model` with the PEFT adapter saved in `adapter_dir`, trainable as after get_peft_model."""
    peft_model = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    config = peft_model.peft_config[peft_model.active_adapter]
    return _ready(peft_model, lora.plan_of(peft_model, config.r, config.lora_alpha))


def _ready(peft_model, plan: lora.LoraPlan):
    """Adapters in fp32, the base frozen, the plan and the merged save attached."""
    _train_only_adapters(peft_model)
    adapter_weights = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    peft_model.register_forward_pre_hook(functools.partial(_adapters_in_fp32, adapter_weights))
    _buffers_not_broadcast(peft_model)
    peft_model.lora_plan = plan
    peft_model.save_pretrained_merged = weakly_bound(merging.save_pretrained_merged, peft_model)
    on_adapters = getattr(peft_model.get_base_model(), "fastvision_on_adapters", None)
    if on_adapters is not None:  # a backend's own LoRA layers (the optimized one fuses each projection)
        on_adapters(peft_model)
    return peft_model


def _buffers_not_broadcast(peft_model) -> None:
    """DDP leaves these buffers alone (torch's own ignore list, read when a Trainer or accelerate wraps the
    model). With broadcast_buffers=True, its default, DDP sends rank 0's buffers to every rank before every
    forward. A VLM's buffers are tables computed from the config at load (the rotary inv_freq and
    original_inv_freq, 2 per rotary module: 4 in Qwen2-VL), the same on every rank, never running
    statistics, so the broadcast would be one collective per buffer per step for nothing."""
    names = [name for name, _ in peft_model.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(peft_model, names)


def _adapters_in_fp32(adapter_weights: list, _model, _args) -> None:
    """TRL's SFTTrainer casts the adapters of a 4-bit model to bf16 in its constructor (following the QLoRA
    paper); fastvision trains them in fp32 (docs/contract.md), so the first forward after such a cast, before
    any optimizer state exists, casts them back, and says so once."""
    dtypes = {p.dtype for p in adapter_weights} - {torch.float32}
    if training.adapters_to_fp32(adapter_weights):
        _say_once(
            f"fastvision: LoRA weights had been cast to {dtypes.pop()} (TRL's SFTTrainer does this for 4-bit "
            "models); they train in float32."
        )


@contextlib.contextmanager
def _seeded(seed: int, model):
    """torch's RNG seeded with `seed` inside, the caller's RNG state (CPU and the model's GPU) untouched."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@functools.cache
def _say_once(message: str) -> None:
    warnings.warn(message, stacklevel=2)


def _is_peft(model) -> bool:
    return isinstance(model, peft.PeftModel) or bool(getattr(model, "peft_config", None))


def _train_only_adapters(peft_model) -> None:
    """LoRA weights (and what PEFT marked trainable: modules_to_save copies, biases) train, in fp32; the
    base stays frozen."""
    for name, parameter in peft_model.named_parameters():
        adapter = "lora_" in name or "modules_to_save" in name
        if adapter and parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
        if not adapter and parameter.requires_grad and not name.endswith(".bias"):
            parameter.requires_grad_(False)


# ------------------------------------------------------------------------------------------ validation
def _validate(model, arguments: dict) -> LoraRequest:
    a = {**lora.GET_PEFT_MODEL_DEFAULTS, **arguments}
    extra = {k: v for k, v in a.items() if k not in lora.GET_PEFT_MODEL_DEFAULTS}
    _check_numbers(a)
    _check_choices(model, a)
    for name in ("qat_scheme", "target_parameters"):
        if a[name] is not None:
            raise UnsupportedCombinationError(f"{name}={a[name]!r}: fastvision does not implement it; accepted: None.")
    if a["finetune_audio_layers"]:
        raise ArgumentValueError("finetune_audio_layers", True, "False", "Vision-language models have no audio tower.")
    config_fields = set(inspect.signature(peft.LoraConfig).parameters) - _OWN_FIELDS
    for name in extra:
        if name not in config_fields:
            raise ArgumentTypeError(
                name,
                extra[name],
                "a get_peft_model argument or a peft.LoraConfig field",
                "get_peft_model() got an unexpected keyword argument.",
            )
    target = a["target_modules"]
    every_flag = target == "all-linear"
    flags = [every_flag or a[flag] for flag in lora.FLAGS]
    return LoraRequest(
        r=a["r"],
        lora_alpha=a["lora_alpha"],
        lora_dropout=float(a["lora_dropout"]),
        bias=a["bias"],
        selection=lora.Selection(
            *flags,
            last_n_layers=a["finetune_last_n_layers"],
            layers=_layers(a),
            explicit=None if target in (None, "all-linear") else target,
        ),
        use_gradient_checkpointing=a["use_gradient_checkpointing"],
        random_state=a["random_state"],
        use_rslora=a["use_rslora"],
        modules_to_save=a["modules_to_save"],
        init_lora_weights=a["init_lora_weights"],
        loftq_config=a["loftq_config"],
        task_type=peft.TaskType(a["task_type"]),
        extra=extra,
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(a: dict) -> None:
    if not _is_int(a["r"]):
        raise ArgumentTypeError("r", a["r"], "an int >= 1")
    if a["r"] < 1:
        raise ArgumentValueError("r", a["r"], "an int >= 1")
    if not _is_number(a["lora_alpha"]) or not a["lora_alpha"] > 0:
        raise ArgumentValueError("lora_alpha", a["lora_alpha"], "a number > 0")
    if not _is_number(a["lora_dropout"]) or not 0 <= a["lora_dropout"] < 1:
        raise ArgumentValueError("lora_dropout", a["lora_dropout"], "a number in [0, 1)")
    if not _is_int(a["random_state"]):
        raise ArgumentTypeError("random_state", a["random_state"], "an int")
    last_n = a["finetune_last_n_layers"]
    if last_n is not None and (not _is_int(last_n) or last_n < 1):
        raise ArgumentValueError("finetune_last_n_layers", last_n, "None or an int >= 1")


def _check_choices(model, a: dict) -> None:
    if a["bias"] not in BIASES:
        raise ArgumentValueError("bias", a["bias"], ", ".join(map(repr, BIASES)))
    checkpointing = a["use_gradient_checkpointing"]
    if not (checkpointing is True or checkpointing is False or checkpointing == "unsloth"):
        raise ArgumentValueError("use_gradient_checkpointing", checkpointing, "True, False or 'unsloth'")
    if a["task_type"] not in list(peft.TaskType) and a["task_type"] not in [t.value for t in peft.TaskType]:
        raise ArgumentValueError("task_type", a["task_type"], ", ".join(t.value for t in peft.TaskType))
    init = a["init_lora_weights"]
    if not (isinstance(init, bool) or init in INIT_LORA_WEIGHTS):
        raise ArgumentValueError("init_lora_weights", init, ", ".join(map(repr, INIT_LORA_WEIGHTS)))
    if init == "loftq" and model.quantization_plan.mode in ("4bit", "8bit", "quantized"):
        why = "LoftQ initialises from the 16-bit weights: load with load_in_4bit=False."
        raise ArgumentValueError("init_lora_weights", init, "not 'loftq' on a quantized model", why)
    target = a["target_modules"]
    if (
        target is not None
        and not isinstance(target, str)
        and not (isinstance(target, (list, tuple, set)) and all(isinstance(t, str) for t in target))
    ):
        raise ArgumentTypeError("target_modules", target, "None, 'all-linear', a regex, or a list of module names")
    modules_to_save = a["modules_to_save"]
    if modules_to_save is not None and not (
        isinstance(modules_to_save, (list, tuple)) and all(isinstance(m, str) for m in modules_to_save)
    ):
        raise ArgumentTypeError("modules_to_save", modules_to_save, "None or a list of module names")


def _layers(a: dict) -> tuple[int, ...] | None:
    layers = a["layers_to_transform"]
    if layers is None:
        return None
    if _is_int(layers):
        return (layers,)
    if isinstance(layers, (list, tuple, range)) and all(_is_int(i) for i in layers):
        return tuple(layers)
    raise ArgumentTypeError("layers_to_transform", layers, "None, an int or a list of layer indices")


# --------------------------------------------------------------------------- training and generation
def _base(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            "model",
            type(model).__name__,
            "the model from_pretrained returned",
            "This looks like a tokenizer or processor, not the model.",
        )
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def for_training(model, use_gradient_checkpointing=True):
    """Train mode; gradient checkpointing on (True: the model's own mode, e.g. "unsloth" as loaded; "unsloth";
    False: off); use_cache off; the processor pads on the right. Returns the model."""
    base = _base(model)
    if not (
        use_gradient_checkpointing is True
        or use_gradient_checkpointing is False
        or use_gradient_checkpointing == "unsloth"
    ):
        raise ArgumentValueError("use_gradient_checkpointing", use_gradient_checkpointing, "True, False or 'unsloth'")
    mode = use_gradient_checkpointing
    if mode is True:
        mode = getattr(base, "fastvision_checkpointing", True) or True
    model.train()
    training.disable_checkpointing(base)
    training.enable_checkpointing(base, mode)
    _set_padding_side(base, "right")
    return model


def for_inference(model):
    """Eval mode, gradient checkpointing off, use_cache on, the processor pads on the left (generation
    appends on the right). Returns the model."""
    base = _base(model)
    model.eval()
    training.disable_checkpointing(base)
    _set_padding_side(base, "left")
    return model


def _set_padding_side(model, side: str) -> None:
    processor = getattr(model, "fastvision_processor", None)
    if processor is None:
        return
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = side
    if hasattr(processor, "padding_side") or processor is not tokenizer:
        processor.padding_side = side
