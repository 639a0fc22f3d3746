"""What each optimized piece is worth on the user's job: one optimized QLoRA model, timed as shipped and
with one piece switched back, in one process per family (the same weights, batch and GPU state).

The workload and measurement of benchmarks/finetune.py (its checkpoint, batch, load and median step);
the variants, timed in this order on the same model:

  shipped              what from_pretrained + get_peft_model + for_training give
  serial copies        "unsloth" checkpointing's copies of layer inputs to the host and back issued on the
                       compute stream instead of beside it (reference/host_offload.py, overlap=False)
  two-op mlp           each gated MLP's activation and LoRA down projection as two ops, not one
                       (optimized/kernels/gated_lora_down.py): a no-op forward hook on every down_proj, which
                       makes the MLP call it as a module
  recorded checkpoint  "unsloth" checkpointing through torch's recorded (non-reentrant) graph, the
                       implementation a DDP process uses (reference/training.py)
  peft lora            PEFT's own LoRA modules instead of the fused LoRA op (optimized.use_peft_lora)

Steps train the adapters, so only the first variant's first loss is that of an untrained model.

    python benchmarks/finetune_ablation.py --families qwen2_vl llava     # GPU: benchmarks/results/...
    python benchmarks/finetune_ablation.py --host-profile DIR            # also each variant's top host ops
    python benchmarks/finetune_ablation.py --smoke                       # CPU plumbing check (the interpreter)
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import finetune  # noqa: E402
import model as model_bench  # noqa: E402


def _checkpointing(model, function) -> None:
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = function


def _serial_copies(model) -> None:
    from reference import host_offload

    host_offload.use_streams(host_offload.Streams(overlap=False))


_DOWN_HOOKS = []


def _two_op_mlp(model) -> None:
    from reference import host_offload

    host_offload.use_streams(host_offload.Streams())
    _DOWN_HOOKS.extend(m.register_forward_hook(lambda *_: None) for name, m in model.named_modules()
                       if name.endswith("mlp.down_proj") and hasattr(m, "lora_A"))


def _recorded(model) -> None:
    from reference import training

    while _DOWN_HOOKS:
        _DOWN_HOOKS.pop().remove()
    _checkpointing(model, training.recorded_checkpoint)


def _peft_lora(model) -> None:
    import optimized
    from reference import training

    _checkpointing(model, training.offloaded_checkpoint)
    optimized.use_peft_lora(model)


VARIANTS = (("shipped", None), ("serial copies", _serial_copies), ("two-op mlp", _two_op_mlp),
            ("recorded checkpoint", _recorded), ("peft lora", _peft_lora))


def host_profile(model, batch, steps: int = 2, top: int = 25) -> str:
    """The ops that cost the host most over `steps` forward + backward passes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        for _ in range(steps):
            model(**batch, labels=batch["input_ids"]).loss.backward()
        torch.cuda.synchronize()
    return recorded.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def run_family(family: str, args, directory: pathlib.Path) -> list[dict]:
    import torch

    model_dir, batch_file = finetune.prepare(family, directory, args)
    batch = torch.load(batch_file, weights_only=True)
    return time_variants(family, finetune.load("optimized", str(model_dir), args.bits), batch, args)


def time_variants(family: str, model, batch, args) -> list[dict]:
    """One row per variant, switched on `model` in VARIANTS' order."""
    import torch

    rows = []
    for name, switch in VARIANTS:
        if switch is not None:
            switch(model)
        row = finetune.time_steps(model, batch, args.warmup, args.steps)
        rows.append({"family": family, "variant": name, **row})
        print(json.dumps(rows[-1]), flush=True)
        if getattr(args, "host_profile", None):
            on_device = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
            path = pathlib.Path(args.host_profile, f"{family}-{name.replace(' ', '-')}.txt")
            path.write_text(host_profile(model, on_device))
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Optimized QLoRA step, one piece at a time — {result['device']}, {result['date']}", "",
             "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
             "| family | variant | step ms | vs shipped | peak GiB |", "|---|---|---|---|---|"]
    shipped = {r["family"]: r for r in result["rows"] if r["variant"] == "shipped"}
    for row in result["rows"]:
        ratio = row["step_ms"] / shipped[row["family"]]["step_ms"]
        lines.append(f"| {row['family']} | {row['variant']} | {row['step_ms']} | {ratio:.2f}x | {row['peak_gib']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(model_bench.FAMILIES))
    finetune.add_workload_arguments(parser)
    parser.add_argument("--host-profile", metavar="DIR")
    args = finetune.workload_args(parser, argv)
    with tempfile.TemporaryDirectory() as directory:
        rows = [row for family in args.families for row in run_family(family, args, pathlib.Path(directory))]
    result = {"device": model_bench.card(), "versions": {**model_bench.versions(), **finetune._peer_versions()},
              "rows": rows,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    card = "smoke" if args.smoke else model_bench.card().replace(" ", "_")
    stem = pathlib.Path(args.out, f"finetune-ablation-{card}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
