"""Build a backend that is the reference but for one fault."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import reference

SIGNATURE = inspect.signature(reference.FastBaseModel.from_pretrained)


def broken_backend(
    before: Callable[[dict], dict] | None = None,
    after: Callable[[object, object, dict], None] | None = None,
):
    """(FastBaseModel, FastModel, FastVisionModel) whose from_pretrained binds the call to the contract's
    signature, lets `before(arguments)` rewrite the arguments, loads with the reference, then lets
    `after(model, processor, arguments)` alter the result. The signature itself stays the contract's, so
    only the fault differs."""

    def from_pretrained(cls, *args, **kwargs):
        arguments = dict(SIGNATURE.bind(*args, **kwargs).arguments)
        if before is not None:
            arguments = before(arguments)
        extra = arguments.pop("kwargs", {})
        model, processor = reference.FastBaseModel.from_pretrained(**arguments, **extra)
        if after is not None:
            after(model, processor, {**arguments, **extra})
        return model, processor

    from_pretrained.__signature__ = reference.FastBaseModel.from_pretrained.__func__.__signature__
    base = type("FastBaseModel", (), {"from_pretrained": classmethod(from_pretrained)})
    model = type("FastModel", (base,), {})
    vision = type("FastVisionModel", (model,), {})
    return base, model, vision
