"""The conformance suite's numeric and placement checks fail a backend with one deliberate fault, and the
failure names the fault; the same selection passes on the reference backend.

Each broken backend (tests/broken_backends/) is the reference backend with exactly one thing wrong. The
suite runs in a subprocess, as a user runs it: `python -m pytest --pyargs conformance --backend X`.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PLACEMENT = "test_default_placement and llava"
TEXT_ATTENTION = "test_text_attention_matches_oracle and {family}"
# broken backend -> (-k selection, words the failure report must contain)
FAULTS = {
    "vision_quantized": (PLACEMENT, ["llava 4bit", "model.vision_tower.", "nf4 (expected keep)"]),
    "lm_head_4bit": (PLACEMENT, ["llava 4bit", "lm_head: nf4 (expected keep)"]),
    "ignores_left_padding": (TEXT_ATTENTION.format(family="llava"), ["llava text attention", "left padding"]),
    "gqa_modulo": (TEXT_ATTENTION.format(family="llava"), ["llava text attention", "GQA 6/2"]),
    "nan_masked_rows": (TEXT_ATTENTION.format(family="llava"), ["gave NaN", "fully masked query rows"]),
    "drops_sliding_window": (TEXT_ATTENTION.format(family="gemma3"), ["gemma3 text attention", "sliding window 5"]),
    "drops_gemma3_spans": (TEXT_ATTENTION.format(family="gemma3"), ["gemma3 text attention", "bidirectional spans"]),
}
# The padding fault is a model-level fault too: a left-padded batch's logits move.
MODEL_FAULTS = {
    "ignores_left_padding": ("test_16bit_logits_and_grads and llava and left_padded_batch",
                             ["llava left_padded_batch", "logits differ from transformers' fp32 eager model"]),
}


def run_suite(backend: str, selection: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "--pyargs", "conformance", "--backend", backend, "-k", selection,
               "-q", "-p", "no:cacheprovider", "-x"]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": path}  # one thread: see test_load_lifecycle
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _report(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}; last output:\n{(result.stdout + result.stderr)[-3000:]}"


@pytest.mark.parametrize(
    "broken, selection, words",
    [pytest.param(name, sel, words, id=name) for name, (sel, words) in FAULTS.items()]
    + [pytest.param(name, sel, words, id=f"{name}-model") for name, (sel, words) in MODEL_FAULTS.items()],
)
def test_suite_fails_a_broken_backend_naming_the_fault(broken, selection, words):
    result = run_suite(f"tests.broken_backends.{broken}", selection)
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"{broken}: expected test failures (exit 1), got {_report(result)}"
    missing = [w for w in words if w not in output]
    assert not missing, f"{broken}: the failure does not name {missing}; {_report(result)}"


def test_the_same_selection_passes_on_the_reference_backend():
    selections = {sel for sel, _ in [*FAULTS.values(), *MODEL_FAULTS.values()]}
    result = run_suite("reference", " or ".join(f"({sel})" for sel in sorted(selections)))
    assert result.returncode == 0, f"reference backend: {_report(result)}"
    assert " passed" in result.stdout and " failed" not in result.stdout, _report(result)
