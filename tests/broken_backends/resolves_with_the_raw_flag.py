"""Fault: the name table is read with the raw load_in_4bit flag (default True), not the decided mode, so
full finetuning and a user's 8-bit config load the pre-quantized 4-bit twin, whose own config wins."""

import contextlib

from reference import naming
from tests.broken_backends._numeric_fault import load_classes


@contextlib.contextmanager
def raw_flag(kwargs):
    resolve = naming.resolve

    def with_raw_flag(model_name, *, to_4bit_twin, **rest):
        return resolve(model_name, to_4bit_twin=kwargs.get("load_in_4bit", True), **rest)

    naming.resolve = with_raw_flag
    try:
        yield kwargs
    finally:
        naming.resolve = resolve


FastBaseModel, FastModel, FastVisionModel = load_classes("resolves_with_the_raw_flag", raw_flag)
