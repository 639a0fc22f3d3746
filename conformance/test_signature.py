"""`from_pretrained`'s signature on all three entry points: names, order, kinds and defaults as in
docs/contract.md, so code written for Unsloth's loader runs unchanged; and the class relations it states."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers

from conformance import checks, families, zoo

ENTRIES = ("FastVisionModel", "FastModel", "FastBaseModel")

# docs/contract.md's default: Unsloth's AutoModelForVision2Seq where transformers still has it, else
# AutoModelForImageTextToText (transformers 5 removed the old name).
DEFAULT_AUTO_MODEL = getattr(transformers, "AutoModelForVision2Seq", transformers.AutoModelForImageTextToText)

# docs/contract.md's signature, in order, with its defaults; then **kwargs.
SIGNATURE: tuple[tuple[str, object], ...] = (
    ("model_name", "unsloth/Llama-3.2-1B-Instruct"),
    ("max_seq_length", 2048),
    ("dtype", None),
    ("load_in_4bit", True),
    ("load_in_8bit", False),
    ("load_in_16bit", False),
    ("full_finetuning", False),
    ("token", None),
    ("device_map", "sequential"),
    ("trust_remote_code", False),
    ("model_types", None),
    ("tokenizer_name", None),
    ("auto_model", DEFAULT_AUTO_MODEL),
    ("use_gradient_checkpointing", "unsloth"),
    ("supports_sdpa", True),
    ("whisper_language", None),
    ("whisper_task", None),
    ("auto_config", None),
    ("offload_embedding", False),
    ("float32_mixed_precision", None),
    ("fast_inference", False),
    ("gpu_memory_utilization", 0.5),
    ("float8_kv_cache", False),
    ("random_state", 3407),
    ("max_lora_rank", 64),
    ("disable_log_stats", False),
    ("unsloth_vllm_standby", False),
)


def _signature(backend, entry: str) -> inspect.Signature:
    return inspect.signature(getattr(backend, entry).from_pretrained)


def _same(actual, expected) -> bool:
    # `True == 1` and `0.5 == 0.5000`: a default must have the contract's type as well as its value.
    return actual is expected or (type(actual) is type(expected) and actual == expected)


@pytest.mark.parametrize("entry", ENTRIES)
def test_parameter_names_and_order(backend, entry):
    params = list(_signature(backend, entry).parameters.values())
    names = [p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    repro = f"inspect.signature({entry}.from_pretrained)"
    checks.check_equal(names, [name for name, _ in SIGNATURE], f"{entry}.from_pretrained parameters", repro=repro)
    checks.check(params[-1].kind is inspect.Parameter.VAR_KEYWORD,
                 f"{entry}.from_pretrained does not end with **kwargs: {params[-1]}", repro=repro)


@pytest.mark.parametrize("entry", ENTRIES)
def test_parameters_are_positional_or_keyword(backend, entry):
    # Unsloth's parameters can all be passed by position; code that does must keep working.
    params = _signature(backend, entry).parameters.values()
    wrong = [f"{p.name} ({p.kind.description})" for p in params
             if p.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_KEYWORD)]
    checks.check(not wrong, f"{entry}.from_pretrained parameters not positional-or-keyword: {wrong}",
                 repro=f"inspect.signature({entry}.from_pretrained)")


@pytest.mark.parametrize("entry", ENTRIES)
def test_defaults(backend, entry):
    params = _signature(backend, entry).parameters
    wrong = [
        f"{name}: {params[name].default!r} (contract: {default!r})"
        for name, default in SIGNATURE
        if name in params and not _same(params[name].default, default)
    ]
    checks.check(not wrong, f"{entry}.from_pretrained defaults differ from docs/contract.md: {wrong}",
                 repro=f"inspect.signature({entry}.from_pretrained)")


def test_positional_arguments_land_in_their_parameters(backend):
    # The signature is behaviour, not only metadata: (model_name, max_seq_length, dtype, load_in_4bit)
    # passed by position must mean what their names say.
    args = (zoo.checkpoint("llava"), 333, torch.float32, False)
    repro = 'FastVisionModel.from_pretrained(zoo.checkpoint("llava"), 333, torch.float32, False)'
    with checks.reproducing(repro):
        model, _ = backend.FastVisionModel.from_pretrained(*args)
    checks.check_equal(getattr(model, "max_seq_length", None), 333, "model.max_seq_length", repro=repro)
    checks.check_equal(model.get_input_embeddings().weight.dtype, torch.float32, "embedding dtype", repro=repro)
    quantized = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    checks.check(not quantized, f"load_in_4bit=False by position still quantized {quantized[:3]}", repro=repro)


def test_fast_vision_model_subclasses_fast_model(backend):
    subclass = issubclass(backend.FastVisionModel, backend.FastModel)
    repro = "issubclass(FastVisionModel, FastModel)"
    checks.check(subclass, "FastVisionModel is not a subclass of FastModel", repro=repro)


@pytest.mark.parametrize("entry", ("FastModel", "FastVisionModel"))
def test_entry_points_delegate_to_fast_base_model(backend, entry, monkeypatch):
    # Whether FastModel inherits FastBaseModel.from_pretrained or calls it, replacing it must reach
    # every entry point: one loader, three names.
    calls = []
    sentinel = (object(), object())

    def spy(cls, *args, **kwargs):
        calls.append((args, kwargs))
        return sentinel

    monkeypatch.setattr(backend.FastBaseModel, "from_pretrained", classmethod(spy))
    path = zoo.checkpoint("llava")
    result = getattr(backend, entry).from_pretrained(path, max_seq_length=77)
    call = checks.call(checks.zoo_path("llava"), entry, max_seq_length=77)
    repro = f"patch FastBaseModel.from_pretrained, then {call}"
    checks.check(len(calls) == 1, f"{entry}.from_pretrained called FastBaseModel.from_pretrained {len(calls)} times",
                 repro=repro)
    checks.check(result is sentinel, f"{entry}.from_pretrained did not return FastBaseModel's result", repro=repro)


def test_suite_knows_every_zoo_family():
    # The suite's family records and the zoo's recipes must name the same families, or some go untested.
    checks.check_equal(set(families.NAMES), set(zoo.RECIPES), "conformance.families vs zoo.RECIPES",
                       repro="from conformance import families, zoo")


# The contract document ships in the repository beside the packages; the suite keeps its signature true.
CONTRACT_DOC = Path(__file__).resolve().parents[1] / "docs" / "contract.md"


def documented_signature(text: str) -> list[tuple[str, str]]:
    """(name, default source text) of the first `from_pretrained(` call in the document's python blocks."""
    block = re.search(r"```python\n(FastBaseModel\.from_pretrained\((.*?)\) -> )", text, re.S)
    if block is None:
        raise AssertionError("docs/contract.md has no ```python block with FastBaseModel.from_pretrained(...)")
    return re.findall(r"(\w+)=((?:<[^>]*>)|[^,]+?)(?=,\s|\s*$)", block.group(2).replace("\n", " "))


def test_the_documented_signature_is_the_contract():
    repro = "conformance.test_signature.documented_signature(open('docs/contract.md').read())"
    documented = documented_signature(CONTRACT_DOC.read_text())
    checks.check_equal([name for name, _ in documented], [name for name, _ in SIGNATURE],
                       "parameters in docs/contract.md", repro=repro)
    wrong = [f"{name}: {text} (contract: {default!r})" for (name, text), (_, default) in zip(documented, SIGNATURE)
             if not text.startswith("<") and not _same(ast.literal_eval(text), default)]
    checks.check(not wrong, f"defaults in docs/contract.md differ from the contract: {wrong}", repro=repro)


def test_help_points_to_the_shipped_contract(backend):
    doc = inspect.getdoc(backend.FastBaseModel.from_pretrained) or ""
    checks.check("docs/contract.md" in doc, f"help(FastBaseModel.from_pretrained) does not point to docs/contract.md: "
                 f"{doc!r}", repro="help(FastBaseModel.from_pretrained)")


def documented_peft_signature(text: str) -> list[tuple[str, str]]:
    """(name, default source text) of `FastVisionModel.get_peft_model(` in the document, after `model`."""
    block = re.search(r"FastVisionModel\.get_peft_model\(\s*model,(.*?)\*\*kwargs\)", text, re.S)
    if block is None:
        raise AssertionError("docs/contract.md has no FastVisionModel.get_peft_model(model, ..., **kwargs) block")
    return re.findall(r"(\w+)=((?:TaskType\.\w+)|[^,]+?)(?=,\s|\s*$)", block.group(1).replace("\n", " "))


@pytest.mark.parametrize("entry", ENTRIES)
def test_get_peft_model_has_the_documented_signature(backend, entry):
    documented = documented_peft_signature(CONTRACT_DOC.read_text())
    params = [p for p in inspect.signature(getattr(backend, entry).get_peft_model).parameters.values()]
    repro = f"inspect.signature({entry}.get_peft_model)"
    names = [p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    checks.check_equal(names, ["model", *(name for name, _ in documented)], "get_peft_model parameters", repro=repro)
    defaults = {p.name: p.default for p in params}
    wrong = []
    for name, text in documented:
        got = defaults[name]
        if text.startswith("TaskType."):  # a str enum: its value, or the string itself
            same = str(getattr(got, "value", got)) == text.split(".", 1)[1]
        else:
            same = _same(got, ast.literal_eval(text))
        if not same:
            wrong.append(f"{name}: {got!r} (contract: {text})")
    checks.check(not wrong, f"{entry}.get_peft_model defaults differ from docs/contract.md: {wrong}", repro=repro)
    checks.check(params[-1].kind is inspect.Parameter.VAR_KEYWORD, "get_peft_model does not end with **kwargs",
                 repro=repro)
