"""The `fastvision` command: demo, inspect, conformance, audit, zoo.

    fastvision demo [--family F] [--backend reference|optimized] [--4bit|--8bit|--16bit] [--train]
    fastvision inspect MODEL_OR_DIR [--backend ...] [--4bit|--8bit|--16bit] [--lora]
    fastvision conformance --backend X [--device D] [--junit PATH] [--json PATH] [--profile P]
    fastvision audit [MODEL_OR_DIR] [--backend X] [--family F] [--json PATH] [--plot PATH] [--baseline OLD.json]
    fastvision zoo [--family F]

With no model named, demo uses the tiny offline checkpoint of the family (`conformance.zoo`), so it
runs on a machine with no network. Only the light modules are imported before the arguments are parsed:
`--help` and `--version` need no torch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

from conformance.families import NAMES
from conformance.profiles import PROFILES

# 300 steps of 2 samples (~20-27 s on 2 CPU cores) teach a tiny random zoo model to answer "The square is
# <colour>." about squares it never saw, the colour right for 1 (qwen2_vl, gemma3) to 3 (llava, pixtral) of 3.
TRAIN_STEPS = 300
MODES = {
    "4bit": {"load_in_4bit": True},
    "8bit": {"load_in_4bit": False, "load_in_8bit": True},
    "16bit": {"load_in_4bit": False},
}


def _add_load_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="reference", help="reference (default), optimized, or a module path")
    bits = parser.add_mutually_exclusive_group()
    for mode, text in (("4bit", "load in 4-bit (NF4) (default)"), ("8bit", "load in 8-bit (LLM.int8)"),
                       ("16bit", "load in 16-bit")):
        bits.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode, help=text)
    parser.set_defaults(mode="4bit")


def _version() -> str:
    try:
        return importlib.metadata.version("fastvision")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def _command(name: str):
    """The subcommand's function, imported when it runs."""

    def run(args):
        return getattr(importlib.import_module("conformance.commands"), name)(args)

    return run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"fastvision {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _demo_parser(commands)
    p = commands.add_parser("inspect", help="print the quantization plan (and --lora: the LoRA plan) and memory of a "
                            "checkpoint")
    p.add_argument("model", help="a local directory or a hub id")
    p.add_argument("--lora", action="store_true", help="also attach get_peft_model's default adapters and print "
                   "where each linear layer's LoRA goes, or why it stays frozen")
    _add_load_flags(p)
    p.set_defaults(run=_command("inspect_model"))
    p = commands.add_parser("conformance", help="run the conformance suite against a backend")
    p.add_argument("--backend", required=True, help="the backend under test: reference, optimized, or a module path")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the suite runs (default cpu)")
    p.add_argument("--junit", default=None, metavar="PATH", help="write a JUnit XML report here")
    p.add_argument("--json", default=None, metavar="PATH", help="write a JSON summary (area x family) here")
    p.add_argument("--workers", type=int, default=1, help="run the suite in this many processes (pytest-xdist)")
    p.add_argument("--profile", default=None, choices=tuple(PROFILES),
                   help="hypothesis profile: dev (default), ci (CI=1: fixed examples), gpu, thorough (1,000 drawn "
                   "load calls per family)")
    p.set_defaults(run=_command("conformance"))
    _audit_parser(commands)
    p = commands.add_parser("zoo", help="build the tiny offline checkpoints and print where they are")
    p.add_argument("--family", default=None, choices=NAMES, help="only this family (default: all)")
    p.set_defaults(run=_command("build_zoo"))
    return parser


def _audit_parser(commands) -> None:
    p = commands.add_parser("audit", help="compare a backend with transformers layer by layer: table, JSON report, "
                            "plot, baseline gate (exit 1 on a regression)")
    p.add_argument("model", nargs="?", default=None, help="a checkpoint directory or hub id (default: the tiny "
                   "checkpoint of --family)")
    p.add_argument("--backend", default="optimized", help="the backend audited: optimized (default), reference, or a "
                   "module path")
    p.add_argument("--family", default="qwen2_vl", choices=NAMES, help="the tiny checkpoint's family, when no model "
                   "is named")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="the backend's dtype (default: the contract's, float32 on the CPU, bf16 on a GPU)")
    bits = p.add_mutually_exclusive_group()
    bits.add_argument("--4bit", dest="mode", action="store_const", const="4bit", help="language model in NF4; the "
                      "judge and yardstick quantized the same way")
    bits.add_argument("--16bit", dest="mode", action="store_const", const="16bit", help="16-bit weights (default)")
    p.set_defaults(mode="16bit")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the three models run")
    p.add_argument("--seed", type=int, default=0, help="the seed of the audit batch's images (default 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the versioned JSON report here")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of the error per layer here")
    p.add_argument("--baseline", default=None, metavar="OLD.json", help="an earlier report of the same checkpoint "
                   "and inputs: exit 1 if a layer's error grew, or the layers, plan or inputs differ")
    p.add_argument("--max-growth", type=float, default=1.5, help="how much a layer's error may grow over the "
                   "baseline's (default 1.5x)")
    p.set_defaults(run=_command("audit"))


def _demo_parser(commands) -> None:
    p = commands.add_parser("demo", help="load a model, print its plan and memory, answer a prompt about an image "
                            "(--train: fine-tune it first)")
    p.add_argument("--family", default="qwen2_vl", choices=NAMES, help="the tiny checkpoint's family")
    p.add_argument("--model", default=None, help="a checkpoint instead of the family's tiny one (not with --train)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="how many tokens to generate")
    p.add_argument("--train", action="store_true", help="fine-tune with LoRA and TRL's SFTTrainer on generated image/"
                   "caption pairs, save the adapter, reload it, generate")
    p.add_argument("--steps", type=int, default=TRAIN_STEPS, help=f"training steps for --train, 2 samples each "
                   f"(default {TRAIN_STEPS}, about 25 s on 2 CPU cores)")
    p.add_argument("--out", default=None, metavar="DIR", help="where --train saves the adapter (default: a temp dir)")
    _add_load_flags(p)
    p.set_defaults(run=_command("demo"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
