"""Launching a Triton kernel without Triton's per-call dispatch cost, shared by every kernel file."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ARRAYS = (torch.Tensor, TensorDescriptor)  # what a relaunch replaces; never keyed by value
_RUNNERS: dict = {}
_RUNNERS_MAX = 4096  # one entry per distinct shape/stride/grid set; cleared past this (variable lengths)

_CONTEXTS = threading.local()  # .devices: the devices whose CUDA context this thread has made current
Relaunch = Callable[..., None]  # relaunch(*leading_tensors): the same launch on other tensors (launch_bound)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grid sizes: triton.cdiv is a JIT function, microseconds a call from Python."""
    return -(-a // b)


def interpreted(device: torch.device) -> bool:
    """Whether a kernel on tensors of `device` runs in Triton's interpreter (a CPU tensor under
    TRITON_INTERPRET=1) rather than compiled (a CUDA tensor): the one test every kernel's tile choice makes.
    The two costs differ in kind -- a GPU wants enough work in flight, the interpreter pays 5-18 ms of
    numpy a program whatever its tile -- so each kernel file keeps a size for each."""
    return device.type != "cuda"


def compiled_or_interpreted(device: torch.device, compiled, interpreted_value):
    """`compiled` for a kernel compiled for the GPU, `interpreted_value` in the interpreter."""
    return interpreted_value if interpreted(device) else compiled


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), launching the compiled kernel directly on later identical calls.

    Triton's dispatch re-derives every argument's specialization and cache key per call: ~70 us of host
    time for these ~40-argument kernels on the H100 machine (measured), more than a vision layer's whole
    forward (~60 us of GPU time), so the GPU sat idle. The key here is finer than Triton's -- every
    argument by value, tensors by dtype and 16-byte alignment (all Triton reads of them), the grid --
    so a hit always runs the kernel Triton itself would pick. A hit keeps the grid-bound runner and the
    keyword values in kernel-argument order, so it builds nothing but the key.

    Tensors and TMA descriptors must be passed positionally: keyword values are keyed by value."""
    _run(kernel, grid, args, kwargs)


def launch_bound(kernel, grid: tuple, *args, **kwargs) -> Relaunch | None:
    """launch(), returning a relaunch: given new tensors (or TMA descriptors) for the leading tensor
    arguments, it launches the same kernel with every other argument unchanged, building no key at all.
    A caller that has checked the new tensors match the old in dtype, 16-byte alignment and anything
    else it passed (strides, sizes) can keep it per call signature; it holds no tensor. None where a
    tensor follows a non-tensor argument."""
    run, keyword_values = _run(kernel, grid, args, kwargs)
    n_tensors = _leading_tensors(args)
    tail = (*args[n_tensors:], *keyword_values)
    if any(isinstance(a, _ARRAYS) for a in tail):
        return None

    def relaunch(*tensors):
        if len(tensors) != n_tensors:
            raise TypeError(f"relaunch takes the {n_tensors} leading tensor arguments, got {len(tensors)}")
        run(*tensors, *tail)

    return relaunch


def _run(kernel, grid: tuple, args: tuple, kwargs: dict):
    """Launches; returns (a runner taking every argument positionally, the keyword values in order).

    On the device of the first tensor: Triton compiles for, and launches on the stream of, the *current*
    device, so a kernel given tensors of cuda:1 while cuda:0 is current would run on cuda:0's stream with
    cuda:1's addresses (an illegal address without peer access)."""
    if _INTERPRETED:  # the interpreter compiles nothing
        kernel[grid](*args, **kwargs)
        return kernel[grid], tuple(kwargs[name] for name in kernel.arg_names[len(args):])
    device = _device(args[0])
    if device != torch.cuda.current_device():  # a layer placed on another GPU (device_map over several)
        with torch.cuda.device(device):
            return _run(kernel, grid, args, kwargs)
    key = (kernel, grid, device, *kwargs.items(), *map(_arg_key, args))
    hit = _RUNNERS.get(key)
    if hit is None:
        hit = _RUNNERS[key] = _compile_and_run(kernel, grid, args, kwargs)
    else:
        runner, keyword_values = hit
        runner(*args, *keyword_values)
    return hit


def _arg_key(arg):
    """What Triton reads of an argument besides a tensor's address: dtype and 16-byte alignment; for a TMA
    descriptor also its shape, strides and block (the launcher builds the hardware descriptor from them)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() & 15
    if isinstance(arg, TensorDescriptor):
        return (arg.base.dtype, arg.base.data_ptr() & 15, tuple(arg.shape), tuple(arg.strides),
                tuple(arg.block_shape), arg.padding)
    return arg


def _device(arg) -> int:
    return (arg.base if isinstance(arg, TensorDescriptor) else arg).get_device()


def _leading_tensors(args: tuple) -> int:
    count = 0
    while count < len(args) and isinstance(args[count], _ARRAYS):
        count += 1
    return count


def _compile_and_run(kernel, grid: tuple, args: tuple, kwargs: dict):
    """Triton's own launch (compiling on a miss); returns the runner a later hit calls."""
    if any(isinstance(value, _ARRAYS) for value in kwargs.values()):
        raise TypeError(f"{kernel.fn.__name__}: pass tensors positionally (keywords are keyed by value)")
    if len(_RUNNERS) >= _RUNNERS_MAX:
        _RUNNERS.clear()
    compiled = kernel[grid](*args, **kwargs)
    padded = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
    keyword_values = tuple(kwargs[name] for name in kernel.arg_names[len(args):])
    runner = compiled[padded]
    if any(isinstance(arg, TensorDescriptor) for arg in args):
        runner = _in_context(runner, _device(args[0]))
    return runner, keyword_values


def _in_context(runner, device: int):
    """The runner of a kernel taking TMA descriptors, first making a CUDA context current on a thread new
    to `device`. The driver encodes a descriptor at launch, before Triton's launcher makes sure of a
    context, and a thread whose first CUDA work is this launch has none: autograd's backward worker
    gets "Failed to create tensor map descriptor: invalid device context" (H100, Triton 3.6) when the
    kernel was compiled on the main thread. torch.cuda.set_device cannot help (it skips the device
    already selected); cudaMemGetInfo, like any runtime call needing a context, binds the primary one."""

    def run(*args):
        devices = getattr(_CONTEXTS, "devices", None)
        if devices is None:
            devices = _CONTEXTS.devices = set()
        if device not in devices:
            torch.cuda.mem_get_info(device)
            devices.add(device)
        runner(*args)

    return run
