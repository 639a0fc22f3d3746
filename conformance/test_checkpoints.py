"""Damaged and hostile checkpoints: each is refused with a `CheckpointError` (a `ValueError`) that names
the file and what is wrong, never with whatever a library deep inside the load happens to raise, and
nothing is left behind: no model object alive, device memory as it was.

Each case copies a zoo checkpoint into tmp_path and damages it one way. Cases a file header shows
(truncation, random bytes, a missing shard, a shape the config disagrees with) must be refused before
any weight is read; the suite checks the outcome a user sees, and that the refusal costs nothing.
Pickled weights are refused unless the caller passes `use_safetensors=False`, and then give the same
model as the safetensors checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conformance import checks, inputs, zoo
from conformance.families import FAMILIES

FAMILY = "llava"
SIXTEEN_BIT = {"load_in_4bit": False}
PROCESSOR_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
}


def _copy(tmp_path: pathlib.Path, family: str = FAMILY) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(zoo.checkpoint(family), tmp_path / "checkpoint"))


def _truncate(path: pathlib.Path) -> str:
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 4096])
    return "model.safetensors"


def _random_bytes(path: pathlib.Path) -> str:
    weights = path / "model.safetensors"
    weights.write_bytes(os.urandom(weights.stat().st_size))
    return "model.safetensors"


def _empty_file(path: pathlib.Path) -> str:
    (path / "model.safetensors").write_bytes(b"")
    return "model.safetensors"


def _sharded(path: pathlib.Path) -> dict[str, str]:
    """Split the weights into two shards with an index, as large checkpoints are saved."""
    weights = load_file(path / "model.safetensors")
    names = sorted(weights)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for shard, keys in halves.items():
        save_file({k: weights[k] for k in keys}, path / shard, metadata={"format": "pt"})
    (path / "model.safetensors").unlink()
    weight_map = {key: shard for shard, keys in halves.items() for key in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _missing_shard(path: pathlib.Path) -> str:
    _sharded(path)
    (path / "model-00002-of-00002.safetensors").unlink()
    return "model-00002-of-00002.safetensors"


def _index_not_json(path: pathlib.Path) -> str:
    _sharded(path)
    (path / "model.safetensors.index.json").write_text("{ not json")
    return "model.safetensors.index.json"


def _wrong_shape(path: pathlib.Path) -> str:
    weights = load_file(path / "model.safetensors")
    key = next(k for k in sorted(weights) if k.endswith("layers.0.self_attn.q_proj.weight") and "language" in k)
    weights[key] = weights[key][:-1].clone()  # one output row short of what the config says
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return "q_proj"


def _no_tensors(path: pathlib.Path) -> str:
    save_file({}, path / "model.safetensors", metadata={"format": "pt"})
    return "model.safetensors"


def _no_weights(path: pathlib.Path) -> str:
    (path / "model.safetensors").unlink()
    return str(path)


def _another_models_weights(path: pathlib.Path) -> str:
    save_file({"encoder.block.0.weight": torch.zeros(4, 4)}, path / "model.safetensors", metadata={"format": "pt"})
    return "model.safetensors"


def _config_not_json(path: pathlib.Path) -> str:
    (path / "config.json").write_text('{"model_type": "llava", ')
    return "config.json"


def _no_config(path: pathlib.Path) -> str:
    (path / "config.json").unlink()
    return "config.json"


def _processor_config_not_json(path: pathlib.Path) -> str:
    (path / "processor_config.json").write_bytes(os.urandom(64))
    return "processor_config.json"


def _no_processor(path: pathlib.Path) -> str:
    for name in PROCESSOR_FILES:
        (path / name).unlink(missing_ok=True)
    return "tokenizer_name"


# case -> (damage(path) -> a text the error must contain, load kwargs)
DAMAGES = {
    "truncated safetensors": (_truncate, SIXTEEN_BIT),
    "truncated safetensors, 4-bit": (_truncate, {}),
    "random bytes": (_random_bytes, SIXTEEN_BIT),
    "empty weights file": (_empty_file, SIXTEEN_BIT),
    "index names a missing shard": (_missing_shard, SIXTEEN_BIT),
    "index not JSON": (_index_not_json, SIXTEEN_BIT),
    "weight shape disagrees with the config": (_wrong_shape, SIXTEEN_BIT),
    "weight shape disagrees with the config, 4-bit": (_wrong_shape, {}),
    "weights file with no tensors": (_no_tensors, SIXTEEN_BIT),
    "no weights": (_no_weights, SIXTEEN_BIT),
    "another model's weights": (_another_models_weights, SIXTEEN_BIT),
    "config.json not JSON": (_config_not_json, SIXTEEN_BIT),
    "no config.json": (_no_config, SIXTEEN_BIT),
    "processor config not JSON": (_processor_config_not_json, SIXTEEN_BIT),
    "no processor files": (_no_processor, SIXTEEN_BIT),
}


def expect_checkpoint_error(backend, device: str, model_name, named: str, repro: str, **kwargs) -> checks.SeenError:
    """The load raises a CheckpointError (a ValueError) naming `named`; afterwards no more modules are
    alive and no more device memory is held than before it (the first call warms caches, so it runs
    twice and the second is measured)."""

    def refused() -> checks.SeenError:
        return checks.expect_error(
            lambda: backend.FastVisionModel.from_pretrained(model_name, **kwargs),
            ValueError,
            names=(named,),
            class_name="CheckpointError",
            repro=repro,
        )

    refused()
    modules, memory = checks.live_modules(), checks.device_memory(device)
    seen = refused()
    checks.check_equal(checks.live_modules(), modules, "live nn.Module objects after the refused load", repro=repro)
    checks.check_equal(checks.device_memory(device), memory, "device memory after the refused load", repro=repro)
    return seen


@pytest.mark.parametrize("case", DAMAGES)
def test_a_damaged_checkpoint_is_a_checkpoint_error_naming_the_file(backend, device, tmp_path, case):
    damage, kwargs = DAMAGES[case]
    path = _copy(tmp_path)
    named = damage(path)
    repro = f"{checks.call(path, device_map=device, **kwargs)}  # {FAMILY} checkpoint with {case}"
    expect_checkpoint_error(backend, device, path, named, repro, device_map=device, **kwargs)


@pytest.mark.parametrize(
    "name", ["/nonexistent/fastvision/checkpoint", "./no-such-checkpoint", "~/no-such-ckpt", "../no/such/checkpoint"]
)
def test_a_path_to_nothing_is_a_checkpoint_error_not_a_hub_lookup(backend, device, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    repro = checks.call(name)
    expect_checkpoint_error(backend, device, name, "model_name", repro)


def _pickled(path: pathlib.Path) -> None:
    """The checkpoint with its weights as a pickle (pytorch_model.bin) instead of safetensors."""
    weights = load_file(path / "model.safetensors")
    torch.save(weights, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


def test_pickled_weights_are_refused_by_default_naming_use_safetensors(backend, device, tmp_path):
    path = _copy(tmp_path)
    _pickled(path)
    repro = f"{checks.call(path, **SIXTEEN_BIT)}  # weights only as pytorch_model.bin"
    seen = expect_checkpoint_error(backend, device, path, "use_safetensors", repro, **SIXTEEN_BIT)
    checks.check(
        "pytorch_model.bin" in seen.message, f"the error does not name the file: {seen.message!r}", repro=repro
    )


def test_pickled_weights_load_with_use_safetensors_false(backend, device, tmp_path):
    path = _copy(tmp_path)
    _pickled(path)
    kwargs = {"use_safetensors": False, "device_map": device, **SIXTEEN_BIT}
    repro = f"{checks.call(path, **kwargs)}  # weights only as pytorch_model.bin"
    with checks.reproducing(repro):
        pickled, processor = backend.FastVisionModel.from_pretrained(path, **kwargs)
        safe, _ = backend.FastVisionModel.from_pretrained(zoo.checkpoint(FAMILY), device_map=device, **SIXTEEN_BIT)
    checks.check_equal(type(pickled).__name__, FAMILIES[FAMILY].model_class, "model class", repro=repro)
    batch = inputs.image_batch(processor).to(device)
    with torch.no_grad():
        same = torch.equal(pickled(**batch).logits, safe(**batch).logits)
    checks.check(same, "the pickled checkpoint gives other logits than its safetensors twin", repro=repro)
