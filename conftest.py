"""Repository-wide test set-up, loaded before any test module imports Triton.

Triton reads TRITON_INTERPRET when it is first imported and when kernels are defined; a module-level
setdefault in a test file comes too late when an earlier-collected module already imported Triton
(e.g. through transformers or bitsandbytes), and the kernels then run half-interpreted. Without a GPU
the kernels can only run in the interpreter, so it is switched on here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
