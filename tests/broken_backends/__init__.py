"""Backends with one deliberate fault each, for tests/test_suite_catches_*_faults.py: each wraps the
reference backend and breaks exactly one thing docs/contract.md or the numerics promise, so a suite run
against it must fail and name that fault. They are tests of the suite, never backends to use.
Argument faults are built with `_wrap.broken_backend`, numeric ones with `_numeric_fault`."""
