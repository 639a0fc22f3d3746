"""Run the conformance suite against one backend and summarise it: a table of area x family with
passed/failed counts, and on request a JUnit XML file and a JSON summary for CI.

    >>> from conformance.runner import run_conformance
    >>> exit_code = run_conformance("reference", json_path="conformance.json")  # doctest: +SKIP

An area is a test module's name without `test_` (arguments, naming, processor, ...); a family comes
from the test's `family(name)` marker, or its parameter id under pytest-xdist (where the controller
never sees the items); "-" marks a family-agnostic test.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import json
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from conformance.families import NAMES

# Distributions whose versions decide a result, recorded beside it.
VERSIONED = ("fastvision", "torch", "transformers", "huggingface_hub", "bitsandbytes", "accelerate", "hypothesis",
             "pytest")
OUTCOMES = ("passed", "failed", "skipped")


@dataclasses.dataclass
class Collector:
    """A pytest plugin object that records each test's outcome and family."""

    families: dict[str, str] = dataclasses.field(default_factory=dict)
    outcomes: dict[str, str] = dataclasses.field(default_factory=dict)

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            marker = item.get_closest_marker("family")
            if marker is not None and marker.args:
                self.families[item.nodeid] = str(marker.args[0])

    def pytest_collectreport(self, report) -> None:
        if report.failed:  # an import error in a module fails the whole area
            self.outcomes[report.nodeid or "<collection>"] = "failed"

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:  # setup, call or teardown: any failure fails the test
            self.outcomes[report.nodeid] = "failed"
        elif report.skipped and report.nodeid not in self.outcomes:
            self.outcomes[report.nodeid] = "skipped"
        elif report.when == "call" and report.passed and self.outcomes.get(report.nodeid) != "failed":
            self.outcomes[report.nodeid] = "passed"


def area_of(nodeid: str) -> str:
    """`.../conformance/test_arguments.py::test_x[llava]` -> "arguments"."""
    module = Path(nodeid.split("::", 1)[0]).name
    return module.removesuffix(".py").removeprefix("test_") or "-"


def family_of(nodeid: str, families: dict[str, str]) -> str:
    if nodeid in families:
        return families[nodeid]
    match = re.search(r"\[(.*)\]$", nodeid)
    parts = match.group(1).split("-") if match else []
    return next((part for part in parts if part in NAMES), "-")


def summarise(collector: Collector) -> tuple[list[dict], list[str]]:
    """(rows of area, family, passed, failed, skipped; failed node ids)."""
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for nodeid, outcome in collector.outcomes.items():
        counts[(area_of(nodeid), family_of(nodeid, collector.families))][outcome] += 1
    rows = [{"area": area, "family": family, **{o: counter[o] for o in OUTCOMES}}
            for (area, family), counter in sorted(counts.items())]
    failures = sorted(n for n, o in collector.outcomes.items() if o == "failed")
    return rows, failures


def format_table(rows: list[dict]) -> str:
    header = ("area", "family", *OUTCOMES)
    cells = [header, *[(r["area"], r["family"], *(str(r[o]) for o in OUTCOMES)) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_conformance(
    backend: str,
    device: str = "cpu",
    junit: str | None = None,
    json_path: str | None = None,
    extra_args: Sequence[str] = (),
    profile: str | None = None,
) -> int:
    """Run `pytest --pyargs conformance --backend BACKEND --device DEVICE`, print the area x family table,
    write JUnit XML to `junit` and a JSON summary to `json_path` when given; return pytest's exit code.
    `profile` names one of the suite's hypothesis profiles (plugin.PROFILES), e.g. "thorough"."""
    args = ["--pyargs", "conformance", "--fastvision-backend", backend, "--fastvision-device", device,
            "-p", "no:cacheprovider"]
    if profile:
        args += ["--hypothesis-profile", profile]
    if junit:
        args += ["--junitxml", str(junit)]
    collector = Collector()
    exit_code = int(pytest.main([*args, *extra_args], plugins=[collector]))
    rows, failures = summarise(collector)
    print(f"\nfastvision conformance: backend {backend}, device {device}, exit code {exit_code}")
    print(format_table(rows) if rows else "(no tests ran)")
    sys.stdout.flush()
    if json_path:
        summary = {"backend": backend, "device": device, "profile": profile, "versions": versions(),
                   "exit_code": exit_code, "rows": rows, "failures": failures}
        Path(json_path).write_text(json.dumps(summary, indent=1) + "\n")
    return exit_code
