"""Model-name resolution, observed from outside: the name table, local directories, the offline cache,
and the error for a hub id that is neither local nor cached.

Each test gets its own Hugging Face home under tmp_path holding only the repositories it names (a
zoo checkpoint under the hub's `models--owner--name/snapshots/<commit>` layout), so which repository
a load read is told by which one exists: a load that succeeds read the only one there. Where both twins
of a table pair are cached, the 4-bit one is pre-quantized (`zoo.prequantized`), so which one a load
read shows in its modules. The name resolution follows the load's decided mode: only a load that
quantizes to 4-bit itself reads the twin; `tokenizer_name` resolves the same way as `model_name`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import huggingface_hub
import pytest
import transformers
from torch import nn

from conformance import checks, zoo
from conformance.families import FAMILIES, one_each, params

# One family stands for all where the name table treats every family alike (the tests over `params()` run
# each family's twins); Llava is the plain one: CLIP, a projector, Llama.
EXAMPLE = "llava"
UNKNOWN_ID = "fastvision-conformance/tiny-llava"  # in no name table
UNCACHED_ID = "fastvision-conformance/never-cached"
# A hang guard, not a performance bound: an uncached id offline must fail at once (a lookup in the local
# cache takes milliseconds), while one HTTP attempt waits 10 s by default and retries multiply that.
OFFLINE_ERROR_WITHIN_S = 8.0
# What to do, in the error's words: at least one of these remedies must be named.
REMEDIES = ("download", "HF_HOME", "local director")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    return checks.use_hub_cache(tmp_path / "hf_home", monkeypatch)


def load_id(backend, family: str, model_id: str, **kwargs):
    repro = f"{checks.call(model_id, **kwargs)}  # cache holds a {family} checkpoint"
    with checks.reproducing(repro):
        model, _ = backend.FastVisionModel.from_pretrained(model_id, **kwargs)
    checks.check_equal(type(model).__name__, FAMILIES[family].model_class, "model class", repro=repro)
    return model, repro


@pytest.mark.parametrize("family", params())
def test_4bit_load_of_a_16bit_id_reads_its_4bit_twin(backend, hub_cache, family):
    sixteen, four = FAMILIES[family].four_bit_twin
    hub_cache.add(four, zoo.checkpoint(family))
    load_id(backend, family, sixteen, load_in_4bit=True)


@pytest.mark.parametrize("family", params())
def test_16bit_load_of_a_4bit_id_reads_its_16bit_twin(backend, hub_cache, family):
    sixteen, four = FAMILIES[family].four_bit_twin
    hub_cache.add(sixteen, zoo.checkpoint(family))
    load_id(backend, family, four, load_in_4bit=False)


def test_a_remap_drops_revision_with_a_warning(backend, hub_cache):
    # The revision names a commit of the original repository: passed on to the twin, the offline lookup
    # of that commit would fail, so the load succeeding shows it was dropped.
    sixteen, four = FAMILIES[EXAMPLE].four_bit_twin
    hub_cache.add(four, zoo.checkpoint(EXAMPLE))
    with checks.recording_warnings() as recorded:
        _, repro = load_id(backend, EXAMPLE, sixteen, load_in_4bit=True, revision="0123456789abcdef")
    checks.check_warned(recorded, "revision", repro=repro)


def _offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _language_linears(model, family: str, quantized: bool) -> list[str]:
    lm = model.get_submodule(FAMILIES[family].language_model)
    return [n for n, m in lm.named_modules() if isinstance(m, nn.Linear) and
            (not m.weight.dtype.is_floating_point) == quantized]


# Quantized on load, the plan keeps the vision tower and projector: one family per tower layout (Qwen's
# merger sits inside its tower).
@pytest.mark.parametrize("family", one_each(lambda f: f.vision_tower))
def test_a_missing_twin_gives_the_cached_original_quantized_on_load(backend, hub_cache, monkeypatch, family):
    # docs/contract.md: offline, a table id whose 4-bit twin is not at hand but whose original is cached loads
    # the original and quantizes it as asked, and the plan says so.
    _offline(monkeypatch)
    sixteen, four = FAMILIES[family].four_bit_twin
    hub_cache.add(sixteen, zoo.checkpoint(family))
    model, repro = load_id(backend, family, sixteen, load_in_4bit=True)
    repro += f" (only {sixteen} cached, offline)"
    plan = model.quantization_plan
    checks.check_equal(set(plan.kinds().values()) - {"keep"}, {"nf4"}, "quantized kinds in the plan", repro=repro)
    checks.check(_language_linears(model, family, quantized=True), "no language-model linear is 4-bit", repro=repro)
    notes = " ".join(getattr(plan, "notes", ()))
    checks.check(four in notes and sixteen in notes,
                 f"the plan does not say the twin {four} was replaced by {sixteen}: notes {notes!r}", repro=repro)


def test_neither_twin_nor_original_at_hand_is_an_offline_error_naming_the_twin(backend, hub_cache, monkeypatch):
    _offline(monkeypatch)
    sixteen, four = FAMILIES[EXAMPLE].four_bit_twin
    repro = f"HF_HUB_OFFLINE=1: {checks.call(sixteen, load_in_4bit=True)}  # empty cache"
    checks.expect_offline_error(lambda: backend.FastVisionModel.from_pretrained(sixteen, load_in_4bit=True),
                                names=(four,), repro=repro)


@pytest.fixture
def both_twins(hub_cache):
    """The llava table pair in the cache: the 16-bit original and its pre-quantized -bnb-4bit twin (NF4
    weights and a quantization_config of its own, as on the hub)."""
    sixteen, four = FAMILIES[EXAMPLE].four_bit_twin
    hub_cache.add(sixteen, zoo.checkpoint(EXAMPLE))
    hub_cache.add(four, zoo.prequantized(EXAMPLE))
    return sixteen, four


@pytest.mark.parametrize("model_id", ["sixteen", "four"])
def test_full_finetuning_reads_the_16bit_original(backend, both_twins, model_id):
    # The default load_in_4bit=True must not pick the 4-bit twin: its packed weights cannot train, and
    # full finetuning would silently train only what is not 4-bit.
    name = dict(zip(("sixteen", "four"), both_twins))[model_id]
    with checks.recording_warnings():
        model, repro = load_id(backend, EXAMPLE, name, full_finetuning=True)
    quantized = _language_linears(model, EXAMPLE, quantized=True)
    checks.check(not quantized, f"full finetuning loaded {len(quantized)} 4-bit linears, e.g. {quantized[:2]}",
                 repro=repro)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    checks.check(not frozen, f"full finetuning left {len(frozen)} parameters frozen, e.g. {frozen[:2]}", repro=repro)


def test_a_user_quantization_config_reads_the_16bit_original(backend, both_twins):
    sixteen, _ = both_twins
    config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    repro = f"{checks.call(sixteen, quantization_config=checks.Raw('BitsAndBytesConfig(load_in_8bit=True)'))}"
    with checks.reproducing(repro):
        model, _ = backend.FastVisionModel.from_pretrained(sixteen, quantization_config=config)
    kinds = set(model.quantization_plan.kinds().values()) - {"keep"}
    checks.check_equal(kinds, {"int8"}, "quantized kinds in the plan (the twin's own 4-bit config won?)", repro=repro)


# ------------------------------------------------------------------------------------ tokenizer_name
WEIGHT_FILES = {"config.json", "model.safetensors", "generation_config.json"}


@pytest.fixture
def weights_only(tmp_path):
    """A llava checkpoint directory without its processor files."""
    shutil.copytree(zoo.checkpoint(EXAMPLE), tmp_path / "weights",
                    ignore=lambda _d, names: [n for n in names if n not in WEIGHT_FILES])
    return tmp_path / "weights"


def _processor_from(backend, weights, tokenizer_name, **kwargs):
    repro = checks.call(weights, tokenizer_name=tokenizer_name, load_in_4bit=False, **kwargs)
    with checks.reproducing(repro):
        _, processor = backend.FastVisionModel.from_pretrained(weights, tokenizer_name=tokenizer_name,
                                                               load_in_4bit=False, **kwargs)
    checks.check_equal(type(processor).__name__, FAMILIES[EXAMPLE].processor_class, "processor class", repro=repro)


def test_tokenizer_name_hub_id_resolves_through_the_cache(backend, hub_cache, weights_only):
    hub_cache.add(UNKNOWN_ID, zoo.checkpoint(EXAMPLE))
    _processor_from(backend, weights_only, UNKNOWN_ID)


def test_tokenizer_name_honours_cache_dir_and_revision(backend, tmp_path, weights_only):
    cache = checks.HubCache(tmp_path / "elsewhere")
    cache.add(UNKNOWN_ID, zoo.checkpoint(EXAMPLE))
    _processor_from(backend, weights_only, UNKNOWN_ID, cache_dir=str(cache.hub), revision=checks.SNAPSHOT_COMMIT)


@pytest.mark.parametrize("local_files_only", [False, True], ids=["HF_HUB_OFFLINE", "local_files_only"])
def test_an_uncached_tokenizer_name_is_an_offline_error_naming_it(backend, hub_cache, monkeypatch, weights_only,
                                                                  local_files_only):
    if not local_files_only:
        _offline(monkeypatch)
    kwargs = {"local_files_only": True} if local_files_only else {}
    repro = checks.call(weights_only, tokenizer_name=UNCACHED_ID, **kwargs)
    seen = checks.expect_offline_error(
        lambda: backend.FastVisionModel.from_pretrained(weights_only, tokenizer_name=UNCACHED_ID, **kwargs),
        names=("tokenizer_name",), repro=repro)
    check_offline_error_message(seen.message, UNCACHED_ID, repro)


@pytest.mark.parametrize("model_id", [UNKNOWN_ID, UNKNOWN_ID + "-bnb-4bit"])
@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["4bit", "16bit"])
def test_unknown_ids_pass_through(backend, hub_cache, model_id, load_in_4bit):
    # No fuzzy matching: an id outside the table, even one ending in -bnb-4bit, is read as given.
    hub_cache.add(model_id, zoo.checkpoint(EXAMPLE))
    load_id(backend, EXAMPLE, model_id, load_in_4bit=load_in_4bit)


def test_cache_dir_is_honoured(backend, tmp_path):
    cache = checks.HubCache(tmp_path / "elsewhere")
    cache.add(UNKNOWN_ID, zoo.checkpoint(EXAMPLE))
    load_id(backend, EXAMPLE, UNKNOWN_ID, load_in_4bit=False, cache_dir=str(cache.hub))


def test_a_local_directory_named_like_a_known_id_is_used_as_is(backend, hub_cache, tmp_path, monkeypatch):
    sixteen, _ = FAMILIES[EXAMPLE].four_bit_twin
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    shutil.copytree(zoo.checkpoint(EXAMPLE), sixteen)  # ./unsloth/llava-1.5-7b-hf; the cache stays empty
    load_id(backend, EXAMPLE, sixteen, load_in_4bit=True)


def check_offline_error_message(message: str, model_id: str, repro: str) -> None:
    checks.check(model_id in message, f"OfflineError does not name {model_id!r}: {message!r}", repro=repro)
    checks.check(any(r in message for r in REMEDIES),
                 f"OfflineError does not say what to do (none of {REMEDIES}): {message!r}", repro=repro)


@pytest.mark.parametrize("local_files_only", [False, True], ids=["HF_HUB_OFFLINE", "and local_files_only"])
def test_an_uncached_id_offline_is_an_offline_error_at_once(backend, hub_cache, monkeypatch, local_files_only):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    kwargs = {"local_files_only": True} if local_files_only else {}
    repro = f"HF_HUB_OFFLINE=1: {checks.call(UNCACHED_ID, **kwargs)}"
    start = time.monotonic()
    seen = checks.expect_offline_error(lambda: backend.FastVisionModel.from_pretrained(UNCACHED_ID, **kwargs),
                                       repro=repro)
    elapsed = time.monotonic() - start
    checks.check(elapsed < OFFLINE_ERROR_WITHIN_S, f"OfflineError took {elapsed:.1f} s", repro=repro)
    check_offline_error_message(seen.message, UNCACHED_ID, repro)


# Run in a fresh process: whether the hub is reachable is decided from the environment at import.
_UNREACHABLE_HUB = r"""
import importlib, json, sys, time
backend = importlib.import_module(sys.argv[1])
start = time.monotonic()
try:
    backend.FastVisionModel.from_pretrained(sys.argv[2])
    seen = {"raised": None}
except BaseException as error:
    seen = {"raised": type(error).__name__, "classes": [c.__name__ for c in type(error).__mro__],
            "message": str(error)}
seen["elapsed"] = time.monotonic() - start
print("RESULT " + json.dumps(seen))
"""


def test_an_uncached_id_with_the_hub_unreachable_is_an_offline_error_at_once(backend, tmp_path):
    # No HF_HUB_OFFLINE: the backend must find out by trying. The endpoint is a closed local port, so
    # the test is the same on a machine with a network.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))
    env["PYTHONPATH"] = os.pathsep.join(sys.path)  # the backend module imports as it does here
    env.pop("HF_HUB_CACHE", None)
    repro = f"HF_ENDPOINT=http://127.0.0.1:9 (no HF_HUB_OFFLINE): {checks.call(UNCACHED_ID)}"
    done = subprocess.run([sys.executable, "-c", _UNREACHABLE_HUB, backend.__name__, UNCACHED_ID], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    checks.check(lines, f"the subprocess printed no result (rc {done.returncode}): {done.stderr[-2000:]}", repro=repro)
    seen = json.loads(lines[-1].removeprefix("RESULT "))
    checks.check(seen["raised"] is not None, "loading an uncached id with the hub unreachable returned", repro=repro)
    offline = "OSError" in seen["classes"] and "OfflineError" in seen["classes"]
    checks.check(offline, f"raised {seen['raised']}: {seen['message']!r}; expected OfflineError (an OSError)",
                 repro=repro)
    checks.check(seen["elapsed"] < OFFLINE_ERROR_WITHIN_S, f"OfflineError took {seen['elapsed']:.1f} s", repro=repro)
    check_offline_error_message(seen["message"], UNCACHED_ID, repro)
