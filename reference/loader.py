"""The load pipeline: request -> resolve -> config -> plan -> load -> prepare -> processor.

Both backends run this pipeline; a `Backend` record says which attention key serves the model and
which per-family patches apply. Nothing is left behind after an error: everything that can be checked
is checked before any weight is read, and a failure after the weights are loaded frees them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, BitsAndBytesConfig

from reference import checkpoint, merging, naming, placement, quantization, training
from reference.contract import LoadRequest, mode_of_quantization_config
from reference.errors import (
    ArgumentTypeError,
    ArgumentValueError,
    CheckpointError,
    MissingDependencyError,
    RemoteCodeError,
    UnsupportedCombinationError,
)
from reference.families import FAMILIES, FamilySpec, family_of
from reference.hf_attention import AttentionRegistration
from reference.instance_methods import weakly_bound
from reference.processor import load_processor

logger = logging.getLogger("fastvision")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str  # "reference" or "optimized": set as model.fastvision_backend
    attention: Callable[[LoadRequest], AttentionRegistration]  # the attention serving a request's model
    patch: Callable | None = None  # patch(model, family) -> None, after loading


@dataclasses.dataclass(frozen=True)
class LoadDecision:
    """Everything a load does, decided once by `_prepare` before any weight is read. The later steps read
    it and never derive a setting again from the request."""

    request: LoadRequest
    mode: str  # what the weights become: "4bit", "8bit", "16bit", "full" or "quantized" (another method)
    plan_source: str  # who decides placement: "fastvision", "user quantization_config", "checkpoint ..."
    dtype: torch.dtype
    checkpointing: bool | str  # True, False or "unsloth" (after the < 512 tokens rule)
    hub_kwargs: dict  # revision, cache_dir, local_files_only, subfolder, variant as the user passed them
    model: naming.ResolvedName  # where the weights come from
    processor_source: naming.ResolvedName  # where the processor comes from (tokenizer_name or the model's)
    config: object
    family: FamilySpec
    device_map: object
    quantization_config: object | None  # what transformers is given; None when nothing is quantized here
    expected_plan: quantization.QuantPlan | None  # fastvision's own plan, checked against the loaded modules
    adapter: Path | None = None  # a saved LoRA adapter directory to attach to the base once it is loaded
    notes: tuple[str, ...] = ()  # what the user should know about the decision, carried onto the plan
    placement_notes: tuple[str, ...] = ()  # what placement.decide decided, also on model.device_placement


def load(request: LoadRequest, backend: Backend):
    """Load (model, processor) as `request` says, attention served by `backend`."""
    decision = _prepare(request)
    processor = _load_processor(decision)  # before the weights: a broken processor costs no device memory
    model = _load_weights(decision, backend)
    try:
        _finish(model, decision, backend, processor)
        if decision.adapter is not None:
            from reference import adapters  # imports peft: only for a saved adapter

            model = adapters.attach_saved_adapter(model, decision.adapter)
    except BaseException:
        _release(model)
        raise
    return model, processor


# ---------------------------------------------------------------------------- before the weights
def _prepare(request: LoadRequest) -> LoadDecision:
    requested = request.requested_mode
    hub = request.hub_kwargs()
    model, processor_source, adapter = _resolve_sources(request, requested, hub)
    checkpoint.check_processor_files(processor_source.path)
    config = _read_config(request, model)
    family = _check_config(request, config)
    _check_device_available(request.device_map)
    on_gpu = _on_gpu(request.device_map)
    dtype = request.resolve_dtype(on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    mode, source = _decide_mode(request, requested, config, model)
    skeleton = _skeleton(request, config)
    if source != "checkpoint quantization_config":  # pre-quantized weights are packed: other shapes
        weights = checkpoint.weight_files(_weights_dir(model, hub), variant=hub.get("variant"),
                                          use_safetensors=request.use_safetensors)
        checkpoint.check_against_model(weights, skeleton, model.path)
    expected = None
    if source == "fastvision":
        expected = quantization.expected_plan(skeleton, family, mode, dtype, request.quantize_vision)
    device_map, placed = placement.decide(
        request.device_map, on_gpu=on_gpu, max_memory=request.kwargs.get("max_memory"), skeleton=skeleton,
        family=family, mode=mode, dtype=dtype, plan=expected,
    )
    placement.check_offload(device_map, mode, request.kwargs.get("offload_folder"))
    notes = tuple(dict.fromkeys(n for n in (model.note, processor_source.note, *placed) if n))
    return LoadDecision(
        request=request, mode=mode, plan_source=source, dtype=dtype, checkpointing=request.checkpointing_mode,
        hub_kwargs=hub, model=model, processor_source=processor_source, config=config, family=family,
        device_map=device_map, placement_notes=placed,
        quantization_config=_quantization_config(request, mode, source, family, dtype), expected_plan=expected,
        adapter=adapter, notes=notes,
    )


def _resolve_sources(request: LoadRequest, requested: str, hub: dict):
    """(where the weights come from, where the processor comes from, a saved adapter directory or None).
    Only a load that quantizes to 4-bit itself reads the pre-quantized twin; full finetuning, 8-bit and a
    user's quantization_config read (or map back to) the 16-bit original, whose weights they need. A saved
    adapter's base goes through the same naming; its processor is the one saved beside it, if any."""
    to_twin = requested == "4bit" and request.kwargs.get("quantization_config") is None

    def resolve(name, argument):
        return naming.resolve(name, to_4bit_twin=to_twin, token=request.token, hub_kwargs=hub, argument=argument)

    model = resolve(request.model_name, "model_name")
    adapter = None
    if (model.path / checkpoint.ADAPTER_CONFIG).is_file():
        adapter = model.path
        model = resolve(checkpoint.adapter_base(adapter), f"base_model_name_or_path in {adapter}")
    processor_source = model
    if request.tokenizer_name is not None:
        processor_source = resolve(request.tokenizer_name, "tokenizer_name")
    elif adapter is not None and checkpoint.has_processor_files(adapter):
        processor_source = dataclasses.replace(model, path=adapter, note="")
    return model, processor_source, adapter


def _weights_dir(model: naming.ResolvedName, hub: dict) -> Path:
    return model.path / hub["subfolder"] if hub.get("subfolder") else model.path


def _read_config(request: LoadRequest, model: naming.ResolvedName):
    if request.auto_config is not None:
        return request.auto_config
    raw = checkpoint.read_config(model.path)
    if raw.get("auto_map") and not request.trust_remote_code:
        raise RemoteCodeError(model.name, raw["auto_map"])
    try:
        return AutoConfig.from_pretrained(model.path, token=request.token, trust_remote_code=request.trust_remote_code)
    except (ValueError, KeyError, TypeError, OSError) as error:  # a config transformers cannot build
        raise CheckpointError(
            model.path / "config.json", f"transformers cannot read it ({type(error).__name__}: {error})",
            "Use the config.json that came with the checkpoint.",
        ) from error


def _check_config(request: LoadRequest, config) -> FamilySpec:
    if request.model_types is not None and config.model_type not in request.model_types:
        raise ArgumentValueError(
            "model_types",
            request.model_types,
            f"a list containing {config.model_type!r}",
            f"The checkpoint's model_type is {config.model_type!r}.",
        )
    family = family_of(config)
    _check_fast_inference(request, family)
    return family


def _decide_mode(request: LoadRequest, requested: str, config, model: naming.ResolvedName) -> tuple[str, str]:
    """(mode, who decided placement). A checkpoint that is quantized already wins; full finetuning of one
    is refused, since its packed weights cannot train."""
    quantized = getattr(config, "quantization_config", None)
    if quantized is not None:
        if requested == "full":
            raise ArgumentValueError(
                "full_finetuning", True, "False for a checkpoint that is quantized already",
                f"{model.name} holds {mode_of_quantization_config(quantized)} weights, which cannot be trained "
                "in full; pass its 16-bit original.",
            )
        return mode_of_quantization_config(quantized), "checkpoint quantization_config"
    if request.kwargs.get("quantization_config") is not None and requested != "full":
        return requested, "user quantization_config"
    return requested, "fastvision"


def _skeleton(request: LoadRequest, config):
    """The model the config builds, on the meta device: its structure and weight shapes, no memory."""
    with init_empty_weights(), torch.random.fork_rng(devices=[]):  # the skeleton's init draws: not the caller's RNG
        build = getattr(request.auto_model, "from_config", None) or request.auto_model._from_config
        return build(config)  # auto classes have from_config; model classes _from_config


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


def _quantization_config(request: LoadRequest, mode: str, source: str, family: FamilySpec, dtype: torch.dtype):
    """The config transformers quantizes with: the user's, fastvision's for a 4/8-bit load, else None."""
    if source == "user quantization_config":
        return request.kwargs["quantization_config"]
    if source != "fastvision" or mode not in ("4bit", "8bit"):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"load_in_{mode}=True", "bitsandbytes") from None
    skip = quantization.skip_modules(family, request.quantize_vision)
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
    )


def _load_processor(decision: LoadDecision):
    source = decision.processor_source
    argument = "tokenizer_name" if decision.request.tokenizer_name is not None else "model_name"
    failure = None
    try:
        return load_processor(source.path, token=decision.request.token,
                              trust_remote_code=decision.request.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as error:
        failure = f"{type(error).__name__}: {error}"
    raise CheckpointError(
        source.path, f"its processor files cannot be loaded ({failure})",
        f"Pass {argument}= a folder or hub id that holds the model's tokenizer and preprocessor files.",
    )


# ---------------------------------------------------------------------------- the weights
def _load_weights(decision: LoadDecision, backend: Backend):
    request = decision.request
    kwargs = dict(request.model_kwargs())
    kwargs.update({key: decision.hub_kwargs[key] for key in ("subfolder", "variant") if key in decision.hub_kwargs})
    if decision.quantization_config is not None:
        kwargs["quantization_config"] = decision.quantization_config
    if "use_kernels" not in kwargs and "kernel_config" not in kwargs:
        # transformers 5.25 turns hub kernels on by default where the `kernels` package is installed (it
        # requires that package; 5.17 had them off): at load it maps kernels fetched from the hub onto decorated
        # layers (a network call on a GPU), and every train()/eval() maps them again, which took the optimized
        # backend's fused norms off Llama, Qwen2 and Mistral text layers at for_training. Off unless asked.
        kwargs["use_kernels"] = False
    chosen = request.kwargs.get("attn_implementation")
    registration = None if chosen else backend.attention(request)
    failure = None
    with torch.random.fork_rng(devices=[]), (registration.held() if registration else contextlib.nullcontext()):
        torch.manual_seed(request.random_state)  # seed this load's draws without touching the caller's RNG
        try:
            model = request.auto_model.from_pretrained(
                decision.model.path,
                config=decision.config,
                dtype=decision.dtype,
                device_map=decision.device_map,
                attn_implementation=chosen or registration.key,
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
            ) from None
        except torch.OutOfMemoryError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError, IndexError, AttributeError, AssertionError) as error:
            failure = f"{type(error).__name__}: {error}"  # kept as text: the error's frames hold the half-built model
        else:
            if registration is not None:
                registration.hold(model)  # registered in transformers while this model lives
            return model
    _free_device_memory()
    raise CheckpointError(decision.model.path, f"transformers could not load it ({failure})",
                                     checkpoint.FRESH_DOWNLOAD)


def _rejected_keyword(error: TypeError, kwargs: dict) -> str | None:
    match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    return match.group(1) if match and match.group(1) in kwargs else None


# ---------------------------------------------------------------------------- after the weights
def _finish(model, decision: LoadDecision, backend: Backend, processor) -> None:
    request, family = decision.request, decision.family
    plan = quantization.observed_plan(model, family, decision.mode, decision.plan_source)
    if decision.expected_plan is not None:
        _check_plan(decision.expected_plan, plan)
        plan = decision.expected_plan
    if backend.patch is not None:
        backend.patch(model, family)
    master_fp32 = request.resolve_float32_mixed_precision(decision.dtype)
    training.set_trainable(model, decision.mode == "full", master_fp32)
    training.enable_checkpointing(model, decision.checkpointing)
    if request.offload_embedding:
        training.offload_embedding(model, tied=_embedding_tied(model))
    _set_max_seq_length(model, request.max_seq_length)
    model.quantization_plan = dataclasses.replace(plan, notes=decision.notes)
    model.device_placement = placement.observed(model, family, decision.placement_notes)
    model.fastvision_backend = backend.name
    model.fastvision_family = family.name
    model.fastvision_dtype = decision.dtype
    model.fastvision_processor = processor  # for_training / for_inference set its padding side
    model.save_pretrained_merged = weakly_bound(merging.save_pretrained_merged, model)


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
    _free_device_memory()


def _free_device_memory() -> None:
    gc.collect()  # a half-built model may sit in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
