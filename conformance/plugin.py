"""The conformance suite's pytest plugin: backend selection, device, hypothesis profiles, report header.

Installed as a `pytest11` entry point, so `pytest --pyargs conformance --backend X` works from any
directory. The backend is a module exposing `FastVisionModel`, `FastModel` and `FastBaseModel`:
`reference`, `optimized`, or any importable module of the user's. The suite never imports a backend
itself; tests receive it through the `backend` fixture.
"""

from __future__ import annotations

import importlib
import os
import platform
import types

import pytest
from hypothesis import HealthCheck, settings

BACKEND_ENV = "FASTVISION_BACKEND"
DEVICE_ENV = "FASTVISION_DEVICE"
REQUIRED_NAMES = ("FastVisionModel", "FastModel", "FastBaseModel")

_slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=_slow_ok)
# CI: the same examples every run (derandomize) and a bound on their number, so the suite's time is known.
settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, suppress_health_check=_slow_ok, print_blob=True
)
settings.register_profile("gpu", max_examples=40, deadline=None, suppress_health_check=_slow_ok)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_addoption(parser):
    group = parser.getgroup("fastvision")
    group.addoption(
        "--backend",
        default=None,
        help=f"backend under test: reference, optimized, or a module path (fallback: ${BACKEND_ENV})",
    )
    group.addoption(
        "--device",
        default=None,
        choices=("cpu", "cuda"),
        help=f"device the suite runs on (fallback: ${DEVICE_ENV}, else cpu)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs --device cuda")
    config.addinivalue_line("markers", "expensive: slow; fewer hypothesis examples")
    config.addinivalue_line("markers", "family(name): the model family a test exercises")
    device = config.getoption("--device") or os.environ.get(DEVICE_ENV) or "cpu"
    os.environ[DEVICE_ENV] = device  # kernel tests and subprocesses read it
    config.fastvision_device = device


def backend_name(config) -> str | None:
    return config.getoption("--backend") or os.environ.get(BACKEND_ENV)


def load_backend(name: str) -> types.ModuleType:
    """Import a backend module and check it exposes the contract's three classes."""
    module = importlib.import_module(name)
    missing = [n for n in REQUIRED_NAMES if not hasattr(module, n)]
    if missing:
        raise pytest.UsageError(
            f"backend module {name!r} lacks {', '.join(missing)}; a backend exposes {', '.join(REQUIRED_NAMES)}"
        )
    return module


def pytest_collection_modifyitems(config, items):
    needs_backend = any("backend" in getattr(item, "fixturenames", ()) for item in items)
    if needs_backend and backend_name(config) is None:
        raise pytest.UsageError(
            f"the conformance suite needs a backend: pass --backend reference|optimized|some.module, or set "
            f"{BACKEND_ENV}."
        )
    if config.fastvision_device != "cuda":
        skip_gpu = pytest.mark.skip(reason="needs --device cuda")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


def pytest_report_header(config):
    import torch
    import transformers

    lines = [
        f"fastvision backend: {backend_name(config) or '(none)'}; device: {config.fastvision_device}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
    ]
    if config.fastvision_device == "cuda" and torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name()}")
    lines.append("env: " + ", ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("FASTVISION")))
    return lines


@pytest.fixture(scope="session")
def backend(request) -> types.ModuleType:
    return load_backend(backend_name(request.config))


@pytest.fixture(scope="session")
def device(request) -> str:
    return request.config.fastvision_device
