"""The `fastvision` command as a newcomer runs it: the demo's printed plan puts exactly the language
model's linear layers in 4-bit, and inspect/zoo print what they say they print."""

from __future__ import annotations

import pytest
from torch import nn
from transformers import AutoModelForImageTextToText

from conformance import cli, zoo
from conformance.families import FAMILIES


def _printed_plan(output: str) -> dict[str, str]:
    """module -> kind from the plan table the CLI prints (two-space indented rows after its header)."""
    rows = {}
    for line in output.splitlines():
        cells = line.split()
        if line.startswith("  ") and cells[0] != "totals:" and len(cells) >= 3 and cells[1] in ("nf4", "int8", "keep"):
            rows[cells[0]] = cells[1]
    return rows


def _language_model_linears(family: str) -> set[str]:
    model = AutoModelForImageTextToText.from_pretrained(zoo.checkpoint(family))
    root = FAMILIES[family].language_model + "."
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name.startswith(root)}


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_demo_prints_a_plan_with_exactly_the_language_model_linears_in_4bit(family, capsys):
    assert cli.main(["demo", "--family", family, "--max-new-tokens", "2"]) == 0
    output = capsys.readouterr().out
    plan = _printed_plan(output)
    assert {module for module, kind in plan.items() if kind == "nf4"} == _language_model_linears(family)
    assert "model memory:" in output and "model:" in output and "generate" in output


def test_inspect_prints_the_plan_of_a_checkpoint_directory(capsys):
    assert cli.main(["inspect", str(zoo.checkpoint("llava")), "--8bit"]) == 0
    plan = _printed_plan(capsys.readouterr().out)
    assert {module for module, kind in plan.items() if kind == "int8"} == _language_model_linears("llava")


def test_inspect_lora_prints_where_each_linear_gets_an_adapter(capsys):
    assert cli.main(["inspect", str(zoo.checkpoint("llava")), "--16bit", "--lora"]) == 0
    output = capsys.readouterr().out
    rows = [line.split() for line in output.split("LoRA plan", 1)[1].splitlines()[1:] if line.startswith("  model.")]
    lora = {cells[0] for cells in rows if cells[1] == "lora"}
    assert lora and all(".layers." in name for name in lora)  # vision and language layers only, by default
    assert {"model.multi_modal_projector.linear_1", "lm_head"} & {cells[0] for cells in rows if cells[1] == "frozen"}


def test_zoo_prints_every_family_directory(capsys):
    assert cli.main(["zoo"]) == 0
    output = capsys.readouterr().out
    for family in zoo.FAMILIES:
        assert f"{family}: {zoo.checkpoint(family)}" in output


def test_every_subcommand_and_flag_has_help_text():
    import argparse

    parser = cli._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = {choice.dest: choice.help for choice in subparsers._choices_actions}
    assert set(listed) == {"demo", "inspect", "conformance", "audit", "zoo"} and all(listed.values()), listed
    for name, sub in subparsers.choices.items():
        silent = [a.option_strings or [a.dest] for a in sub._actions if not a.help and a.dest != "help"]
        assert not silent, f"fastvision {name}: no help text for {silent}"


def test_help_and_version_need_no_torch():
    # --help and --version answer from the light modules: torch and transformers are imported only by the
    # subcommand that runs.
    import subprocess
    import sys

    code = ("import sys; from conformance import cli\n"
            "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("[]"), done.stdout + done.stderr
    assert "fastvision" in done.stdout


def test_inspect_prints_where_each_module_went(capsys):
    assert cli.main(["inspect", str(zoo.checkpoint("qwen2_vl")), "--16bit"]) == 0
    output = capsys.readouterr().out
    assert "placement (accelerate's device map):" in output
    assert "(whole model)  cpu     whole model" in output
