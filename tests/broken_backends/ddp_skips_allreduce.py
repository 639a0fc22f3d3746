"""Fault: under DDP the LoRA weights but the first are never all-reduced, so each rank trains them on its
own share of the batch. Through torch's own ignore list, which DDP reads when a Trainer or accelerate wraps
the model (one weight stays in: DDP refuses a model with nothing to reduce)."""

from torch.nn.parallel import DistributedDataParallel

import reference
from reference import UnslothVisionDataCollator  # noqa: F401 - the backend's collator, as conformance.train_steps needs


class FastVisionModel(reference.FastVisionModel):
    @staticmethod
    def get_peft_model(model, *args, **kwargs):
        peft_model = reference.FastVisionModel.get_peft_model(model, *args, **kwargs)
        ignored = list(getattr(peft_model, "_ddp_params_and_buffers_to_ignore", []))
        ignored += [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad][1:]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(peft_model, ignored)
        return peft_model
