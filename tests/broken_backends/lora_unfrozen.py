"""Fault: in LoRA mode (full_finetuning=False) the base weights are left trainable."""

from tests.broken_backends._wrap import broken_backend


def _unfreeze(model, _processor, arguments) -> None:
    if not arguments.get("full_finetuning", False):
        for parameter in model.parameters():
            if parameter.dtype.is_floating_point:
                parameter.requires_grad_(True)


FastBaseModel, FastModel, FastVisionModel = broken_backend(after=_unfreeze)
