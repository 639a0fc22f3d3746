"""Fixtures of the conformance suite, seen by its own tests only (a conftest, not the installed plugin,
so another project's fixtures named `backend` or `device` are never shadowed or shadowing)."""

from __future__ import annotations

import types

import pytest

from conformance.plugin import backend_name, load_backend


@pytest.fixture(scope="session")
def backend(request) -> types.ModuleType:
    return load_backend(backend_name(request.config))


@pytest.fixture(scope="session")
def device(request) -> str:
    return request.config.fastvision_device
