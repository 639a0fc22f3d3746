"""Fault: one vision block drops the bias of its first MLP linear."""

import torch

from tests.broken_backends._wrap import broken_backend

BLOCK = 1


def _drop_bias(model, _processor, _arguments) -> None:
    from conformance.audit import family_of

    family = family_of(model.config)
    mlp = model.get_submodule(family.vision_layers)[BLOCK].get_submodule(family.vision_blocks[1])
    linear = next(m for m in mlp.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    with torch.no_grad():
        linear.bias.zero_()


FastBaseModel, FastModel, FastVisionModel = broken_backend(after=_drop_bias)
