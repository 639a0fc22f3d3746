"""Launching a Triton kernel without Triton's per-call dispatch cost, shared by every kernel file."""

from __future__ import annotations

import os

import torch

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_COMPILED: dict = {}
_COMPILED_MAX = 4096  # one entry per distinct shape/stride set; cleared past this (variable lengths)


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), launching the compiled kernel directly on later identical calls.

    Triton's dispatch re-derives every argument's specialization and cache key per call: ~70 us of host
    time for these ~40-argument kernels on the H100 machine (measured), more than a vision layer's whole
    forward (~60 us of GPU time), so the GPU sat idle. The key here is finer than Triton's -- every
    argument by value, tensors by dtype and 16-byte alignment (all Triton reads of them) -- so a hit
    always runs the kernel Triton itself would pick."""
    if _INTERPRETED:  # the interpreter compiles nothing
        kernel[grid](*args, **kwargs)
        return
    values = [*args, *(kwargs[name] for name in kernel.arg_names[len(args) :])]
    key = (
        kernel,
        args[0].device.index,
        kwargs.get("num_warps"),
        kwargs.get("num_stages"),
        *((v.dtype, v.data_ptr() % 16) if isinstance(v, torch.Tensor) else v for v in values),
    )
    compiled = _COMPILED.get(key)
    if compiled is None:
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.clear()
        _COMPILED[key] = kernel[grid](*args, **kwargs)
    else:
        compiled[(grid[0], grid[1] if len(grid) > 1 else 1, 1)](*values)
