"""Fault: Gemma3's bidirectional image blocks are dropped (image tokens attend causally only), as
transformers' own flash-attention mask does."""

import dataclasses

from reference.ops import attention as ops
from tests.broken_backends._numeric_fault import attention_classes


def op(q, k, v, spec):
    return ops.attention(q, k, v, dataclasses.replace(spec, span_ids=None))


FastBaseModel, FastModel, FastVisionModel = attention_classes("drops_gemma3_spans", op)
