"""Fault: a table id whose 4-bit twin is not at hand is an OfflineError even though the original is cached."""

from reference import naming
from tests.broken_backends._numeric_fault import load_classes, swapped

never_the_original = swapped(naming, "_cached_original", lambda original: lambda *args: None)
FastBaseModel, FastModel, FastVisionModel = load_classes("no_twin_fallback", never_the_original)
