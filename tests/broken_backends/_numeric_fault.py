"""Building blocks of the numeric-fault backends: the reference backend with one thing changed.

An attention fault registers a modified op under its own key through `reference.hf_attention.register`
(both interfaces, as a real backend does) and serves every model through it; a placement fault changes
what the reference loader decides. Each module in this package exposes the contract's three classes as
subclasses of the reference's, so `--backend tests.broken_backends.<name>` loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses

import reference
from reference import api, hf_attention, quantization


def attention_classes(name: str, op, mask_builder=hf_attention.build_mask_spec) -> tuple[type, type, type]:
    """FastBaseModel, FastModel, FastVisionModel whose attention is `op(q, k, v, spec)` under a new key, its
    masks built by `mask_builder`."""
    registration = hf_attention.register(f"fastvision_broken_{name}", op, mask_builder)
    backend = dataclasses.replace(api.REFERENCE, name=f"broken:{name}", attention=lambda request: registration)
    return _classes(backend)


def load_classes(name: str, wrap) -> tuple[type, type, type]:
    """The three classes with `from_pretrained` running inside `wrap(kwargs)`, a context manager factory
    that may change the kwargs (returned by its __enter__) or the reference loader's decisions."""
    backend = dataclasses.replace(api.REFERENCE, name=f"broken:{name}")
    return _classes(backend, wrap)


def _classes(backend, wrap=None) -> tuple[type, type, type]:
    """(FastBaseModel, FastModel, FastVisionModel): subclasses of the reference's with `backend`."""

    def from_pretrained(cls, *args, **kwargs):
        with wrap(kwargs) as changed:
            return reference.FastBaseModel.from_pretrained.__func__(cls, *args, **changed)

    body = {"backend": backend, "__module__": __name__}
    if wrap is not None:
        body["from_pretrained"] = classmethod(from_pretrained)
    base = type("FastBaseModel", (reference.FastBaseModel,), body)
    # The contract's hierarchy (FastVisionModel < FastModel < FastBaseModel), each also the reference's own.
    model = type("FastModel", (base, reference.FastModel), {"__module__": __name__})
    vision = type("FastVisionModel", (model, reference.FastVisionModel), {"__module__": __name__})
    return base, model, vision


@contextlib.contextmanager
def lm_head_in_the_language_model(kwargs):
    """The reference loader, told that lm_head belongs to the language model: its plan and its
    bitsandbytes skip list both quantize lm_head, so plan and modules agree with each other."""
    part_of, skip_modules = quantization.part_of, quantization.skip_modules

    def moved_part_of(name, family):
        return "language model" if name == family.lm_head else part_of(name, family)

    def moved_skip_modules(family, quantize_vision):
        return [root for root in skip_modules(family, quantize_vision) if root != family.lm_head]

    quantization.part_of, quantization.skip_modules = moved_part_of, moved_skip_modules
    try:
        yield kwargs
    finally:
        quantization.part_of, quantization.skip_modules = part_of, skip_modules


@contextlib.contextmanager
def vision_quantized_by_default(kwargs):
    """Unsloth's behaviour: the vision tower is quantized unless the user says otherwise."""
    yield {"quantize_vision": True, **kwargs}



def swapped(module, attribute: str, make):
    """A `wrap` for load_classes: `module.attribute` is `make(original)` for the duration of each load."""

    @contextlib.contextmanager
    def wrap(kwargs):
        original = getattr(module, attribute)
        setattr(module, attribute, make(original))
        try:
            yield kwargs
        finally:
            setattr(module, attribute, original)

    return wrap


def adapter_classes(name: str, **methods) -> tuple[type, type, type]:
    """The three classes with some of get_peft_model / for_training / for_inference replaced."""
    base, model, vision = _classes(dataclasses.replace(api.REFERENCE, name=f"broken:{name}"))
    for method, function in methods.items():
        setattr(base, method, staticmethod(function))
    return base, model, vision
