"""What the holdout tests (`test_holdout_<family>.py`) share: a checkpoint the zoo never built, with
transformers' own init and its norms moved, and a backend's fp32 logits judged against transformers' eager.

Each test file writes its family's config, tokenizer, processor and prompts itself (that is what makes the
checkpoint independent of the zoo); only the building and the judging are the same code.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from conformance import tolerances


def build(model_class, config, processor, path: pathlib.Path, *, seed: int, image_shapes) -> list[np.ndarray]:
    """Save a `model_class(config)` (transformers' init, norms moved by N(0, 0.1)) and `processor` into
    `path`; return random uint8 images of `image_shapes` ((height, width) each), drawn from the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        with torch.no_grad():  # norms start at exactly 1: move them, so one applied wrongly (a q_norm) shows
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(torch.randn_like(param) * 0.1)
        pixels = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8).numpy() for h, w in image_shapes]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return pixels


def assert_eager_logits(backend, model_class, path: pathlib.Path, batch) -> None:
    """The backend's fp32 load of `path` gives transformers' eager logits on `batch`'s valid tokens, within
    MODEL_LOGITS_ATOL."""
    eager = model_class.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model, _ = backend.FastVisionModel.from_pretrained(str(path), load_in_4bit=False, dtype=torch.float32)
    assert type(model) is model_class
    with torch.no_grad():
        expected = eager.eval()(**batch).logits
        got = model.eval()(**batch.to(model.device)).logits.to(expected.device)
    valid = batch["attention_mask"].bool()
    error = (got[valid] - expected[valid]).abs().max().item()
    assert error <= tolerances.MODEL_LOGITS_ATOL[torch.float32], error
