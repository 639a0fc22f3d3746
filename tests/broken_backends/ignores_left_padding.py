"""Fault: text attention ignores left padding — keys before a row's first real key are attended, as
in a kernel that assumes right-padded (varlen-from-the-start) rows."""

import dataclasses

from reference.ops import attention as ops
from tests.broken_backends._numeric_fault import attention_classes


def op(q, k, v, spec):
    if spec.key_padding is not None:
        leading = spec.key_padding.long().cumsum(dim=-1) == 0  # padding before the first real key
        spec = dataclasses.replace(spec, key_padding=spec.key_padding | leading)
    return ops.attention(q, k, v, spec)


FastBaseModel, FastModel, FastVisionModel = attention_classes("ignores_left_padding", op)
