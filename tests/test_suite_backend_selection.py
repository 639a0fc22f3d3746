"""How a user points the installed suite at a backend: a module of their own, from any directory."""

from __future__ import annotations

import os
import subprocess
import sys

SIGNATURE_ONLY = ["-k", "test_signature", "-q", "-p", "no:cacheprovider"]
SUBPROCESS_TIMEOUT_S = 300  # a hang guard for one narrow pytest run, not a performance bound


def _suite(directory, *args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "FASTVISION_BACKEND"}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(directory), **(env_extra or {})})
    command = [sys.executable, "-m", "pytest", "--pyargs", "conformance", *args, *SIGNATURE_ONLY]
    return subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


def test_a_backend_module_outside_the_repository_runs_the_suite(tmp_path):
    (tmp_path / "my_backend.py").write_text("from reference import FastBaseModel, FastModel, FastVisionModel\n")
    done = _suite(tmp_path, "--backend", "my_backend")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_the_environment_variable_selects_the_backend_when_the_option_is_absent(tmp_path):
    done = _suite(tmp_path, env_extra={"FASTVISION_BACKEND": "reference"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_no_backend_is_a_usage_error_naming_both_ways_to_give_one(tmp_path):
    done = _suite(tmp_path)
    assert done.returncode == 4  # pytest's exit code for a usage error
    assert "--backend" in done.stderr and "FASTVISION_BACKEND" in done.stderr


def test_a_module_without_the_contract_classes_is_refused_by_name(tmp_path):
    (tmp_path / "half_backend.py").write_text("from reference import FastVisionModel\n")
    done = _suite(tmp_path, "--backend", "half_backend")
    assert done.returncode != 0
    assert "FastModel" in done.stdout + done.stderr and "FastBaseModel" in done.stdout + done.stderr
