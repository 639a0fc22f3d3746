"""Fault: for_inference leaves the processor padding on the right, where generation appends."""

import reference
from reference import UnslothVisionDataCollator  # noqa: F401 - the backend's collator is the reference's
from tests.broken_backends._numeric_fault import adapter_classes


def for_inference(model):
    reference.FastVisionModel.for_inference(model)
    reference.FastVisionModel.for_training(model)  # ... and back to training's padding
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = True
    return model


FastBaseModel, FastModel, FastVisionModel = adapter_classes("inference_right_padding", for_inference=for_inference)
