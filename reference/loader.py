"""The load pipeline: request -> resolve -> config -> plan -> load -> prepare -> processor.

Both backends run this pipeline; a `Backend` record says which attention key serves the model and
which per-family patches apply. Nothing is left behind after an error: everything that can be checked
is checked before any weight is read, and a failure after the weights are loaded frees them.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, BitsAndBytesConfig

from reference import naming, quantization, training
from reference.contract import LoadRequest, mode_of_quantization_config
from reference.errors import (
    ArgumentTypeError,
    ArgumentValueError,
    MissingDependencyError,
    RemoteCodeError,
    UnsupportedCombinationError,
)
from reference.families import FAMILIES, FamilySpec, family_of
from reference.processor import load_processor

logger = logging.getLogger("fastvision")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str  # "reference" or "optimized": set as model.fastvision_backend
    attention_key: Callable[[LoadRequest], str]  # the registered transformers attention key for a request
    patch: Callable | None = None  # patch(model, family) -> None, after loading


@dataclasses.dataclass
class _Prepared:
    """Everything decided before the weights are read."""

    request: LoadRequest
    resolved: naming.ResolvedName
    config: object
    family: FamilySpec
    dtype: torch.dtype
    device_map: object
    quantization_config: object | None
    plan_source: str
    expected_plan: quantization.QuantPlan | None


def load(request: LoadRequest, backend: Backend):
    """Load (model, processor) as `request` says, attention served by `backend`."""
    prepared = _prepare(request)
    model = _load_weights(prepared, backend)
    try:
        _finish(model, prepared, backend)
        processor = load_processor(
            request.tokenizer_name or prepared.resolved.path,
            token=request.token,
            trust_remote_code=request.trust_remote_code,
        )
    except BaseException:
        _release(model)
        raise
    return model, processor


# ---------------------------------------------------------------------------- before the weights
def _prepare(request: LoadRequest) -> _Prepared:
    resolved = naming.resolve(
        request.model_name, load_in_4bit=request.load_in_4bit, token=request.token, hub_kwargs=request.hub_kwargs()
    )
    _check_remote_code(resolved, request)
    config = request.auto_config or AutoConfig.from_pretrained(
        resolved.path, token=request.token, trust_remote_code=request.trust_remote_code
    )
    if request.model_types is not None and config.model_type not in request.model_types:
        raise ArgumentValueError(
            "model_types",
            request.model_types,
            f"a list containing {config.model_type!r}",
            f"The checkpoint's model_type is {config.model_type!r}.",
        )
    family = family_of(config)
    _check_fast_inference(request, family)
    _check_device_available(request.device_map)
    on_gpu = _on_gpu(request.device_map)
    dtype = request.resolve_dtype(on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    quant_config, source = _quantization_config(request, config, family, dtype)
    expected = None
    if source == "fastvision":
        with init_empty_weights(), torch.random.fork_rng(devices=[]):  # the skeleton's init draws: not the caller's RNG
            build = getattr(request.auto_model, "from_config", None) or request.auto_model._from_config
            skeleton = build(config)  # auto classes have from_config; model classes _from_config
        expected = quantization.expected_plan(skeleton, family, request.mode, dtype, request.quantize_vision)
    device_map = request.device_map if on_gpu else "cpu"
    return _Prepared(request, resolved, config, family, dtype, device_map, quant_config, source, expected)


def _check_device_available(device_map) -> None:
    """A device map that names a GPU on a machine without one is an error, not a silent CPU load."""
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    if not torch.cuda.is_available() and any(str(t).startswith("cuda") or isinstance(t, int) for t in targets):
        raise ArgumentValueError(
            "device_map", device_map, "'cpu', 'sequential', 'auto' or 'balanced' on a machine without a CUDA GPU"
        )


def _on_gpu(device_map) -> bool:
    if not torch.cuda.is_available():
        return False
    if isinstance(device_map, dict):
        return any(str(d) not in ("cpu", "disk") for d in device_map.values())
    return str(device_map) not in ("cpu",)


def _check_remote_code(resolved: naming.ResolvedName, request: LoadRequest) -> None:
    config_file = Path(resolved.path) / "config.json"
    if request.trust_remote_code or not config_file.is_file():
        return
    auto_map = json.loads(config_file.read_text()).get("auto_map")
    if auto_map:
        raise RemoteCodeError(resolved.name, auto_map)


def _check_fast_inference(request: LoadRequest, family: FamilySpec) -> None:
    if not request.fast_inference:
        return
    if not family.fast_inference:
        allowed = ", ".join(f.name for f in FAMILIES.values() if f.fast_inference)
        raise ArgumentValueError("fast_inference", True, f"False for {family.name}; True only for {allowed}")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise MissingDependencyError("fast_inference=True", "vllm", "Install it with `pip install vllm`.") from None
    raise UnsupportedCombinationError("fast_inference=True: fastvision does not serve through vLLM yet.")


def _quantization_config(request: LoadRequest, config, family: FamilySpec, dtype: torch.dtype):
    """(config to pass to transformers or None, who decided the placement)."""
    if getattr(config, "quantization_config", None) is not None:
        return None, "checkpoint quantization_config"
    if request.kwargs.get("quantization_config") is not None:
        return request.kwargs["quantization_config"], "user quantization_config"
    if request.mode not in ("4bit", "8bit"):
        return None, "fastvision"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"load_in_{request.mode}=True", "bitsandbytes") from None
    skip = quantization.skip_modules(family, request.quantize_vision)
    if request.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip), "fastvision"
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
    ), "fastvision"


# ---------------------------------------------------------------------------- the weights
def _load_weights(prepared: _Prepared, backend: Backend):
    request = prepared.request
    kwargs = dict(request.model_kwargs())
    for key in ("subfolder", "variant"):
        if key in request.kwargs:
            kwargs[key] = request.kwargs[key]
    if prepared.quantization_config is not None:
        kwargs["quantization_config"] = prepared.quantization_config
    attn = request.kwargs.get("attn_implementation") or backend.attention_key(request)
    with torch.random.fork_rng(devices=[]):  # seed this load's draws without touching the caller's RNG
        torch.manual_seed(request.random_state)
        try:
            return request.auto_model.from_pretrained(
                prepared.resolved.path,
                config=prepared.config,
                dtype=prepared.dtype,
                device_map=prepared.device_map,
                attn_implementation=attn,
                token=request.token,
                trust_remote_code=request.trust_remote_code,
                **kwargs,
            )
        except TypeError as error:
            rejected = _rejected_keyword(error, kwargs)
            if rejected is None:
                raise
            raise ArgumentTypeError(
                rejected,
                kwargs[rejected],
                "a keyword the model class accepts",
                f"{request.auto_model.__name__}.from_pretrained rejected it: {error}",
            ) from error


def _rejected_keyword(error: TypeError, kwargs: dict) -> str | None:
    match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    return match.group(1) if match and match.group(1) in kwargs else None


# ---------------------------------------------------------------------------- after the weights
def _finish(model, prepared: _Prepared, backend: Backend) -> None:
    request, family = prepared.request, prepared.family
    mode = request.mode
    if prepared.plan_source == "checkpoint quantization_config":  # the checkpoint's quantization won
        mode = mode_of_quantization_config(prepared.config.quantization_config)
    plan = quantization.observed_plan(model, family, mode, prepared.plan_source)
    if prepared.expected_plan is not None:
        _check_plan(prepared.expected_plan, plan)
        plan = prepared.expected_plan
    if backend.patch is not None:
        backend.patch(model, family)
    master_fp32 = request.resolve_float32_mixed_precision(prepared.dtype)
    training.set_trainable(model, request.full_finetuning, master_fp32)
    training.enable_checkpointing(model, request.gradient_checkpointing)
    if request.offload_embedding:
        training.offload_embedding(model, tied=_embedding_tied(model))
    _set_max_seq_length(model, request.max_seq_length)
    model.quantization_plan = plan
    model.fastvision_backend = backend.name
    model.fastvision_family = family.name


def _check_plan(expected: quantization.QuantPlan, observed: quantization.QuantPlan) -> None:
    want, got = expected.kinds(), observed.kinds()
    wrong = {name: (want.get(name), got.get(name)) for name in set(want) | set(got) if want.get(name) != got.get(name)}
    if wrong:
        sample = dict(sorted(wrong.items())[:5])
        raise RuntimeError(f"quantization placement differs from the plan in {len(wrong)} modules, e.g. {sample}")


def _embedding_tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _set_max_seq_length(model, max_seq_length: int) -> None:
    model.max_seq_length = max_seq_length
    inner = getattr(model, "model", None)
    for module in (inner, getattr(inner, "language_model", None)):
        if module is not None:
            module.max_seq_length = max_seq_length


def _release(model) -> None:
    """Free a model that failed to finish loading: weights off the device, caches emptied."""
    try:
        model.to("meta")
    except Exception:  # a dispatched or quantized model may refuse; dropping the reference still frees it
        logger.debug("could not move the failed model to meta", exc_info=True)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
