"""Fault: every LoRA projection scales its low-rank path by 1.1 x alpha / r, as a fused LoRA op that
mis-reads its scaling would."""

import reference
from reference import UnslothVisionDataCollator  # noqa: F401 - the backend's collator is the reference's
from tests.broken_backends._numeric_fault import adapter_classes


def get_peft_model(model, *args, **kwargs):
    peft_model = reference.FastVisionModel.get_peft_model(model, *args, **kwargs)
    for module in peft_model.modules():
        for name in getattr(module, "scaling", {}) if hasattr(module, "lora_A") else ():
            module.scaling[name] *= 1.1
    return peft_model


FastBaseModel, FastModel, FastVisionModel = adapter_classes("lora_scaling_off", get_peft_model=get_peft_model)
