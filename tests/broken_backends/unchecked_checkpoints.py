"""Fault: the checkpoint's tensors are not checked against its config before the load (what transformers
and bitsandbytes do with them is what the user gets: a 4-bit weight of the wrong shape loads silently)."""

from reference import checkpoint
from tests.broken_backends._numeric_fault import load_classes, swapped

unchecked = swapped(checkpoint, "check_against_model", lambda original: lambda *args: None)
FastBaseModel, FastModel, FastVisionModel = load_classes("unchecked_checkpoints", unchecked)
