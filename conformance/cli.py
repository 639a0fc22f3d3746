"""The `fastvision` command: demo, inspect, conformance, zoo.

    fastvision demo [--family F] [--backend reference|optimized] [--4bit|--8bit|--16bit]
    fastvision inspect MODEL_OR_DIR [--backend ...] [--4bit|--8bit|--16bit]
    fastvision conformance --backend X [--device D] [--junit PATH] [--json PATH]
    fastvision zoo [--family F]

With no model named, demo uses the tiny offline checkpoint of the family (`conformance.zoo`), so it
runs on a machine with no network.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time

from conformance import zoo
from conformance.families import FAMILIES
from conformance.plugin import PROFILES

MODES = {
    "4bit": {"load_in_4bit": True},
    "8bit": {"load_in_4bit": False, "load_in_8bit": True},
    "16bit": {"load_in_4bit": False},
}


@contextlib.contextmanager
def _step(name: str, timings: list):
    start = time.perf_counter()
    yield
    timings.append((name, time.perf_counter() - start))


def _add_load_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="reference", help="reference, optimized, or a module path")
    bits = parser.add_mutually_exclusive_group()
    for mode in MODES:
        bits.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode)
    parser.set_defaults(mode="4bit")


def _load(model_name: str, backend_name: str, mode: str, timings: list):
    backend = importlib.import_module(backend_name)
    with _step("load", timings):
        return backend.FastVisionModel.from_pretrained(model_name, **MODES[mode])


def print_plan(model) -> None:
    plan = model.quantization_plan
    rows = [("module", "kind", "dtype", "reason"), *plan.table()]
    widths = [max(len(str(row[i])) for row in rows) for i in range(3)]
    print(f"quantization plan ({plan.mode}, decided by {plan.source}):")
    for row in rows:
        print("  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    counts = {kind: sum(1 for e in plan.entries if e.kind == kind) for kind in {e.kind for e in plan.entries}}
    print("  totals: " + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())))


def print_memory(model) -> None:
    footprint = model.get_memory_footprint()
    devices = sorted({str(p.device) for p in model.parameters()})
    print(f"model memory: {footprint / 2**20:.2f} MiB on {', '.join(devices)} (backend {model.fastvision_backend})")


def _print_timings(timings: list) -> None:
    print("timings: " + ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in timings))


def demo(args) -> int:
    timings: list = []
    model_name = args.model
    if model_name is None:
        with _step("build tiny checkpoint", timings):
            model_name = str(zoo.checkpoint(args.family))
    model, processor = _load(model_name, args.backend, args.mode, timings)
    print_plan(model)
    print_memory(model)
    prompt = "What is in this image?"
    with _step("process", timings):
        inputs = processor(
            text=[_chat(processor, prompt)], images=[[zoo.sample_image()]], return_tensors="pt", padding=True
        ).to(model.device)
    with _step("generate", timings):
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    print(f"user: {prompt} [with a generated {zoo.sample_image().size[0]}x{zoo.sample_image().size[1]} image]")
    print(f"model: {answer!r}" + (" (random tiny weights: the words mean nothing)" if args.model is None else ""))
    _print_timings(timings)
    return 0


def _chat(processor, prompt: str) -> str:
    return processor.apply_chat_template(zoo.sample_conversation(prompt), add_generation_prompt=True, tokenize=False)


def inspect_model(args) -> int:
    timings: list = []
    model, _ = _load(args.model, args.backend, args.mode, timings)
    print(f"{args.model}: {type(model).__name__}, family {model.fastvision_family}")
    family = FAMILIES[model.fastvision_family]
    print(
        f"  attention served by {model.config._attn_implementation}: vision {family.vision_attention_class}, "
        f"text {family.text_attention_class}"
    )
    print_plan(model)
    print_memory(model)
    _print_timings(timings)
    return 0


def conformance(args) -> int:
    from conformance.runner import run_conformance

    workers = ["-n", str(args.workers)] if args.workers > 1 else []  # pytest-xdist
    return run_conformance(args.backend, device=args.device, junit=args.junit, json_path=args.json, extra_args=workers,
                           profile=args.profile)  # fmt: skip


def build_zoo(args) -> int:
    for family in [args.family] if args.family else zoo.FAMILIES:
        print(f"{family}: {zoo.checkpoint(family)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvision", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="load a model, print its plan and memory, answer a prompt about an image")
    p.add_argument("--family", default="qwen2_vl", choices=zoo.FAMILIES)
    p.add_argument("--model", default=None, help="a checkpoint instead of the family's tiny one")
    p.add_argument("--max-new-tokens", type=int, default=12)
    _add_load_flags(p)
    p.set_defaults(run=demo)
    p = commands.add_parser("inspect", help="print the quantization plan and memory of any checkpoint")
    p.add_argument("model", help="a local directory or a hub id")
    _add_load_flags(p)
    p.set_defaults(run=inspect_model)
    p = commands.add_parser("conformance", help="run the conformance suite against a backend")
    p.add_argument("--backend", required=True)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--junit", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--workers", type=int, default=1, help="run the suite in this many processes (pytest-xdist)")
    p.add_argument("--profile", default=None, choices=tuple(PROFILES),
                   help="hypothesis profile: dev (default), ci (CI=1: fixed examples), gpu, thorough (>= 1,000 "
                   "drawn load calls per family)")  # fmt: skip
    p.set_defaults(run=conformance)
    p = commands.add_parser("zoo", help="build the tiny offline checkpoints and print where they are")
    p.add_argument("--family", default=None, choices=zoo.FAMILIES)
    p.set_defaults(run=build_zoo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
