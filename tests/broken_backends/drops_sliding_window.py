"""Fault: the sliding window is dropped (Gemma3's sliding layers attend to every earlier key)."""

import dataclasses

from reference.ops import attention as ops
from tests.broken_backends._numeric_fault import attention_classes


def op(q, k, v, spec):
    return ops.attention(q, k, v, dataclasses.replace(spec, window=None))


FastBaseModel, FastModel, FastVisionModel = attention_classes("drops_sliding_window", op)
