"""Data-parallel fine-tuning: 2 ranks under torchrun (gloo, CPU) train the same LoRA weights as one process
over the same global batch, and a rank that skips the gradient all-reduce is caught by that comparison.

Each run is conformance.train_steps in a fresh process: the 4-bit qwen2_vl zoo checkpoint (the smallest
family), "unsloth" checkpointing, TRL's SFTTrainer, 2 SGD steps of a global batch of 4."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conformance.tolerances import DDP_LORA_ATOL

ROOT = Path(__file__).resolve().parents[1]
# One run: ~10 s alone, ~24 s for 2 ranks (imports, a load per rank, 2 steps) on this 2-core machine.
TIMEOUT_S = 300


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # see test_load_lifecycle
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a launcher's variables from outside must not leak into the single run
    return env


def _train(out: Path, *, ranks: int, backend: str = "reference") -> dict:
    step = ["-m", "conformance.train_steps", "--backend", backend, "--out", str(out),
            "--per-device-batch", str(4 // ranks)]
    # --standalone: a free rendezvous port, so two test runs on one machine cannot meet each other.
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    done = subprocess.run([sys.executable, *launcher, *step], cwd=out.parent, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert f"world size {ranks}" in done.stdout, done.stdout[-2000:]
    return load_file(out / "adapter_model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return _train(tmp_path_factory.mktemp("single") / "lora", ranks=1)


def test_two_ranks_train_the_lora_weights_of_one_process(one_process, tmp_path):
    ddp = _train(tmp_path / "lora", ranks=2)
    lora_b = max(float(w.abs().max()) for name, w in one_process.items() if "lora_B" in name)
    assert lora_b > 1e3 * DDP_LORA_ATOL  # lora_B starts at 0: the steps moved it far past the bound
    assert _max_diff(one_process, ddp) <= DDP_LORA_ATOL


def test_a_rank_that_skips_the_all_reduce_is_caught(one_process, tmp_path):
    broken = _train(tmp_path / "lora", ranks=2, backend="tests.broken_backends.ddp_skips_allreduce")
    assert _max_diff(one_process, broken) > DDP_LORA_ATOL
