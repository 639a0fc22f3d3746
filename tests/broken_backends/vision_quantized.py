"""Fault: the vision tower is quantized by default (Unsloth's Qwen2-VL behaviour, reported as garbage
output). Plan and modules agree; docs/contract.md's placement does not."""

from tests.broken_backends._numeric_fault import load_classes, vision_quantized_by_default

FastBaseModel, FastModel, FastVisionModel = load_classes("vision_quantized", vision_quantized_by_default)
