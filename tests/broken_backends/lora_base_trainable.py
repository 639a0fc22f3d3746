"""Fault: get_peft_model leaves the base model's weights trainable beside the adapters."""

import reference
from reference import UnslothVisionDataCollator  # noqa: F401 - the backend's collator is the reference's
from tests.broken_backends._numeric_fault import adapter_classes


def get_peft_model(model, *args, **kwargs):
    peft_model = reference.FastVisionModel.get_peft_model(model, *args, **kwargs)
    for parameter in peft_model.parameters():
        if parameter.dtype.is_floating_point:
            parameter.requires_grad_(True)
    return peft_model


FastBaseModel, FastModel, FastVisionModel = adapter_classes("lora_base_trainable", get_peft_model=get_peft_model)
