"""Fault: lm_head is quantized with the language model. Plan and modules agree; docs/contract.md keeps
lm_head 16-bit."""

from tests.broken_backends._numeric_fault import lm_head_in_the_language_model, load_classes

FastBaseModel, FastModel, FastVisionModel = load_classes("lm_head_4bit", lm_head_in_the_language_model)
