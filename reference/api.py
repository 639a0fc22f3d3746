"""`FastBaseModel`, `FastModel`, `FastVisionModel`: Unsloth's entry points, over fastvision's pipeline.

`FastVisionModel` is a thin subclass of `FastModel`, which inherits `FastBaseModel.from_pretrained`;
a backend is chosen by the `backend` class attribute, so `optimized` only overrides that.
"""

from __future__ import annotations

import inspect

from reference import lora
from reference.contract import LoadRequest
from reference.hf_attention import register
from reference.loader import Backend, load
from reference.ops import attention as reference_attention

# Registered in transformers only while a model served by them is alive (reference.shared_state).
SDPA = register("fastvision_reference", reference_attention.attention)
MATMUL = register(
    "fastvision_reference_matmul", lambda q, k, v, spec: reference_attention.attention(q, k, v, spec, use_sdpa=False)
)

REFERENCE = Backend(name="reference", attention=lambda request: SDPA if request.supports_sdpa else MATMUL)


class FastBaseModel:
    backend: Backend = REFERENCE

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load (model, processor) for fine-tuning.

        Every argument, its default, what it does and the error for each value it refuses: docs/contract.md
        in the fastvision repository (the conformance suite keeps it true)."""
        return load(LoadRequest.from_call(*args, **kwargs), cls.backend)

    @staticmethod
    def get_peft_model(model, *args, **kwargs):
        """Attach LoRA adapters (PEFT) to a loaded model; returns the PEFT model. Unsloth's signature and
        defaults; docs/contract.md, "After loading", says what each argument does."""
        from reference import adapters  # imports peft: only when adapters are asked for

        bound = GET_PEFT_MODEL_SIGNATURE.bind(model, *args, **kwargs)
        arguments = dict(bound.arguments)
        return adapters.get_peft_model(arguments.pop("model"), **arguments.pop("kwargs", {}), **arguments)

    @staticmethod
    def for_training(model, use_gradient_checkpointing=True):
        """Train mode, gradient checkpointing on, use_cache off, the processor padding on the right."""
        from reference import adapters

        return adapters.for_training(model, use_gradient_checkpointing)

    @staticmethod
    def for_inference(model):
        """Eval mode, gradient checkpointing off, use_cache on, the processor padding on the left."""
        from reference import adapters

        return adapters.for_inference(model)


def _peft_signature() -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("model", kind)]
    params += [inspect.Parameter(name, kind, default=value) for name, value in lora.GET_PEFT_MODEL_DEFAULTS.items()]
    return inspect.Signature([*params, inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])


GET_PEFT_MODEL_SIGNATURE = _peft_signature()
FastBaseModel.get_peft_model.__signature__ = GET_PEFT_MODEL_SIGNATURE


def _with_cls(signature: inspect.Signature) -> inspect.Signature:
    cls_param = inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return signature.replace(parameters=[cls_param, *signature.parameters.values()])


FastBaseModel.from_pretrained.__func__.__signature__ = _with_cls(LoadRequest.signature())


class FastModel(FastBaseModel):
    """Unsloth's general entry point; for vision-language models it is `FastBaseModel` itself."""


class FastVisionModel(FastModel):
    """The entry point for vision-language models."""
