"""Fault: get_peft_model puts LoRA on the vision tower even with finetune_vision_layers=False."""

import reference
from reference import UnslothVisionDataCollator  # noqa: F401 - the backend's collator is the reference's
from tests.broken_backends._numeric_fault import adapter_classes


def get_peft_model(model, *args, **kwargs):
    kwargs["finetune_vision_layers"] = True
    return reference.FastVisionModel.get_peft_model(model, *args, **kwargs)


FastBaseModel, FastModel, FastVisionModel = adapter_classes("lora_on_vision_anyway", get_peft_model=get_peft_model)
