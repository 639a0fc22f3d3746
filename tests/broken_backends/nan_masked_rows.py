"""Fault: query rows with no key to attend to come out NaN (softmax over -inf only), as transformers'
eager attention gives with a -inf mask."""

from reference.ops import attention as ops
from tests.broken_backends._numeric_fault import attention_classes


def op(q, k, v, spec):
    out = ops.attention(q, k, v, spec)
    empty = ~ops.build_mask(spec, q.shape[0], q.shape[2], k.shape[2], q.device).any(dim=-1, keepdim=True)
    return out.masked_fill(empty, float("nan"))


FastBaseModel, FastModel, FastVisionModel = attention_classes("nan_masked_rows", op)
