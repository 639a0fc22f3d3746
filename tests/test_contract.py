"""Contract rules that depend on hardware this machine lacks, checked on LoadRequest directly."""

from __future__ import annotations

import pytest
import torch
from transformers import BitsAndBytesConfig

from reference.contract import LoadRequest


@pytest.mark.parametrize(
    ("dtype", "on_gpu", "gpu_has_bf16", "expected"),
    [
        (None, False, False, torch.float32),
        (None, True, True, torch.bfloat16),
        (None, True, False, torch.float16),
        ("bf16", True, True, torch.bfloat16),
        ("float16", True, True, torch.float16),
        (torch.float32, True, True, torch.float32),
    ],
)
def test_dtype_resolution(dtype, on_gpu, gpu_has_bf16, expected):
    assert LoadRequest.from_call("m", dtype=dtype).resolve_dtype(on_gpu, gpu_has_bf16) == expected


def test_bf16_on_a_gpu_without_it_warns_and_uses_fp16():
    with pytest.warns(UserWarning, match="bf16|bfloat16"):
        assert LoadRequest.from_call("m", dtype="bfloat16").resolve_dtype(True, False) == torch.float16


def test_a_user_4bit_config_sets_the_compute_dtype_when_dtype_is_none():
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    request = LoadRequest.from_call("m", load_in_4bit=False, quantization_config=config)
    assert request.requested_mode == "4bit"
    assert request.resolve_dtype(True, True) == torch.bfloat16


@pytest.mark.parametrize(
    ("full_finetuning", "dtype", "asked", "expected"),
    [
        (True, torch.bfloat16, None, False),
        (True, torch.float16, None, True),
        (False, torch.bfloat16, None, True),
        (True, torch.bfloat16, True, True),
    ],
)
def test_float32_mixed_precision_default(full_finetuning, dtype, asked, expected):
    request = LoadRequest.from_call(
        "m", load_in_4bit=False, full_finetuning=full_finetuning, float32_mixed_precision=asked
    )
    assert request.resolve_float32_mixed_precision(dtype) is expected


def test_unsloth_checkpointing_is_plain_below_512_tokens():
    assert LoadRequest.from_call("m", max_seq_length=511).checkpointing_mode is True
    assert LoadRequest.from_call("m", max_seq_length=512).checkpointing_mode == "unsloth"
