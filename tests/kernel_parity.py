"""What every kernel test file measures: errors against a float64 oracle, for FlashAttention's rule
`error(kernel, oracle) <= conformance.tolerances.kernel_bound(reference_error(twin, oracle), dtype)`."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

from conformance.tolerances import kernel_bound

GPU = os.environ.get("FASTVISION_DEVICE", "cpu") == "cuda"
# Compiled on a GPU, in the 16-bit dtypes; in the interpreter, float32 and float16 (its bf16 `tl.dot` is
# wrong, and it rounds fp32 -> bf16 toward zero).
DTYPES = (torch.bfloat16, torch.float16) if GPU else (torch.float32, torch.float16)


def hypothesis_settings(examples: int) -> settings:
    """A kernel test file's hypothesis budget: `examples` per test, no deadline (compiles and the
    interpreter are slow and uneven), no example database."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    """Max absolute error against the float64 oracle; NaN or inf never passes."""
    ours = ours.detach().double()
    if not torch.isfinite(ours).all():
        return float("inf")
    return (ours - exact.to(ours.device)).abs().max().item() if ours.numel() else 0.0


def reference_error(theirs: torch.Tensor, exact: torch.Tensor) -> float:
    """The twin's error on its finite entries only: where PyTorch itself gives NaN (SDPA on a fully masked
    row's gradient, gelu's backward past |g| ~ 1e13 in fp32), an infinite reference error would make the
    bound vacuous; skipping those entries only tightens it."""
    theirs = theirs.detach().double()
    finite = torch.isfinite(theirs)
    return (theirs - exact.to(theirs.device)).abs()[finite].max().item() if finite.any() else 0.0


def assert_relative_rule(name: str, got: torch.Tensor, yardstick: torch.Tensor, truth: torch.Tensor,
                         dtype: torch.dtype, context) -> None:
    """The rule with errors relative to the largest exact value (the floors are for O(1) results); `name`
    "out" takes the forward's floor, any other a gradient's."""
    scale = max(1.0, float(truth.abs().max()))
    bound = kernel_bound(reference_error(yardstick, truth) / scale, dtype, grad=name != "out")
    err = error(got, truth) / scale
    assert err <= bound, f"{name}: relative error {err:.3e} > bound {bound:.3e}; {context}"
