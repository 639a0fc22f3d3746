"""The optimized backend's own promises: where its attention runs, one launch per vision layer, masks as
structure, and patches that never leak into reference models loaded in the same process."""

from __future__ import annotations

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton reads this when its kernels are defined: before the import below
    os.environ.setdefault("TRITON_INTERPRET", "1")

import optimized
import reference
from conformance import inputs, tolerances, zoo
from optimized import ops
from reference.ops.attention import AttentionSpec
from reference.ops.attention import attention as reference_attention


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call the Triton kernel serves, as (q shape, spec)."""
    calls = []
    kernel = ops._kernel_module()
    original = kernel.attention

    def spy(q, k, v, spec):
        calls.append((tuple(q.shape), spec))
        return original(q, k, v, spec)

    monkeypatch.setattr(kernel, "attention", spy)
    return calls


def _forward(backend, family):
    model, processor = backend.FastVisionModel.from_pretrained(str(zoo.checkpoint(family)), load_in_4bit=False)
    batch = inputs.image_batch(processor)
    with torch.no_grad():
        return model, batch, model(**batch).logits


def test_without_gpu_or_interpreter_the_reference_op_runs_and_the_log_says_so_once(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops._say_fallback_once.cache_clear()
    q = torch.randn(1, 2, 5, 8)
    spec = AttentionSpec(causal=True)
    with caplog.at_level(logging.WARNING, logger="fastvision.optimized"):
        for _ in range(3):
            out = ops.attention(q, q, q, spec)
    assert torch.equal(out, reference_attention(q, q, q, spec))
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "reference attention" in caplog.records[0].getMessage()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_attention_is_one_launch_per_layer(kernel_calls, family):
    model, _, _ = _forward(optimized, family)
    vision_calls = [spec for shape, spec in kernel_calls if spec.cu_seqlens is not None]
    # Two images in the batch (and, for Qwen2.5-VL, several windows each): still one call per layer.
    assert len(vision_calls) == model.config.vision_config.depth
    assert all(len(spec.cu_seqlens) > 2 for spec in vision_calls)


def test_pixtral_block_mask_reaches_the_kernel_as_segments(kernel_calls):
    _forward(optimized, "pixtral")
    assert kernel_calls, "the kernel served nothing"
    assert all(spec.dense_mask is None for _, spec in kernel_calls)
    assert any(spec.cu_seqlens is not None for _, spec in kernel_calls)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "pixtral"])
def test_a_reference_model_loaded_after_an_optimized_one_is_untouched(kernel_calls, family):
    _, batch, optimized_logits = _forward(optimized, family)
    served_by_optimized = len(kernel_calls)
    reference_model, _, reference_logits = _forward(reference, family)
    assert len(kernel_calls) == served_by_optimized, "the reference model's attention went to the kernel"
    # The patches set `forward` on module instances: none may carry one in the reference model.
    leaked = [type(m).__name__ for m in reference_model.modules() if "forward" in vars(m)]
    assert not leaked, f"a patched forward leaked into the reference model: {leaked}"
    valid = batch["attention_mask"].bool()
    difference = (optimized_logits - reference_logits)[valid].abs().max()
    assert difference <= tolerances.MODEL_LOGITS_ATOL[torch.float32]
