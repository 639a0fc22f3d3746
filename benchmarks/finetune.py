"""The user's job, timed: QLoRA fine-tuning steps per family, fastvision side by side with Unsloth and others.

The workload of Unsloth's vision notebooks on a random-weight checkpoint at the real widths of each family's
representative model (benchmarks/model.py builds them; the same layer cut for every contender): the base
in 4-bit (or 16-bit with --bits 16), LoRA r=16 alpha=16 dropout 0 on the language model's attention and MLP
projections (finetune_vision_layers=False), gradient checkpointing on ("unsloth" where the contender has
it), and a step = forward + backward + AdamW on the LoRA weights, on one saved batch of 4 samples x ~2,000
tokens with one image each. Reported: median step of >= 10 after warm-up, peak allocated GiB, tokens/s, the
LoRA parameter count and the first step's loss (the same count and loss across contenders is the check
that they compute the same thing).

Each contender runs in a process of its own (Unsloth patches transformers when imported):
  optimized, reference      fastvision's from_pretrained + get_peft_model + for_training
  transformers              AutoModelForImageTextToText + bitsandbytes + PEFT, SDPA attention
  transformers+liger        the same with Liger-Kernel's patch for the family applied to the instance
  unsloth                   Unsloth's FastVisionModel.from_pretrained + get_peft_model + for_training

    python benchmarks/finetune.py                    # GPU: benchmarks/results/finetune-<card>.{json,md}
    python benchmarks/finetune.py --bits 16          # the 16-bit LoRA variant
    python benchmarks/finetune.py --smoke            # CPU plumbing check: 1 layer, short text, 1 step
    python benchmarks/finetune.py --profile DIR      # also top GPU kernels: DIR/<family>-<contender>-<bits>bit.txt
    python benchmarks/finetune.py --gpus 8 --contenders optimized   # tokens/s on 1 and on 8 GPUs (DDP)

--gpus N also runs each fastvision contender's worker under torchrun with N processes, data-parallel: each
rank loads its own copy on its own GPU (from_pretrained derives device_map from LOCAL_RANK), wraps it in
DDP and steps on its own copy of the batch, so a step trains N x the tokens; reported per contender:
tokens/s on 1 and N GPUs and their ratio (the scaling; N is ideal).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONTENDERS = ("optimized", "reference", "transformers", "transformers+liger", "unsloth")
LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0}
LANGUAGE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEARNING_RATE = 2e-4
WORKER_TIMEOUT_S = 900
SCALED = ("optimized", "reference")  # the contenders --gpus N also runs data-parallel


# ------------------------------------------------------------------------------------- the contenders
def load_fastvision(name: str, model_dir: str, bits: int):
    backend = __import__(name)
    model, _ = backend.FastVisionModel.from_pretrained(
        model_dir,
        load_in_4bit=bits == 4,
        load_in_16bit=bits == 16,
        use_gradient_checkpointing="unsloth",
        max_seq_length=4096,
    )
    model = backend.FastVisionModel.get_peft_model(model, finetune_vision_layers=False, **LORA)
    return backend.FastVisionModel.for_training(model)


def load_transformers(model_dir: str, bits: int, liger: bool):
    import peft
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from model import skip_modules

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32  # fastvision's own default per device
    kwargs = {}
    if bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip_modules(model_dir),
        )
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=dtype, device_map="cuda" if on_gpu else "cpu", attn_implementation="sdpa", **kwargs
    )
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    model.requires_grad_(False)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    language = rf".*language_model.*\.({'|'.join(LANGUAGE_PROJECTIONS)})"
    return peft.get_peft_model(model, peft.LoraConfig(target_modules=language, **LORA)).train()


def load_unsloth(model_dir: str, bits: int):
    from unsloth import FastVisionModel  # first: it patches transformers as it is imported

    model, _ = FastVisionModel.from_pretrained(
        model_dir,
        load_in_4bit=bits == 4,
        load_in_16bit=bits == 16,
        use_gradient_checkpointing="unsloth",
        max_seq_length=4096,
    )
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=False,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        bias="none",
        random_state=3407,
        **LORA,
    )
    return FastVisionModel.for_training(model)


def load(contender: str, model_dir: str, bits: int):
    if contender == "unsloth":
        return load_unsloth(model_dir, bits)
    if contender.startswith("transformers"):
        return load_transformers(model_dir, bits, liger=contender.endswith("liger"))
    return load_fastvision(contender, model_dir, bits)


# ------------------------------------------------------------------------------------------ the steps
def time_steps(model, batch, warmup: int, steps: int, profile: str | None = None) -> dict:
    import torch

    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)

    def step() -> float:
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from model import median_step

    median, peak, first_loss = median_step(step, max(1, warmup), steps)
    if profile:
        from model import profile_calls

        pathlib.Path(profile).write_text(profile_calls(step))
    tokens = int(batch["attention_mask"].sum())
    return {
        "step_ms": round(median, 2),
        "peak_gib": round(peak, 3) if torch.cuda.is_available() else None,
        "tokens_per_s": round(tokens / (median / 1000), 1),
        "lora_parameters": sum(p.numel() for p in trainable),
        "first_loss": round(first_loss, 4),
        "tokens": tokens,
    }


def worker(args) -> int:
    """One contender, one family, in this process: print one RESULT line."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    try:
        if args.contender == "unsloth":
            import unsloth  # noqa: F401 - before torch and transformers
        import torch

        world = _join_ranks()
        batch = torch.load(args.batch_file, weights_only=True)
        model = load(args.contender, args.model_dir, args.bits)
        if world > 1:
            local = int(os.environ["LOCAL_RANK"])
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if torch.cuda.is_available()
                                                              else None)
        result = time_steps(model, batch, args.warmup, args.steps, args.profile)
        result.update(gpus=world, tokens_per_s=round(result["tokens_per_s"] * world, 1))  # a batch per rank
    except Exception as error:  # noqa: BLE001 - a contender that cannot run is reported, not fatal
        result = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps(result), flush=True)
    return 0


def _join_ranks() -> int:
    """The world size; under torchrun, this rank joined to the others (NCCL on GPUs, gloo on the CPU)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # median_step's synchronize and peak memory
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world


# ------------------------------------------------------------------------------------- the orchestra
def prepare(family: str, directory: pathlib.Path, args) -> tuple[pathlib.Path, pathlib.Path]:
    """The family's real-width checkpoint and its saved batch, built once for every contender."""
    import torch
    from transformers import AutoProcessor

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import model as model_bench

    model_dir = model_bench.build_checkpoint(family, directory / family, args.text_layers, args.vision_layers)
    batch = model_bench.step_inputs(AutoProcessor.from_pretrained(model_dir), family, args.batch, args.tokens)
    batch_file = directory / f"{family}-batch.pt"
    torch.save(dict(batch), batch_file)
    return model_dir, batch_file


def worker_command(contender: str, model_dir, batch_file, args, gpus: int = 1,
                   profile: str | None = None) -> list[str]:
    """The worker's command line: this file in one process, or under torchrun with `gpus` processes;
    `profile`: the file its top GPU kernels go to."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"] if gpus > 1 else []
    return [
        sys.executable,
        *launcher,
        __file__,
        "--worker",
        contender,
        "--model-dir",
        str(model_dir),
        "--batch-file",
        str(batch_file),
        "--bits",
        str(args.bits),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        *(["--profile", profile] if profile else []),
    ]


def run_contender(family: str, contender: str, model_dir, batch_file, args, gpus: int = 1) -> dict:
    profile = str(pathlib.Path(args.profile, f"{family}-{contender}-{args.bits}bit.txt")) \
        if args.profile and gpus == 1 else None
    command = worker_command(contender, model_dir, batch_file, args, gpus, profile)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "UNSLOTH_DISABLE_STATISTICS": "1",
    }
    # N ranks on one host share its cores. One process keeps torch's own thread count: forced to 1, the
    # optimized Qwen2-VL step took 121 ms instead of 95 (H200, 2026-12-02; Unsloth's 132 ms either way).
    if gpus > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][7:]) if lines else {"error": f"rc {done.returncode}: {done.stderr[-400:]}"}
    result["process_s"] = round(time.perf_counter() - start, 1)
    return result


def run(args, report=lambda result: None) -> dict:
    """Every family's rows; `report(result)` after each row, so a run cut short keeps the rows it finished."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import model as model_bench

    result = {
        "device": model_bench.card(),
        "versions": {**model_bench.versions(), **_peer_versions()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": [],
        "setup": {**model_bench.setup(args), "bits": args.bits, "gpus": args.gpus, "lora": LORA,
                  "learning_rate": LEARNING_RATE},
    }
    rows = result["rows"]
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            model_dir, batch_file = prepare(family, pathlib.Path(tmp), args)
            for contender in args.contenders:
                row = {
                    "family": family,
                    "contender": contender,
                    "bits": args.bits,
                    **run_contender(family, contender, model_dir, batch_file, args),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.gpus > 1 and contender in SCALED:
                    rows.append(scaled_row(row, run_contender(family, contender, model_dir, batch_file, args,
                                                               args.gpus)))
                    print(json.dumps(rows[-1]), flush=True)
                report(result)
    return result


def scaled_row(one: dict, many: dict) -> dict:
    """The N-GPU row of a contender: its result, and tokens/s against the 1-GPU row's (N is ideal)."""
    row = {**{k: one[k] for k in ("family", "contender", "bits")}, **many}
    row["contender"] = f"{one['contender']} x{many.get('gpus', '?')}"
    ok = "error" not in one and "error" not in many
    row["scaling"] = round(many["tokens_per_s"] / one["tokens_per_s"], 2) if ok else None
    return row


def _peer_versions() -> dict:
    import importlib.metadata

    found = {}
    for name in ("peft", "trl", "unsloth", "unsloth_zoo", "liger_kernel"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


PEERS = ("unsloth", "transformers", "transformers+liger")  # the contenders a row's speed and memory are put against


def _against(row: dict, base: dict | None) -> str:
    ok = base is not None and "error" not in base and base["peak_gib"]
    return f"{base['step_ms'] / row['step_ms']:.2f}x, {row['peak_gib'] / base['peak_gib']:.2f}x" if ok else "-"


def markdown(result: dict) -> str:
    """The results table, with a (speed, memory) column against each peer this run has rows of."""
    peers = [p for p in PEERS if any(r["contender"] == p for r in result["rows"])]
    lines = [
        f"# QLoRA fine-tuning step per family ({result['setup']['bits']}-bit base) — {result['device']}, "
        f"{result['date']}",
        "",
        "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"setup: {result['setup']}",
        "",
        "| family | contender | step ms | tokens/s | peak GiB | "
        + "".join(f"vs {p} (speed, memory) | " for p in peers)
        + "LoRA params | first loss |",
        "|---|---|---|---|---|" + "---|" * len(peers) + "---|---|",
    ]
    by_key = {(r["family"], r["contender"]): r for r in result["rows"]}
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['family']} | {row['contender']} | did not run: {row['error'][:160]} |"
                         + "|" * (len(peers) + 5))
            continue
        scaling = f" ({row['scaling']}x the tokens/s of 1 GPU)" if row.get("scaling") else ""
        ratios = "".join(f"{_against(row, by_key.get((row['family'], p)))} | " for p in peers)
        lines.append(
            f"| {row['family']} | {row['contender']}{scaling} | {row['step_ms']} | {row['tokens_per_s']} | "
            f"{row['peak_gib']} | {ratios}{row['lora_parameters']:,} | {row['first_loss']} |"
        )
    return "\n".join(lines) + "\n"


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload's options, shared with finetune_ablation.py."""
    parser.add_argument("--bits", type=int, default=4, choices=(4, 16))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--text-layers", type=int, default=6)
    parser.add_argument("--vision-layers", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check: 1 layer, short text, 1 step")


def workload_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parsed options, shrunk to the smoke workload where --smoke asks for it."""
    args = parser.parse_args(argv)
    if args.smoke:
        args.text_layers, args.vision_layers, args.batch, args.tokens, args.warmup, args.steps = 1, 1, 1, 16, 1, 1
    return args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=None)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    add_workload_arguments(parser)
    parser.add_argument("--suffix", default="", help="appended to the result file names")
    parser.add_argument("--profile", metavar="DIR", help="write each contender's top GPU kernels to DIR (a worker: "
                        "the file)")
    parser.add_argument("--gpus", type=int, default=1, help="also run optimized and reference data-parallel on "
                        "this many GPUs under torchrun (gloo ranks on the CPU) and report the scaling")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", default=None, help=argparse.SUPPRESS)
    args = workload_args(parser, argv)
    if args.worker:
        args.contender = args.worker
        return worker(args)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import model as model_bench

    args.families = args.families or list(model_bench.FAMILIES)
    if args.profile:
        pathlib.Path(args.profile).mkdir(parents=True, exist_ok=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "finetune-" + ("smoke" if args.smoke else model_bench.card().replace(" ", "_")) + args.suffix

    def write(result: dict) -> None:
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(markdown(result))

    result = run(args, report=write)  # written after every row: --families and --contenders take at least one
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
