"""Fault: query head h reads KV head h % Hkv instead of h // (Hq / Hkv) (transformers' repeat_kv)."""

import torch

from reference.ops import attention as ops
from tests.broken_backends._numeric_fault import attention_classes


def op(q, k, v, spec):
    kv_index = torch.arange(q.shape[1], device=k.device) % k.shape[1]
    return ops.attention(q, k[:, kv_index], v[:, kv_index], spec)


FastBaseModel, FastModel, FastVisionModel = attention_classes("gqa_modulo", op)
