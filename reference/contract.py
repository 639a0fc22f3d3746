"""The `from_pretrained` contract: every argument, its default, its validation and its errors.

This is the one home of the signature (documented in docs/contract.md). `LoadRequest` is built once from a
call and validated there; both backends load from it, so they can differ in ops but never in argument
semantics. Every rejection names the argument, the value given and the values accepted.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from typing import Any

import torch
import transformers

from reference.errors import (
    ArgumentTypeError,
    ArgumentValueError,
    ConflictingArgumentsError,
    UnsupportedCombinationError,
)

# Unsloth's default is AutoModelForVision2Seq; transformers 5 removed it for AutoModelForImageTextToText.
DEFAULT_AUTO_MODEL = getattr(transformers, "AutoModelForVision2Seq", transformers.AutoModelForImageTextToText)

DTYPES = {torch.float16: torch.float16, torch.bfloat16: torch.bfloat16, torch.float32: torch.float32}
DTYPE_NAMES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}
DEVICE_MAP_NAMES = ("sequential", "auto", "balanced", "balanced_low_0", "cpu")
# Below this many tokens the CPU round trip of "unsloth" checkpointing costs more than the memory it
# saves (Unsloth's rule, unsloth/models/_utils.py): it becomes plain checkpointing.
OFFLOAD_MIN_SEQ_LENGTH = 512
# Keyword arguments fastvision reads itself; everything else goes to the model class's from_pretrained.
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "subfolder", "variant")


@dataclasses.dataclass(frozen=True)
class LoadRequest:
    """One `from_pretrained` call, validated. Field order and defaults are the contract's signature."""

    model_name: str | os.PathLike = "unsloth/Llama-3.2-1B-Instruct"
    max_seq_length: int = 2048
    dtype: Any = None
    load_in_4bit: bool = True
    load_in_8bit: bool = False
    load_in_16bit: bool = False
    full_finetuning: bool = False
    token: str | None = dataclasses.field(default=None, repr=False)  # never printed, never stored
    device_map: Any = "sequential"
    trust_remote_code: bool = False
    model_types: list[str] | None = None
    tokenizer_name: str | os.PathLike | None = None
    auto_model: Any = DEFAULT_AUTO_MODEL
    use_gradient_checkpointing: bool | str = "unsloth"
    supports_sdpa: bool = True
    whisper_language: str | None = None
    whisper_task: str | None = None
    auto_config: Any = None
    offload_embedding: bool = False
    float32_mixed_precision: bool | None = None
    fast_inference: bool = False
    gpu_memory_utilization: float = 0.5
    float8_kv_cache: bool = False
    random_state: int = 3407
    max_lora_rank: int = 64
    disable_log_stats: bool = False
    unsloth_vllm_standby: bool = False
    kwargs: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def signature(cls) -> inspect.Signature:
        """The public signature: every field but `kwargs` as a keyword-or-positional, then **kwargs."""
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        params = [
            inspect.Parameter(f.name, kind, default=f.default) for f in dataclasses.fields(cls) if f.name != "kwargs"
        ]
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
        return inspect.Signature(params)

    @classmethod
    def from_call(cls, *args, **kwargs) -> LoadRequest:
        """Bind a call's arguments to the signature and validate them; raises on the first fault."""
        bound = cls.signature().bind(*args, **kwargs)
        values = dict(bound.arguments)
        extra = values.pop("kwargs", {})
        request = cls(**values, kwargs=dict(extra))
        request.validate()
        return request

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        _check_types(self)
        _check_values(self)
        _check_combinations(self)

    # ------------------------------------------------------------------ derived settings
    @property
    def requested_mode(self) -> str:
        """What the arguments ask the weights to become: "4bit", "8bit", "16bit" or "full" (full finetuning
        clears 4-bit and 8-bit, with a warning). Read once, by the loader's decision, which may still find
        a checkpoint that is quantized already."""
        if self.full_finetuning:
            return "full"
        if self.kwargs.get("quantization_config") is not None:
            return mode_of_quantization_config(self.kwargs["quantization_config"])
        if self.load_in_4bit:
            return "4bit"
        if self.load_in_8bit:
            return "8bit"
        return "16bit"

    @property
    def checkpointing_mode(self) -> bool | str:
        """True, False or "unsloth"; "unsloth" is plain True under 512 tokens."""
        return checkpointing_mode(self.use_gradient_checkpointing, self.max_seq_length)

    @property
    def quantize_vision(self) -> bool:
        return bool(self.kwargs.get("quantize_vision", False))

    @property
    def use_safetensors(self) -> bool | None:
        """transformers' keyword: False lets a pickled checkpoint load (through torch's weights_only loader)."""
        return self.kwargs.get("use_safetensors")

    def hub_kwargs(self) -> dict:
        return {k: self.kwargs[k] for k in HUB_KWARGS if k in self.kwargs}

    def model_kwargs(self) -> dict:
        """Keyword arguments for the model class's from_pretrained, beyond the ones fastvision sets."""
        own = {"quantization_config", "attn_implementation", "quantize_vision", *HUB_KWARGS}
        return {k: v for k, v in self.kwargs.items() if k not in own}

    def resolve_dtype(self, on_gpu: bool, gpu_has_bf16: bool) -> torch.dtype:
        """None: bf16 on a GPU that has it, fp16 on other GPUs, fp32 on the CPU. bf16 asked where the GPU
        lacks it: a warning, then fp16."""
        if self.dtype is None:
            user_quant = self.kwargs.get("quantization_config")
            compute = getattr(user_quant, "bnb_4bit_compute_dtype", None) if user_quant is not None else None
            if isinstance(compute, torch.dtype) and (not on_gpu or compute != torch.float32):
                return compute
            if not on_gpu:
                return torch.float32
            return torch.bfloat16 if gpu_has_bf16 else torch.float16
        dtype = DTYPE_NAMES[self.dtype] if isinstance(self.dtype, str) else self.dtype
        if dtype == torch.bfloat16 and on_gpu and not gpu_has_bf16:
            warnings.warn("dtype=bfloat16 was asked but this GPU has no bf16 support; using float16.", stacklevel=5)
            return torch.float16
        return dtype

    def resolve_float32_mixed_precision(self, dtype: torch.dtype) -> bool:
        """None means True, except bf16 full finetuning, which trains the bf16 weights themselves."""
        if self.float32_mixed_precision is not None:
            return self.float32_mixed_precision
        return not (self.full_finetuning and dtype == torch.bfloat16)


def checkpointing_mode(asked: bool | str, max_seq_length: int) -> bool | str:
    """The checkpointing a use_gradient_checkpointing value gives: "unsloth" is plain True below
    OFFLOAD_MIN_SEQ_LENGTH tokens."""
    if asked == "unsloth" and max_seq_length < OFFLOAD_MIN_SEQ_LENGTH:
        return True
    return asked


def mode_of_quantization_config(config) -> str:
    as_dict = config if isinstance(config, dict) else config.to_dict()
    if as_dict.get("load_in_4bit"):
        return "4bit"
    if as_dict.get("load_in_8bit"):
        return "8bit"
    return "quantized"  # another method (e.g. GPTQ, AWQ): transformers applies it as given


def _is_bool(value) -> bool:
    return isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(request: LoadRequest, name: str, ok: bool, accepted: str) -> None:
    if not ok:
        raise ArgumentTypeError(name, getattr(request, name), accepted)


_BOOL_ARGUMENTS = (
    "load_in_4bit",
    "load_in_8bit",
    "load_in_16bit",
    "full_finetuning",
    "trust_remote_code",
    "supports_sdpa",
    "offload_embedding",
    "fast_inference",
    "float8_kv_cache",
    "disable_log_stats",
    "unsloth_vllm_standby",
)


def _check_types(r: LoadRequest) -> None:
    for name in _BOOL_ARGUMENTS:
        _expect(r, name, _is_bool(getattr(r, name)), "True or False")
    _expect(r, "model_name", isinstance(r.model_name, (str, os.PathLike)), "a local directory or a hub id 'owner/name'")
    _expect(r, "max_seq_length", _is_int(r.max_seq_length), "an int >= 1")
    _expect(r, "token", r.token is None or isinstance(r.token, str), "None or a str")
    _expect(
        r,
        "float32_mixed_precision",
        r.float32_mixed_precision is None or _is_bool(r.float32_mixed_precision),
        "None, True or False",
    )
    _expect(r, "random_state", _is_int(r.random_state), "an int")
    _expect(r, "max_lora_rank", _is_int(r.max_lora_rank), "an int >= 1")
    _expect(
        r,
        "gpu_memory_utilization",
        isinstance(r.gpu_memory_utilization, (int, float)) and not _is_bool(r.gpu_memory_utilization),
        "a number in (0, 1]",
    )
    _expect(
        r,
        "tokenizer_name",
        r.tokenizer_name is None or isinstance(r.tokenizer_name, (str, os.PathLike)),
        "None, a local directory or a hub id",
    )
    _expect(
        r,
        "model_types",
        r.model_types is None
        or (isinstance(r.model_types, (list, tuple)) and all(isinstance(t, str) for t in r.model_types)),
        "None or a list of model_type strings",
    )
    _expect(
        r,
        "auto_model",
        inspect.isclass(r.auto_model) and hasattr(r.auto_model, "from_pretrained"),
        "a transformers auto class or model class",
    )
    _expect(
        r,
        "auto_config",
        r.auto_config is None or isinstance(r.auto_config, transformers.PretrainedConfig),
        "None or a transformers PretrainedConfig",
    )
    _expect(r, "use_safetensors", r.use_safetensors is None or _is_bool(r.use_safetensors), "None, True or False")
    _check_dtype_type(r.dtype)
    _check_device_map_type(r.device_map)


def _check_dtype_type(dtype) -> None:
    accepted = "None, torch.float16, torch.bfloat16, torch.float32, or " + ", ".join(repr(n) for n in DTYPE_NAMES)
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES):
        return
    if isinstance(dtype, str):
        if dtype in DTYPE_NAMES:
            return
        raise ArgumentValueError("dtype", dtype, accepted)
    if isinstance(dtype, torch.dtype):
        raise ArgumentValueError("dtype", dtype, accepted)
    raise ArgumentTypeError("dtype", dtype, accepted)


def _check_device_map_type(device_map) -> None:
    accepted = f"{', '.join(map(repr, DEVICE_MAP_NAMES))}, a device string such as 'cuda:0', a torch.device or a dict"
    if isinstance(device_map, (dict, torch.device)):
        return
    if isinstance(device_map, str):
        if device_map in DEVICE_MAP_NAMES:
            return
        try:
            torch.device(device_map)
            return
        except (RuntimeError, ValueError):
            raise ArgumentValueError("device_map", device_map, accepted) from None
    raise ArgumentTypeError("device_map", device_map, accepted)


def _check_values(r: LoadRequest) -> None:
    if r.max_seq_length < 1:
        raise ArgumentValueError("max_seq_length", r.max_seq_length, "an int >= 1")
    if r.max_lora_rank < 1:
        raise ArgumentValueError("max_lora_rank", r.max_lora_rank, "an int >= 1")
    if not 0 < r.gpu_memory_utilization <= 1:
        raise ArgumentValueError("gpu_memory_utilization", r.gpu_memory_utilization, "a number in (0, 1]")
    checkpointing = r.use_gradient_checkpointing
    if not (checkpointing is True or checkpointing is False or checkpointing == "unsloth"):
        raise ArgumentValueError("use_gradient_checkpointing", r.use_gradient_checkpointing, "True, False or 'unsloth'")
    for name in ("whisper_language", "whisper_task"):
        if getattr(r, name) is not None:
            raise ArgumentValueError(name, getattr(r, name), "None", "It applies to Whisper models only, not to VLMs.")
    if r.model_types is not None and len(r.model_types) == 0:
        raise ArgumentValueError("model_types", r.model_types, "None or a non-empty list of model_type strings")


def _check_combinations(r: LoadRequest) -> None:
    chosen = [n for n in ("load_in_4bit", "load_in_8bit", "load_in_16bit") if getattr(r, n)]
    if len(chosen) > 1:
        raise ConflictingArgumentsError(
            tuple(chosen),
            f"only one of load_in_4bit, load_in_8bit, load_in_16bit may be True; got {' and '.join(chosen)} = True.",
        )
    if r.full_finetuning and (r.load_in_4bit or r.load_in_8bit):
        warnings.warn(
            f"full_finetuning=True clears {' and '.join(chosen)}: every parameter is trained in 16/32-bit.",
            stacklevel=5,
        )
    if r.fast_inference and r.full_finetuning:
        raise UnsupportedCombinationError(
            "fast_inference=True with full_finetuning=True is not supported; accepted: fast_inference with LoRA "
            "(full_finetuning=False) only."
        )
