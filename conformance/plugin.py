"""The conformance suite's pytest plugin: backend selection, device, hypothesis profiles, report header.

Installed as a `pytest11` entry point, so `pytest --pyargs conformance --backend X` works from any
directory. The backend is a module exposing `FastVisionModel`, `FastModel` and `FastBaseModel`:
`reference`, `optimized`, or any importable module of the user's. The suite never imports a backend
itself; tests receive it through the `backend` fixture (in `conformance/conftest.py`, so only the
suite's own tests see it).

Being installed must not change anyone else's test run: with no backend chosen the plugin loads no
hypothesis profile, writes no environment variable, adds no report line and touches no test outside
this package. Its options are `--fastvision-backend` and `--fastvision-device`, with `--backend` and
`--device` as aliases wherever the project under test has not taken those names itself.
"""

from __future__ import annotations

import importlib
import os
import platform
import types
from pathlib import Path

import pytest

from conformance.profiles import ARGUMENT_FUZZ_EXAMPLES, PROFILES

BACKEND_ENV = "FASTVISION_BACKEND"
DEVICE_ENV = "FASTVISION_DEVICE"
REQUIRED_NAMES = ("FastVisionModel", "FastModel", "FastBaseModel")
SUITE_DIR = Path(__file__).resolve().parent
GROUP = "fastvision"
# option dest -> (long option, alias, help)
OPTIONS = {
    "fastvision_backend": ("--fastvision-backend", "--backend",
                           f"backend under test: reference, optimized, or a module path (fallback: ${BACKEND_ENV})"),
    "fastvision_device": ("--fastvision-device", "--device", f"device the suite runs on: cpu or cuda (fallback: "
                          f"${DEVICE_ENV}, else cpu)"),
}
_active_profile: list[str] = []  # the profile loaded for this run, once chosen


def pytest_addoption(parser):
    group = parser.getgroup(GROUP)
    for dest, (name, _alias, text) in OPTIONS.items():
        group.addoption(name, dest=dest, default=None, help=text)


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """After the project's own conftests declared their options: alias --backend/--device if still free."""
    result = yield
    taken = {name for group in (parser._anonymous, *parser._groups) for option in group.options
             for name in option.names()}
    group = parser.getgroup(GROUP)
    for dest, (_name, alias, text) in OPTIONS.items():
        if alias not in taken:
            group.addoption(alias, dest=dest, default=None, help=f"alias of --{dest.replace('_', '-')}: {text}")
    return result


def backend_name(config) -> str | None:
    return config.getoption("fastvision_backend") or os.environ.get(BACKEND_ENV)


def is_conformance_run(config) -> bool:
    return backend_name(config) is not None


def register_profiles() -> None:
    from hypothesis import HealthCheck, settings

    slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
    for name, values in PROFILES.items():
        settings.register_profile(name, deadline=None, suppress_health_check=slow_ok, **values)


def use_profiles(config) -> None:
    """Register the suite's profiles and load the default one ("ci" under CI, else "dev"), unless the run
    names one with hypothesis' own --hypothesis-profile."""
    from hypothesis import settings

    register_profiles()
    chosen = config.getoption("hypothesis_profile", None)
    if not chosen:
        chosen = "ci" if os.environ.get("CI") else "dev"
        settings.load_profile(chosen)
    _active_profile[:] = [chosen]


def share_cores_among_workers() -> None:
    """Under pytest-xdist, give each worker's torch an equal share of the cores for its intra-op threads.
    Left at torch's default every worker starts one OpenMP thread per core, so CI's two workers on two cores
    run four threads that spin-wait for each other between ops."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


def argument_fuzz_examples() -> int:
    """How many load calls the argument fuzz draws per family: ARGUMENT_FUZZ_EXAMPLES for the loaded
    profile, else the profile's own max_examples."""
    from hypothesis import settings

    return ARGUMENT_FUZZ_EXAMPLES.get(_active_profile[0] if _active_profile else "", settings().max_examples)


@pytest.hookimpl(tryfirst=True)  # before hypothesis' plugin loads a --hypothesis-profile by name
def pytest_configure(config):
    config.fastvision_device = config.getoption("fastvision_device") or os.environ.get(DEVICE_ENV) or "cpu"
    if not is_conformance_run(config):
        return
    config.addinivalue_line("markers", "gpu: needs --device cuda")
    config.addinivalue_line("markers", "expensive: slow; fewer hypothesis examples")
    config.addinivalue_line("markers", "family(name): the model family a test exercises")
    use_profiles(config)
    share_cores_among_workers()


def load_backend(name: str) -> types.ModuleType:
    """Import a backend module and check it exposes the contract's three classes."""
    module = importlib.import_module(name)
    missing = [n for n in REQUIRED_NAMES if not hasattr(module, n)]
    if missing:
        raise pytest.UsageError(
            f"backend module {name!r} lacks {', '.join(missing)}; a backend exposes {', '.join(REQUIRED_NAMES)}"
        )
    return module


def in_suite(item) -> bool:
    return SUITE_DIR in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config, items):
    suite = [item for item in items if in_suite(item)]
    if suite and backend_name(config) is None:
        raise pytest.UsageError(
            f"the conformance suite needs a backend: pass --backend reference|optimized|some.module, or set "
            f"{BACKEND_ENV}."
        )
    if config.fastvision_device != "cuda":
        skip_gpu = pytest.mark.skip(reason="needs --device cuda")
        for item in suite:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


def pytest_report_header(config):
    if not is_conformance_run(config):
        return None
    import torch
    import transformers

    lines = [
        f"fastvision backend: {backend_name(config)}; device: {config.fastvision_device}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
    ]
    if config.fastvision_device == "cuda" and torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name()}")
    return lines
