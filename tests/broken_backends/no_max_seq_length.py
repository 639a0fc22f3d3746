"""Fault: max_seq_length is not stored on the model or its language model."""

from tests.broken_backends._wrap import broken_backend


def _forget(model, _processor, _arguments) -> None:
    inner = getattr(model, "model", None)
    for module in (model, inner, getattr(inner, "language_model", None)):
        if module is not None and "max_seq_length" in vars(module):
            delattr(module, "max_seq_length")


FastBaseModel, FastModel, FastVisionModel = broken_backend(after=_forget)
