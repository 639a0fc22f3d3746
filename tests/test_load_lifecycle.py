"""100 loads and drops of every family on both backends leave nothing behind: resident memory flat after
warm-up, no model object alive, and transformers exactly as it was — its attention and mask registries
hold no fastvision key, and no function of a transformers module is one of ours (the optimized backend
swaps Pixtral's block mask and the text rotary helpers while one of its models lives).

Run in a fresh process, so no model another test keeps alive (the suite caches some) holds the state."""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from conformance import zoo

ROOT = Path(__file__).resolve().parents[1]
LOADS = 100
WARMUP = 5
# Resident memory may grow by at most this much over 100 loads of one family on one backend, measured
# after warm-up with the allocator's free pages returned (malloc_trim). One leaked model per load would
# cost 100 x its size: the zoo's 4-bit checkpoints are 0.8-1.7 MB each, so a leak of every load grows
# 80-170 MB and a leak of one load in ten 8-17 MB; what is left is the allocator keeping a few freed
# arenas (measured 0.4-0.9 MB here, 2 cores, torch 2.14, transformers 5.24). The bound sits between the two.
MAX_RSS_GROWTH_MB = 6.0
# 1,000 loads in one process: ~0.05-0.1 s each on 2 cores, plus imports.
TIMEOUT_S = 900

_SCRIPT = r"""
import ctypes, gc, importlib, json, os, sys, warnings
from conformance import zoo
import transformers
from transformers import masking_utils
from transformers.modeling_utils import AttentionInterface

def registries():
    return {"attention": dict(AttentionInterface._global_mapping),
            "mask": dict(masking_utils.AttentionMaskInterface._global_mapping)}

def rss_mb():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def models_alive():
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(isinstance(o, transformers.PreTrainedModel) for o in gc.get_objects())

def ours_in_transformers():
    found = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers.") or module is None:
            continue
        for attribute, value in list(vars(module).items()):
            origin = getattr(value, "__module__", None) or ""
            if callable(value) and origin.split(".")[0] in ("reference", "optimized", "conformance"):
                found.append(f"{name}.{attribute} = {origin}.{getattr(value, '__qualname__', value)}")
    return found

loads, warmup = int(sys.argv[1]), int(sys.argv[2])
backends = [importlib.import_module(name) for name in ("reference", "optimized")]
paths = {family: zoo.checkpoint(family) for family in zoo.FAMILIES}
before = registries()
growth = {}
for family, path in paths.items():
    for backend in backends:
        for _ in range(warmup):
            backend.FastVisionModel.from_pretrained(path)
        start = rss_mb()
        for _ in range(loads):
            model, processor = backend.FastVisionModel.from_pretrained(path)
            del model, processor
        growth[f"{family}/{backend.__name__}"] = rss_mb() - start
after = registries()
changed = {kind: sorted(k for k in set(before[kind]) | set(after[kind])
                        if before[kind].get(k) is not after[kind].get(k)) for kind in before}
print("RESULT " + json.dumps({"growth_mb": growth, "models_alive": models_alive(),
                              "registry_changes": changed, "ours_in_transformers": ours_in_transformers()}))
"""


def test_a_hundred_loads_of_every_family_leave_nothing_behind():
    # One thread: 1,000 loads take ~70 s alone, but 385 s beside another pytest-xdist worker when torch's two
    # intra-op threads contend with it for the two cores.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    env.pop("TRITON_INTERPRET", None)  # loads only: no kernel runs
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(LOADS), str(WARMUP)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (rc {done.returncode}): {done.stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    grew = {key: round(mb, 2) for key, mb in result["growth_mb"].items() if mb > MAX_RSS_GROWTH_MB}
    assert not grew, f"resident memory grew by more than {MAX_RSS_GROWTH_MB} MB over {LOADS} loads: {grew}"
    assert result["models_alive"] == 0, f"{result['models_alive']} PreTrainedModel objects alive after the loads"
    changes = {kind: keys for kind, keys in result["registry_changes"].items() if keys}
    assert not changes, f"transformers' registries differ from before the first load: {changes}"
    left = result["ours_in_transformers"]
    assert not left, f"fastvision functions left in transformers: {left}"
    print(json.dumps(result["growth_mb"], indent=1))


@pytest.mark.parametrize("backend_name", ["reference", "optimized"])
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_a_dropped_model_is_freed_at_once(backend_name, family):
    # As with transformers' own models: no reference cycle, so `del model` frees its memory (on a GPU,
    # its device memory) without waiting for the cyclic garbage collector.
    backend = importlib.import_module(backend_name)
    # A first load imports bitsandbytes, which logs an ImportError of its own (no `kernels` package) with
    # the exception as the record's argument; pytest keeps the record, and with it the traceback's frames
    # and the model in their locals. Outside pytest the record is dropped; here a first load takes it.
    backend.FastVisionModel.from_pretrained(zoo.checkpoint(family))
    model, _ = backend.FastVisionModel.from_pretrained(zoo.checkpoint(family))
    alive = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert alive() is None, f"a dropped {backend_name} {family} model lives on until the garbage collector runs"
    finally:
        gc.enable()
