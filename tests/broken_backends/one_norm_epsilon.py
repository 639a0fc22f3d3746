"""Fault: one decoder layer's input norm runs with a wrong epsilon (1e-2 for the checkpoint's 1e-6)."""

from tests.broken_backends._wrap import broken_backend

LAYER = 1


def _wrong_epsilon(model, _processor, _arguments) -> None:
    norm = model.model.language_model.layers[LAYER].input_layernorm
    if hasattr(norm, "variance_epsilon"):
        norm.variance_epsilon = 1e-2
    else:
        norm.eps = 1e-2


FastBaseModel, FastModel, FastVisionModel = broken_backend(after=_wrong_epsilon)
