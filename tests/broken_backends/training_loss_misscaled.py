"""Fault: after get_peft_model, a training forward's loss is divided by one token more than it counts (a
1% error at ~100 tokens), as a fused loss that mis-counts its rows would be."""

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

import reference
from reference import UnslothVisionDataCollator  # noqa: F401 - the backend's collator is the reference's
from tests.broken_backends._numeric_fault import adapter_classes


def _one_more(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kwargs):
    counted = int((labels[..., 1:] != ignore_index).sum()) if num_items_in_batch is None else num_items_in_batch
    return ForCausalLMLoss(logits, labels, vocab_size, torch.tensor(counted + 1), ignore_index, **kwargs)


def get_peft_model(model, *args, **kwargs):
    peft_model = reference.FastVisionModel.get_peft_model(model, *args, **kwargs)
    peft_model.get_base_model().loss_function = _one_more
    return peft_model


FastBaseModel, FastModel, FastVisionModel = adapter_classes("training_loss_misscaled", get_peft_model=get_peft_model)
