"""The shared launcher's relaunch contract (`optimized/kernels/launch.py`), which the attention function
keeps per call signature: on the CPU through Triton's interpreter, compiled with FASTVISION_DEVICE=cuda."""

from __future__ import annotations

import os
import threading

DEVICE = os.environ.get("FASTVISION_DEVICE", "cpu")
if DEVICE == "cpu":  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from optimized.kernels.launch import launch_bound  # noqa: E402


@triton.jit
def _scaled_copy_kernel(src, dst, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n) * scale, mask=offs < n)


@triton.jit
def _scaled_copy_count_first_kernel(src, n, dst, scale, BLOCK: tl.constexpr):
    _scaled_copy_kernel(src, dst, n, scale, BLOCK)


@triton.jit
def _descriptor_copy_kernel(src_desc, dst, COLS: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tl.store(dst + rows[:, None] * COLS + tl.arange(0, COLS)[None, :], src_desc.load([tl.program_id(0) * ROWS, 0]))


def _pair(seed: int, n: int = 100):
    src = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return src, torch.zeros_like(src)


def test_relaunch_runs_the_same_launch_on_new_tensors():
    src, dst = _pair(0)
    relaunch = launch_bound(_scaled_copy_kernel, (2,), src, dst, src.numel(), 3.0, BLOCK=64)
    other_src, other_dst = _pair(1)
    relaunch(other_src, other_dst)
    assert torch.equal(dst, src * 3.0)
    assert torch.equal(other_dst, other_src * 3.0)


def test_relaunch_needs_every_leading_tensor():
    src, dst = _pair(2)
    relaunch = launch_bound(_scaled_copy_kernel, (2,), src, dst, src.numel(), 1.0, BLOCK=64)
    with pytest.raises(TypeError, match="2 leading tensor arguments, got 1"):
        relaunch(src)


def test_no_relaunch_where_a_tensor_follows_a_scalar():
    """Such a tensor would sit in the recorded arguments: a relaunch would keep writing to it."""
    src, dst = _pair(3)
    assert launch_bound(_scaled_copy_count_first_kernel, (2,), src, src.numel(), dst, 2.0, BLOCK=64) is None
    assert torch.equal(dst, src * 2.0)  # the launch itself ran


def test_tma_descriptors_lead_like_tensors():
    """The dense attention forward passes q, k, v as TMA descriptors: a relaunch takes new ones in their
    place and reads the new tensors through them."""
    src, other = (torch.randn(64, 16, generator=torch.Generator().manual_seed(s)).to(DEVICE) for s in (4, 5))
    dst, other_dst = torch.zeros_like(src), torch.zeros_like(other)
    relaunch = launch_bound(_descriptor_copy_kernel, (4,), TensorDescriptor.from_tensor(src, [16, 16]), dst,
                            COLS=16, ROWS=16)
    relaunch(TensorDescriptor.from_tensor(other, [16, 16]), other_dst)
    assert torch.equal(dst, src)
    assert torch.equal(other_dst, other)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA contexts are per thread; the interpreter has none")
def test_a_descriptor_kernel_relaunches_on_a_thread_new_to_cuda():
    """autograd runs the attention backward on its own worker thread, whose first CUDA work can be such a
    relaunch or keyed launch: the driver must then still find a context to encode the descriptors in."""
    src, other = (torch.randn(64, 16, generator=torch.Generator().manual_seed(s)).to(DEVICE) for s in (6, 7))
    dst, other_dst, keyed_dst = torch.zeros_like(src), torch.zeros_like(other), torch.zeros_like(other)
    relaunch = launch_bound(_descriptor_copy_kernel, (4,), TensorDescriptor.from_tensor(src, [16, 16]), dst,
                            COLS=16, ROWS=16)
    failures = []

    def first_cuda_work_of_a_thread():
        try:
            relaunch(TensorDescriptor.from_tensor(other, [16, 16]), other_dst)
            launch_bound(_descriptor_copy_kernel, (4,), TensorDescriptor.from_tensor(other, [16, 16]), keyed_dst,
                         COLS=16, ROWS=16)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    for _ in range(2):  # each a new thread
        thread = threading.Thread(target=first_cuda_work_of_a_thread)
        thread.start()
        thread.join()
    torch.cuda.synchronize()
    assert not failures, failures
    assert torch.equal(other_dst, other)
    assert torch.equal(keyed_dst, other)
