"""With fastvision installed, another project's pytest run is unchanged: the conformance plugin (a pytest11
entry point, so it loads in every run) loads no hypothesis profile, writes no environment variable, adds no
report line, and leaves the project's own `backend` fixture and `--backend` option alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# A throwaway project of someone else's, with names the suite also uses.
CONFTEST = """
import pytest

def pytest_addoption(parser):
    parser.addoption("--backend", default="theirs-by-default")

@pytest.fixture
def backend(request):
    return request.config.getoption("--backend")
"""
TESTS = """
import os
from hypothesis import settings

def test_their_backend_fixture_and_option(backend):
    assert backend == "theirs"

def test_hypothesis_keeps_its_default_profile():
    assert settings().max_examples == settings.get_profile("default").max_examples
    assert not settings().derandomize

def test_no_fastvision_environment_variable():
    assert not [k for k in os.environ if k.startswith("FASTVISION")], os.environ
"""
# pytest + collection of a three-test project: a few seconds.
TIMEOUT_S = 300


def _pytest(project, *args):
    # Not under CI: hypothesis then picks a CI profile of its own. Outside CI the suite would load "dev".
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTVISION") and k not in ("CI", "GITHUB_ACTIONS")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def test_another_projects_run_is_unchanged(tmp_path):
    project = tmp_path / "someone_elses_project"
    project.mkdir()
    (project / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (project / "test_theirs.py").write_text(textwrap.dedent(TESTS))
    listed = _pytest(project, "--help")
    assert "--fastvision-backend" in listed.stdout, "the fastvision plugin is not loaded: this test would prove nothing"
    done = _pytest(project, "-v", "--backend", "theirs")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "3 passed" in output, output[-3000:]
    header = [line for line in output.split("collecting", 1)[0].splitlines() if not line.startswith("plugins:")]
    assert not [line for line in header if "fastvision" in line], f"the report header changed:\n{output[:2000]}"
