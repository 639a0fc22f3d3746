"""Repository-wide test set-up for this repository's own runs (the installed plugin stays out of other
projects' runs, so what the repository's unit tests need is set here).

Triton reads TRITON_INTERPRET when it is first imported and when kernels are defined; a module-level
setdefault in a test file comes too late when an earlier-collected module already imported Triton
(e.g. through transformers or bitsandbytes), and the kernels then run half-interpreted. Without a GPU
the kernels can only run in the interpreter, so it is switched on here, first.

The kernel tests read FASTVISION_DEVICE when imported; `--device cuda` sets it for them here, and the
suite's hypothesis profiles apply to the unit tests too.
"""

import os

import torch

from conformance import plugin

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    os.environ.setdefault(plugin.DEVICE_ENV, config.fastvision_device)
    if not plugin.is_conformance_run(config):
        plugin.use_profiles(config)
        plugin.share_cores_among_workers()
