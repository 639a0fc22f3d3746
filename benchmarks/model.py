"""One 4-bit training step per family: optimized vs reference vs plain transformers, side by side.

For each family a random-weight checkpoint with the real widths of a representative model
(Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-4B, Llava-1.5-7B, Pixtral-12B, Mistral-Small-3.1-24B, Gemma3-4B) and
the same cut layer count for every contender, loaded in 4-bit (language-model linears NF4, the rest 16-bit:
the same placement for all three, so only attention and patches differ). A step is forward + backward with
the base frozen and input gradients on, on 4 samples of one image plus text, about 2,000 tokens each. Step
time is the median of >= 10 timed steps after warm-up; memory is the peak allocated during them.

    python benchmarks/model.py                 # on the GPU: writes benchmarks/results/model-<card>.{json,md}
    python benchmarks/model.py --smoke         # CPU plumbing check: 1 layer, short text, 1 step
    python benchmarks/model.py --profile DIR   # also write each contender's top GPU kernels to DIR

Tokens, images and processors come from the tiny zoo checkpoint of the family (its tokenizer and chat
template), with the image processor set to the real model's image size.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from widths import FAMILIES, TEXT_LAYERS, VISION_LAYERS  # noqa: E402  (the benchmarks' sys.path)

from conformance import inputs as zoo_inputs  # noqa: E402
from conformance import zoo  # noqa: E402


# ------------------------------------------------------------------------------------------ checkpoints
def real_config(family: str, text_layers: int, vision_layers: int):
    """The zoo config (right class, token ids that match the zoo tokenizer) at the real widths."""
    bench = FAMILIES[family]
    config = AutoConfig.from_pretrained(zoo.checkpoint(family))
    text = {k: v for k, v in bench.text.items() if k != "mrope_section"}
    config.text_config.update({**text, "num_hidden_layers": text_layers})
    if getattr(config.text_config, "layer_types", None) is not None:  # one entry per layer, validated on load
        layer_types = text.get("layer_types") or [config.text_config.layer_types[0]] * TEXT_LAYERS
        config.text_config.layer_types = layer_types[-text_layers:]
    if "head_dim" not in text:
        config.text_config.head_dim = text["hidden_size"] // text["num_attention_heads"]
    if "mrope_section" in bench.text:
        config.text_config.rope_parameters = {
            **config.text_config.rope_parameters,
            "mrope_section": bench.text["mrope_section"],
        }
    config.vision_config.update({**bench.vision, bench.vision_depth_key: vision_layers})
    for key, value in bench.top.items():
        setattr(config, key, value)
    return config


def real_processor(family: str):
    """The zoo processor with the image processor at the representative model's image size."""
    processor = AutoProcessor.from_pretrained(zoo.checkpoint(family))
    processor.tokenizer.model_max_length = 1 << 20  # the zoo tokenizer's 1024 would warn at 2,000 tokens
    bench = FAMILIES[family]
    return bench.resize(processor, bench.processor)


def build_checkpoint(family: str, out_dir: pathlib.Path, text_layers: int, vision_layers: int) -> pathlib.Path:
    config = real_config(family, text_layers, vision_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    real_processor(family).save_pretrained(out_dir)
    del model
    _free()
    return out_dir


# ------------------------------------------------------------------------------------------ inputs
def step_inputs(processor, family: str, batch: int, tokens: int):
    """`batch` identical-length samples of one image plus filler text, about `tokens` tokens each."""
    image = zoo.sample_image(0, FAMILIES[family].image_size)
    words = 8
    while True:
        prompt = " ".join(["colour shape light"] * words)
        sample = processor(text=zoo_inputs.chat_texts(processor, [prompt]), images=[[image]], return_tensors="pt")
        length = sample["input_ids"].shape[1]
        if length >= tokens or words > 20000:
            break
        words = max(words + 1, int(words * tokens / max(length, 1)))
    texts = zoo_inputs.chat_texts(processor, [prompt] * batch)
    return processor(text=texts, images=[[image]] * batch, return_tensors="pt", padding=True)


# ------------------------------------------------------------------------------------------ contenders
def skip_modules(model_dir) -> list[str]:
    """The 16-bit parts, named as fastvision names them, so the plain contender has the same placement."""
    from reference.families import family_of
    from reference.quantization import skip_modules as fastvision_skip

    return fastvision_skip(family_of(AutoConfig.from_pretrained(model_dir)), quantize_vision=False)


def load_contender(name: str, model_dir: pathlib.Path, dtype: torch.dtype):
    if name == "transformers":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip_modules(model_dir),
        )
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, quantization_config=config, dtype=dtype, device_map=_device()
        )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    backend = __import__(name)
    model, _ = backend.FastVisionModel.from_pretrained(
        str(model_dir), load_in_4bit=True, dtype=dtype, use_gradient_checkpointing=False, max_seq_length=4096
    )
    model.enable_input_require_grads()
    return model


def training_step(model, batch):
    """One forward+backward with labels = input ids, as the benchmark times it."""

    def step():
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()

    return step


def time_steps(model, batch, warmup: int, steps: int) -> tuple[float, float]:
    """(median step ms, peak GiB) of forward+backward with labels = input ids."""
    batch = batch.to(_device())
    model.train()
    median, peak, _ = median_step(training_step(model, batch), warmup, steps)
    return median, peak


def median_step(step, warmup: int, steps: int) -> tuple[float, float, object]:
    """(median ms of `steps` timed calls of `step` after `warmup` untimed ones, peak GiB allocated during the
    timed ones (NaN on the CPU), what the first call returned)."""
    first = step() if warmup > 0 else None
    for _ in range(max(0, warmup - 1)):
        step()
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync()
        times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return statistics.median(times), peak, first


def profile_steps(model, batch, steps: int = 2, top: int = 30) -> str:
    """Where a step's GPU time goes: the `top` kernels by total device time over `steps` steps."""
    return profile_calls(training_step(model, batch.to(_device())), steps, top)


def profile_calls(step, steps: int = 2, top: int = 30) -> str:
    """The `top` kernels (ops on the CPU) by total device time over `steps` calls of `step`, under a line
    that says whether the calls are host-bound: wall time, the time the GPU ran any kernel, and launches."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync()
        wall_us = (time.perf_counter() - start) * 1e6
    sort_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=top, max_name_column_width=90)
    return timeline_line(list(prof.events()), steps, wall_us) + "\n\n" + table


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def timeline_line(events, steps: int, wall_us: float) -> str:
    """Per call: wall ms, GPU-busy ms (the union of the kernels' intervals: overlapping kernels count
    once) and its share of the wall, and kernel launches. A step whose GPU is busy well under its wall
    time waits on the host, and a faster kernel will not shorten it. Measured under the profiler, whose
    cost per op lengthens the host side: compare contenders' lines, not a line with an unprofiled step."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    launches = sum(e.name in LAUNCHES for e in events)
    busy = busy_us(spans)
    return (f"per call: wall {wall_us / steps / 1e3:.2f} ms; GPU busy {busy / steps / 1e3:.2f} ms "
            f"({100 * busy / wall_us:.0f}% of wall); {launches / steps:.0f} kernel launches")


def busy_us(spans) -> float:
    """The length of the union of sorted (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


# ------------------------------------------------------------------------------------------ plumbing
def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def versions() -> dict:
    import bitsandbytes
    import triton

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "cuda": torch.version.cuda,
    }


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def run(args) -> dict:
    rows = []
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    for family in args.families:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = build_checkpoint(family, pathlib.Path(tmp), args.text_layers, args.vision_layers)
            batch = step_inputs(AutoProcessor.from_pretrained(model_dir), family, args.batch, args.tokens)
            for contender in args.contenders:
                model = load_contender(contender, model_dir, dtype)
                step_ms, peak = time_steps(model, batch, args.warmup, args.steps)
                if args.profile:
                    table = profile_steps(model, batch)
                    pathlib.Path(args.profile, f"{family}-{contender}.txt").write_text(table)
                rows.append(
                    {
                        "family": family,
                        "contender": contender,
                        "step_ms": round(step_ms, 2),
                        "peak_gib": round(peak, 3),
                        "tokens": int(batch["input_ids"].numel()),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                del model
                _free()
    return {
        "device": card(),
        "versions": versions(),
        "date": datetime.date.today().isoformat(),
        "rows": rows,
        "setup": setup(args),
    }


def setup(args) -> dict:
    """The sizes a step benchmark ran at, recorded beside its rows."""
    names = ("batch", "tokens", "text_layers", "vision_layers", "warmup", "steps")
    return {("tokens_per_sample" if n == "tokens" else n): getattr(args, n) for n in names}


def markdown(result: dict) -> str:
    lines = [
        f"# One 4-bit training step per family — {result['device']}, {result['date']}",
        "",
        "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"setup: {result['setup']}",
        "",
        "| family | contender | step ms | peak GiB | speed-up vs transformers | memory vs transformers |",
        "|---|---|---|---|---|---|",
    ]
    by_key = {(r["family"], r["contender"]): r for r in result["rows"]}
    for row in result["rows"]:
        base = by_key.get((row["family"], "transformers"))
        speedup = f"{base['step_ms'] / row['step_ms']:.2f}x" if base else "-"
        memory = f"{row['peak_gib'] / base['peak_gib']:.2f}x" if base and base["peak_gib"] == base["peak_gib"] else "-"
        lines.append(
            f"| {row['family']} | {row['contender']} | {row['step_ms']} | {row['peak_gib']} | {speedup} | {memory} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--contenders", nargs="+", default=["optimized", "reference", "transformers"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--text-layers", type=int, default=TEXT_LAYERS)
    parser.add_argument("--vision-layers", type=int, default=VISION_LAYERS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--profile", metavar="DIR", help="write each contender's top GPU kernels to DIR")
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check: 1 layer, short text, 1 step")
    args = parser.parse_args(argv)
    if args.smoke:
        args.text_layers, args.vision_layers, args.batch, args.tokens, args.warmup, args.steps = 1, 1, 1, 16, 0, 1
    if args.profile:
        pathlib.Path(args.profile).mkdir(parents=True, exist_ok=True)
    result = run(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "model-" + ("smoke" if args.smoke else card().replace(" ", "_"))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
