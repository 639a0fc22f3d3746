"""Fault: the mask builder lets its reader's own errors through (only compositions it knows to be
unknown fall back to the dense mask), so a transformers change inside a mask closure breaks the forward."""

from transformers import masking_utils

from reference import hf_attention
from reference.ops import attention as ops
from tests.broken_backends._numeric_fault import attention_classes


def strict_mask_builder(*args, **kwargs):
    try:
        return hf_attention._spec_from_structure(hf_attention._read(kwargs["mask_function"]), kwargs)
    except hf_attention._Unrecognised:
        return hf_attention.AttentionSpec(dense_mask=masking_utils.sdpa_mask(
            *args, **{**kwargs, "allow_is_causal_skip": False}))


FastBaseModel, FastModel, FastVisionModel = attention_classes("mask_reader_raises", ops.attention,
                                                              mask_builder=strict_mask_builder)
