"""RMSNorm in Triton, forward and backward: the twin of `reference/ops/rmsnorm.py`.

Per row of the last dimension (H columns): rstd = 1 / sqrt(mean(x^2) + eps), n = x * rstd, and
  Llama style  y = weight * round(n)        round() = to x's dtype, as LlamaRMSNorm does before the weight,
  Gemma3 style y = round(n * (1 + weight))  one rounding at the end, as Gemma3RMSNorm does.
All arithmetic is fp32 whatever the storage dtype. A product of two bf16 (or fp16) values is exact in
fp32 (8 + 8 or 11 + 11 significant bits <= 24), so the llama style's `weight * round(n)` rounds exactly
once, as PyTorch's 16-bit multiply does: the kernel differs from transformers only where its fp32 rstd
differs (summation order, rsqrt) and that flips a 16-bit rounding of n.

Layout follows the Triton tutorial: `@triton.jit` kernels, launchers, the autograd Function, the public
`rms_norm`. The forward runs one program per tile of ROWS rows x BLOCK = next_power_of_2(H) columns
(several rows when H is small, e.g. Gemma3's per-head q/k norms over 256 columns), reads x and the
weight once, writes y and the per-row rstd (fp32, 4 bytes a row) for the backward. The backward
recomputes n from x and rstd and, with g = dy * weight (or dy * (1 + weight)):
  dx = rstd * (g - n * mean(g * n))          per row, fp32, stored in x's dtype,
  dweight = sum over rows of dy * round(n)    (dy * n for Gemma3)
A fixed number of programs loop over the row tiles, each keeping its dweight partial sum in registers
and writing it to its own row of a (programs, H) fp32 buffer, which torch sums afterwards: no atomics,
so the result is bit-reproducible. Each gradient is computed only when its input requires it. Nothing
here waits on the device (no .item()), and after a shape's first call launches skip Triton's dispatch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimized.kernels.launch import cdiv, compiled_or_interpreted, interpreted
from optimized.kernels.launch import launch as _launch

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile(base, rows, cols, stride, n_rows, n_cols):
    """A (ROWS, BLOCK) tile of a row-major matrix as fp32, zero past the last row and column."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rms_norm_fwd_kernel(
    x, w, y, rstd, stride_x, stride_y, n_rows, n_cols, eps,
    GEMMA: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """y and rstd of ROWS rows. Padding columns load as 0, so they add nothing to the sum of squares,
    which is divided by the true H."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: rows * H may pass 2^31
    cols = tl.arange(0, BLOCK)
    h = _tile(x, rows, cols, stride_x, n_rows, n_cols)
    weight = tl.load(w + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    row_rstd = tl.math.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
    normed = h * row_rstd[:, None]
    if GEMMA:
        out = normed * (1.0 + weight[None, :])
    else:  # LlamaRMSNorm rounds to x's dtype before the weight multiply
        out = normed.to(x.dtype.element_ty).to(tl.float32) * weight[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(y + rows[:, None] * stride_y + cols[None, :], out.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, row_rstd, mask=rows < n_rows)


@triton.jit
def _rms_norm_bwd_kernel(
    x, w, rstd, dy, dx, dw_partial, stride_x, stride_dy, stride_dx, n_rows, n_cols, n_tiles,
    GEMMA: tl.constexpr, HAS_DX: tl.constexpr, HAS_DW: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """dx of the row tiles pid, pid + programs, ...; this program's dweight partial sum to row pid of
    dw_partial. Rows past the end load x = dy = rstd = 0 and so add 0 to the partial sum."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    scale = tl.load(w + cols, mask=col_ok, other=0.0).to(tl.float32)
    if GEMMA:
        scale = 1.0 + scale
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS).to(tl.int64)  # tile * ROWS < n_rows + ROWS fits int32
        row_rstd = tl.load(rstd + rows, mask=rows < n_rows, other=0.0)
        normed = _tile(x, rows, cols, stride_x, n_rows, n_cols) * row_rstd[:, None]
        grad = _tile(dy, rows, cols, stride_dy, n_rows, n_cols)
        if HAS_DW:
            if GEMMA:
                dw_acc += tl.sum(grad * normed, axis=0)
            else:  # the forward multiplied the weight by the rounded n: that is its derivative
                dw_acc += tl.sum(grad * normed.to(x.dtype.element_ty).to(tl.float32), axis=0)
        if HAS_DX:  # the rounding of n passes the gradient straight through, as autograd's cast does
            g = grad * scale[None, :]
            mean_gn = tl.sum(g * normed, axis=1) / n_cols
            grad_x = (g - normed * mean_gn[:, None]) * row_rstd[:, None]
            mask = (rows[:, None] < n_rows) & col_ok[None, :]
            tl.store(dx + rows[:, None] * stride_dx + cols[None, :], grad_x.to(dx.dtype.element_ty), mask=mask)
    if HAS_DW:
        tl.store(dw_partial + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

MAX_COLUMNS = 16384  # a row lives in registers: 16384 fp32 over 32 warps is 16 a thread

# Elements per program tile. Compiled: 4096 fp32 (16 a thread at 8 warps) keeps the forward's tile in
# registers while a program still moves 8-16 KB, so Gemma3's 256-column q/k norms run 16 rows a program
# instead of one 512-byte row a program. The backward holds ~4 such tiles (x, dy, n, g): at H = 16384
# (32 warps, at most 64 registers a thread) it may spill. Not yet swept on the H100. The
# interpreter runs each program through numpy at ~12 ms a program whatever its tile: at 512 elements the
# zoo's 192-wide rows ran 2 a program, and norms were 23 of 75 s of a Qwen2-VL checkpointing test. 2048
# runs them 8 a program, while the kernel tests' up-to-64-row shapes still cross tile edges.
_TILE_ELEMENTS = 4096
_INTERPRETER_TILE_ELEMENTS = 2048

# Backward programs: compiled, 2 per SM (264 on an H100), enough resident warps to stream x and dy while
# the (programs, H) fp32 partial buffer stays small (264 x 4096 x 4 B = 4.3 MB against 2 x 65 MB of
# 16-bit x and dy at 8000 x 4096). Interpreted, 3: an odd count leaves programs with unequal tile counts.
_BWD_PROGRAMS_PER_SM = 2
_INTERPRETER_BWD_PROGRAMS = 3
_SM_COUNT: dict = {}



def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _plan(n_rows: int, n_cols: int, device: torch.device) -> dict:
    """BLOCK (columns), ROWS (rows per tile) and num_warps for a (n_rows, n_cols) problem."""
    block = _next_power_of_2(n_cols)
    tile = compiled_or_interpreted(device, _TILE_ELEMENTS, _INTERPRETER_TILE_ELEMENTS)
    rows = max(1, min(tile // block, _next_power_of_2(n_rows)))
    # ~16 fp32 elements a thread: 4 warps up to 2048 elements, 32 (the most) at 16384.
    warps = min(32, max(4, rows * block // 512))
    return dict(BLOCK=block, ROWS=rows, num_warps=warps)


def _backward_programs(n_tiles: int, device: torch.device, has_dw: bool) -> int:
    if not has_dw:  # no partial sums to keep: one program per tile
        return n_tiles
    if interpreted(device):
        return min(n_tiles, _INTERPRETER_BWD_PROGRAMS)
    if device.index not in _SM_COUNT:  # a driver query: cached, so later calls cost a dict lookup
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return min(n_tiles, _BWD_PROGRAMS_PER_SM * _SM_COUNT[device.index])


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """t as (rows, H) with unit column stride: a view when one exists (any row stride is fine, e.g. a
    column slice of a wider tensor), else one contiguous copy."""
    flat = t.reshape(-1, n_cols)
    return flat if flat.stride(-1) == 1 or n_cols == 1 else flat.contiguous()


def _validate(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape (H,) for x of shape (..., H); got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if not 1 <= x.shape[-1] <= MAX_COLUMNS:
        raise ValueError(f"the last dimension must be 1..{MAX_COLUMNS} (a row is held in registers); "
                         f"got {x.shape[-1]}")
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if x.dtype not in floats or weight.dtype not in floats:
        raise ValueError(f"x and weight must be float16, bfloat16 or float32; got {x.dtype}, {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device; got {x.device}, {weight.device}")


def _launch_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool):
    """(y (rows, H), rstd (rows,) fp32) of a (rows, H) input with unit column stride."""
    n_rows, n_cols = x2.shape
    out_dtype = x2.dtype if gemma else torch.promote_types(x2.dtype, weight.dtype)  # as the twin's `weight *`
    y = torch.empty(n_rows, n_cols, device=x2.device, dtype=out_dtype)
    rstd = torch.empty(n_rows, device=x2.device, dtype=torch.float32)
    if n_rows:
        plan = _plan(n_rows, n_cols, x2.device)
        _launch(_rms_norm_fwd_kernel, (cdiv(n_rows, plan["ROWS"]),), x2, weight, y, rstd, x2.stride(0),
                y.stride(0), n_rows, n_cols, eps, GEMMA=gemma, **plan)
    return y, rstd


def _launch_backward(x2, weight, rstd, dy2, gemma: bool, need_dx: bool, need_dw: bool):
    """(dx (rows, H) in x's dtype or None, dweight (H,) in weight's dtype or None)."""
    n_rows, n_cols = x2.shape
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format) if need_dx else None
    if n_rows == 0:
        return dx, torch.zeros_like(weight) if need_dw else None
    plan = _plan(n_rows, n_cols, x2.device)
    n_tiles = cdiv(n_rows, plan["ROWS"])
    programs = _backward_programs(n_tiles, x2.device, need_dw)
    # Without dweight the partial buffer is never written: rstd stands in for it (no allocation).
    partial = torch.empty(programs, n_cols, device=x2.device, dtype=torch.float32) if need_dw else rstd
    _launch(_rms_norm_bwd_kernel, (programs,), x2, weight, rstd, dy2, x2 if dx is None else dx, partial,
            x2.stride(0), dy2.stride(0), n_cols if dx is None else dx.stride(0), n_rows, n_cols, n_tiles,
            GEMMA=gemma, HAS_DX=need_dx, HAS_DW=need_dw, **plan)
    dw = partial.sum(0).to(weight.dtype) if need_dw else None  # fixed shape and order: deterministic
    return dx, dw


# ----------------------------------------------------------------------------------------------
# Autograd and the public function
# ----------------------------------------------------------------------------------------------


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool):
        _validate(x, weight)
        x2 = _rows(x, x.shape[-1])
        y, rstd = _launch_forward(x2, weight, eps, gemma)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma, ctx.shape = gemma, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy2 = _rows(grad_out, x2.shape[1])
        dx, dw = _launch_backward(x2, weight, rstd, dy2, ctx.gemma, need_dx, need_dw)
        return (dx.view(ctx.shape) if dx is not None else None), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, gemma: bool = False) -> torch.Tensor:
    """RMSNorm of x (..., H) over its last dimension; differentiable in x and weight (H,).

    The kernel twin of `reference.ops.rmsnorm.rms_norm`: `gemma=False` is LlamaRMSNorm (output dtype
    promoted from x and weight, as `weight * x` is), `gemma=True` is Gemma3RMSNorm (output in x's
    dtype). The output is contiguous with x's shape; x needs no particular layout (a copy is made only
    when its last dimension is not contiguous). H is at most 16384.
    """
    return _RMSNormFunction.apply(x, weight, float(eps), bool(gemma))


__all__ = ["rms_norm", "MAX_COLUMNS"]
