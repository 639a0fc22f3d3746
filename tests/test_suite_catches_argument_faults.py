"""The conformance suite catches argument faults: run against a backend with one deliberate fault
(tests/broken_backends), the relevant part of the suite fails and names the fault; the same selection
passes against the reference backend, so the difference is the fault and nothing else."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# broken backend module -> (suite module, -k selection, what the failure output must name)
FAULTS = {
    "accepts_4bit_and_8bit": ("test_arguments", "only_one_load_mode", "load_in_8bit"),
    "no_max_seq_length": ("test_arguments", "returns_the_family_model_with_its_attributes", "max_seq_length"),
    "ignores_dtype_strings": ("test_arguments", "dtype_values", "dtype='"),
    "right_padding": ("test_processor", "padding_side_is_left", "padding_side"),
    "lora_unfrozen": ("test_arguments", "lora_mode_freezes_every_parameter", "LoRA mode left"),
    "swallows_unknown_kwargs": ("test_arguments", "unknown_keyword_is_rejected", "fastvision_unknown_"),
    "token_in_environment": ("test_arguments", "token_is_never_written", "HF_TOKEN"),
    "no_offline_error": ("test_naming", "offline_is_an_offline_error_at_once", "OfflineError"),
    "resolves_with_the_raw_flag": ("test_naming", "reads_the_16bit_original", "unsloth/llava-1.5-7b-hf-bnb-4bit"),
    "no_twin_fallback": ("test_naming", "missing_twin_gives_the_cached_original", "OfflineError"),
    "unchecked_checkpoints": ("test_checkpoints", "shape", "weight shape disagrees with the config"),
    "mask_reader_raises": ("test_model_parity", "cannot_read", "KeyError"),
    "lora_on_vision_anyway": ("test_finetune", "lora_sits_exactly", "not asked for"),
    "lora_base_trainable": ("test_finetune", "only_lora_trains", "trainable besides LoRA"),
    "collator_keeps_image_tokens": ("test_collator", "masks_pads_and_every_image_token", "image tokens are left"),
    "inference_right_padding": ("test_finetune", "toggle_the_model", "padding_side"),
    "lora_scaling_off": ("test_finetune", "lora_logits_and_gradients_match and llava", "LoRA logits differ from"),
    "training_loss_misscaled": ("test_finetune", "training_loss_and_its_lora_gradients and llava",
                                "training loss differs from transformers + PEFT"),
}
# A subprocess imports torch and transformers and collects one suite module: ~10 s on 2 cores.
SUBPROCESS_TIMEOUT_S = 300


def run_suite(backend: str, modules, selection: str) -> tuple[int, str]:
    command = [sys.executable, "-m", "pytest", "--pyargs", *(f"conformance.{m}" for m in modules),
               "--backend", backend, "-k", selection, "-q", "-p", "no:cacheprovider", "-x"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("fault", FAULTS)
def test_the_suite_fails_on_the_fault_and_names_it(fault):
    module, selection, named = FAULTS[fault]
    code, output = run_suite(f"tests.broken_backends.{fault}", [module], selection)
    tail = output[-3000:]
    assert code != 0, f"the suite passed against the {fault} backend:\n{tail}"
    assert re.search(r"\b\d+ failed\b", output), f"no test failed (an error elsewhere?):\n{tail}"
    assert named in output, f"the failure does not name {named!r}:\n{tail}"


def test_the_same_selections_pass_on_the_reference_backend():
    modules = sorted({module for module, _, _ in FAULTS.values()})
    selection = " or ".join(sorted({selection for _, selection, _ in FAULTS.values()}))
    code, output = run_suite("reference", modules, selection)
    assert code == 0, f"the selections fail on the reference backend:\n{output[-3000:]}"
    assert re.search(r"\b\d+ passed\b", output), output[-3000:]


def test_the_strategies_draw_the_contracts_defaults():
    # specified_kwargs leaves out a value equal to its default: a wrong default there would silently
    # drop a non-default argument from every drawn call.
    from conformance import strategies
    from conformance.test_signature import SIGNATURE

    contract = dict(SIGNATURE)
    wrong = {k: (v, contract.get(k)) for k, v in strategies.DEFAULTS.items() if contract.get(k, object()) != v}
    assert not wrong, f"strategies.DEFAULTS differ from the signature table (strategies, table): {wrong}"
