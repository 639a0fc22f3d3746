"""benchmarks/finetune.py --gpus N: the worker's command under torchrun, the scaling row, and the worker
itself data-parallel on 2 gloo ranks over a tiny zoo checkpoint (the real-width benchmark needs a GPU)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conformance import inputs, zoo

ROOT = Path(__file__).resolve().parents[1]
# Two ranks: imports, a 4-bit load each, 2 steps (~14 s here).
TIMEOUT_S = 300


def _finetune():
    spec = importlib.util.spec_from_file_location("finetune_benchmark", ROOT / "benchmarks" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARGS = argparse.Namespace(bits=4, warmup=1, steps=1)
# The data-parallel plumbing is the same for every fastvision contender; the reference backend imports no
# Triton: 14 s for the two ranks here, 67 s with the optimized backend (its imports, on 2 busy cores).
CONTENDER = "reference"


def test_gpus_n_launches_the_worker_under_torchrun_with_n_processes():
    finetune = _finetune()
    one = finetune.worker_command("optimized", "MODEL", "BATCH", ARGS)
    many = finetune.worker_command("optimized", "MODEL", "BATCH", ARGS, gpus=4)
    assert one[:2] == [sys.executable, finetune.__file__] and "--worker" in one
    assert many == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", *one[1:]]


def test_the_scaling_row_is_n_gpu_tokens_per_s_over_one_gpus():
    finetune = _finetune()
    one = {"family": "qwen2_vl", "contender": "optimized", "bits": 4, "tokens_per_s": 1000.0}
    row = finetune.scaled_row(one, {"gpus": 8, "tokens_per_s": 7600.0, "step_ms": 10.0})
    assert row["contender"] == "optimized x8" and row["scaling"] == 7.6 and row["family"] == "qwen2_vl"
    assert finetune.scaled_row(one, {"error": "OutOfMemoryError"})["scaling"] is None


def test_the_worker_steps_data_parallel_on_two_gloo_ranks(tmp_path):
    from transformers import AutoProcessor

    model_dir = zoo.checkpoint("qwen2_vl")
    batch_file = tmp_path / "batch.pt"
    torch.save(dict(inputs.image_batch(AutoProcessor.from_pretrained(model_dir))), batch_file)
    command = _finetune().worker_command(CONTENDER, model_dir, batch_file, ARGS, gpus=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and len(results) == 1, (done.stdout + done.stderr)[-3000:]  # rank 0 reports
    assert "error" not in results[0], results[0]
    assert results[0]["gpus"] == 2 and results[0]["tokens_per_s"] > 0


def test_the_ablation_times_each_variant_on_one_model_and_switches_what_it_names(monkeypatch):
    """benchmarks/finetune_ablation.py on the tiny checkpoint: the optimized backend with its ops' twins
    (another test file in this worker may have set TRITON_INTERPRET; the interpreter made this 194 s)."""
    from transformers import AutoProcessor

    from optimized import ops
    from reference import host_offload, training

    monkeypatch.setattr(ops, "interpreter_enabled", lambda: False)

    spec = importlib.util.spec_from_file_location("finetune_ablation", ROOT / "benchmarks" / "finetune_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    model_dir = zoo.checkpoint("qwen2_vl")
    batch = dict(inputs.image_batch(AutoProcessor.from_pretrained(model_dir)))
    model = _finetune().load("optimized", str(model_dir), 4)
    fused_before = _fused_projections(model)
    switched, real = [], ablation._checkpointing
    ablation._checkpointing = lambda m, function: switched.append(function) or real(m, function)
    overlap, folded, time_steps = [], [], ablation.finetune.time_steps
    monkeypatch.setattr(ablation.finetune, "time_steps", lambda *a: overlap.append(host_offload.STREAMS.overlap) or
                        folded.append(_folded_down_projections(model)) or time_steps(*a))
    monkeypatch.setattr(host_offload, "STREAMS", host_offload.STREAMS)  # restored after the test
    rows = ablation.time_variants("qwen2_vl", model, batch, ARGS)
    assert [row["variant"] for row in rows] == [name for name, _ in ablation.VARIANTS]
    assert len({row["lora_parameters"] for row in rows}) == 1 and all(row["step_ms"] > 0 for row in rows)
    assert switched == [training.recorded_checkpoint, training.offloaded_checkpoint]
    assert overlap == [True, False, True, True, True]  # only "serial copies" issues them on the compute stream
    layers = model.config.get_text_config().num_hidden_layers
    assert folded == [layers, layers, 0, layers, 0]  # "two-op mlp" and PEFT's modules fold no down projection
    assert fused_before > 0 and _fused_projections(model) == 0  # the last variant ran PEFT's own modules


def _folded_down_projections(model) -> int:
    from optimized.patches import fused_lora

    return sum(fused_lora.direct_arguments(m) is not None for n, m in model.named_modules()
               if n.endswith("mlp.down_proj"))


def _fused_projections(model) -> int:
    return sum(getattr(vars(m).get("forward"), "__name__", "") == "_fused_forward" for m in model.modules())


def test_a_run_reports_after_every_row_so_a_cut_run_keeps_what_finished(monkeypatch, tmp_path):
    finetune = _finetune()
    monkeypatch.setattr(finetune, "prepare", lambda family, directory, args: ("MODEL", "BATCH"))
    monkeypatch.setattr(finetune, "run_contender", lambda family, contender, *rest: {"step_ms": 1.0})
    args = argparse.Namespace(families=["qwen2_vl", "llava"], contenders=["optimized", "transformers"], bits=4,
                              gpus=1, batch=1, tokens=16, text_layers=1, vision_layers=1, warmup=1, steps=1)
    seen = []
    finetune.run(args, report=lambda result: seen.append([(r["family"], r["contender"]) for r in result["rows"]]))
    assert [len(rows) for rows in seen] == [1, 2, 3, 4]
    assert seen[-1] == [("qwen2_vl", "optimized"), ("qwen2_vl", "transformers"), ("llava", "optimized"),
                        ("llava", "transformers")]


def test_the_table_puts_each_row_against_every_peer_the_run_has_and_no_other():
    finetune = _finetune()

    def row(family, contender, step_ms, peak_gib):
        return {"family": family, "contender": contender, "bits": 4, "step_ms": step_ms, "peak_gib": peak_gib,
                "tokens_per_s": 1.0, "lora_parameters": 1, "first_loss": 1.0}

    result = {"device": "GPU", "date": "today", "versions": {}, "setup": {"bits": 4},
              "rows": [row("llava", "optimized", 100.0, 3.0), row("llava", "transformers+liger", 150.0, 4.0),
                       row("gemma3", "optimized", 200.0, 2.0)]}
    header, _, ours, liger, alone = finetune.markdown(result).splitlines()[5:10]
    assert "vs transformers+liger (speed, memory)" in header and "vs unsloth" not in header
    assert "| 1.50x, 0.75x |" in ours and "| 1.00x, 1.00x |" in liger
    assert alone.count("|") == header.count("|") and "| - |" in alone


def _model_bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import model

    return model


def test_gpu_busy_time_counts_overlapping_kernels_once():
    model = _model_bench()
    assert model.busy_us([(0, 10), (5, 20), (6, 8), (30, 40)]) == 30
    assert model.busy_us([]) == 0


def test_a_profile_says_per_call_wall_gpu_busy_and_launches():
    model = _model_bench()
    from types import SimpleNamespace as Event

    from torch.autograd import DeviceType

    def kernel(start, end):
        return Event(name="gemm", device_type=DeviceType.CUDA, time_range=Event(start=start, end=end))

    host = Event(name="cudaLaunchKernel", device_type=DeviceType.CPU, time_range=Event(start=0, end=1))
    line = model.timeline_line([host, kernel(0, 3000), host, kernel(1000, 4000)], steps=2, wall_us=10000)
    assert line == "per call: wall 5.00 ms; GPU busy 2.00 ms (40% of wall); 1 kernel launches"
    text = model.profile_calls(lambda: torch.ones(64).sum(), steps=1, top=3)
    assert text.startswith("per call: wall ") and "GPU busy 0.00 ms" in text and "Name" in text
