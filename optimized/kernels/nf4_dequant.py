"""NF4 dequantization in Triton: the twin of `reference/ops/nf4_dequant.py`, bit-exact with it.

A bitsandbytes NF4 weight is n/2 packed bytes (two 4-bit codes a byte, high nibble first) and one fp32
absmax per `blocksize` elements of the flattened weight, or, double-quantized, one uint8 code per block
into a 256-entry fp32 table with an fp32 absmax per 256 blocks and a mean offset. Element i is
  NF4[code_i] * absmax[i // blocksize]    in fp32, rounded once to the output dtype.

It is a stream: per element half a byte in (plus 4 / blocksize bytes of absmax, 1 / blocksize nested) and
2 bytes out in 16 bits, so it runs at memory bandwidth or not at all. Each program takes BYTES packed
bytes as rows of 4 contiguous bytes and writes each row's 8 outputs contiguously (16 bytes in bf16), so the
compiler can vectorize both. A row of 8 elements lies in one block (blocksize is a power of two >= 8), so the absmax,
nested or not, is one load and multiply a row; the codebook is a 64-byte table every program reads from L1.

Bit-exactness: bitsandbytes dequantizes a nested absmax as `code2[q] * absmax2[j // 256]` and then adds the
offset, two fp32 roundings. Triton contracts `a * b + c` into one FMA (one rounding) by default, which differs
in the last bit for ~1 in 4 absmax values; the kernel is compiled with `enable_fp_fusion=False` (the only
other arithmetic is one multiply, so nothing else is lost).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimized.kernels.launch import cdiv, compiled_or_interpreted, launch_bound
from optimized.kernels.launch import launch as _launch
from reference.ops.nf4_dequant import nf4_code

# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_absmax(absmax, code2, absmax2, offset, block, ok, NESTED: tl.constexpr, SHIFT2: tl.constexpr):
    """The fp32 absmax of each row's block; nested: code2[q] * absmax2[block >> SHIFT2] + offset."""
    if NESTED:
        q = tl.load(absmax + block, mask=ok, other=0).to(tl.int32)
        scaled = tl.load(code2 + q) * tl.load(absmax2 + (block >> SHIFT2), mask=ok, other=0.0)
        scale = scaled + tl.load(offset)
    else:
        scale = tl.load(absmax + block, mask=ok, other=0.0)
    return scale


@triton.jit
def _nf4_dequant_kernel(
    packed,
    absmax,
    code,
    code2,
    absmax2,
    offset,
    out,
    n_elements,
    n_bytes,
    SHIFT: tl.constexpr,
    SHIFT2: tl.constexpr,
    NESTED: tl.constexpr,
    BYTES: tl.constexpr,
):
    """BYTES packed bytes -> 2 * BYTES outputs. Row r holds bytes 4r..4r+3, elements 8r..8r+7."""
    ROWS: tl.constexpr = BYTES // 4
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: 8 * rows passes 2^31 at 2^28 bytes
    byte_offsets = rows[:, None] * 4 + tl.arange(0, 4)[None, :]
    data = tl.load(packed + byte_offsets, mask=byte_offsets < n_bytes, other=0).to(tl.int32)
    codes = tl.reshape(tl.join(data >> 4, data & 15), (ROWS, 8))  # (ROWS, 4, 2): the high nibble first
    values = tl.load(code + codes)
    first = rows * 8
    scale = _row_absmax(absmax, code2, absmax2, offset, first >> SHIFT, first < n_elements, NESTED, SHIFT2)
    elements = first[:, None] + tl.arange(0, 8)[None, :]
    result = (values * scale[:, None]).to(out.dtype.element_ty)
    tl.store(out + elements, result, mask=elements < n_elements)


# ----------------------------------------------------------------------------------------------
# Launcher and the public function
# ----------------------------------------------------------------------------------------------

# Packed bytes a program. Compiled: 2048 bytes (4096 outputs, 8 KB of bf16) over 4 warps is 4 rows of 4
# bytes a thread (32 outputs: four 16-byte bf16 stores), and 4096 programs for a 4096 x 4096 weight (~31 for
# each of the H200's 132 SMs): 3.3-3.6 TB/s effective there (benchmarks/results/nf4-dequant-nvidia-h200.md);
# not swept. Interpreted: numpy costs ~2-15 ms a program whatever its size, so 4096 bytes (8192 elements)
# runs most of the zoo's projections (<= 192 x 64) in one or two programs; the tests' shapes still cross
# program edges.
_BYTES = 2048
_INTERPRETER_BYTES = 4096
_WARPS = 4
_CODES: dict = {}  # device -> the NF4 table, built once (a host-to-device copy per call costs more than the op)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _power_of_two(n) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def unreadable(quant_state) -> str | None:
    """Why the kernel cannot read this bitsandbytes quant state (the caller then runs bitsandbytes' own
    dequantize_4bit), or None when it can."""
    if quant_state is None:
        return "no quant state (not a 4-bit weight)"
    plan = vars(quant_state).get(_PLAN)
    if plan is not None and _same(plan.key, _state_key(quant_state)):  # read before: ~1 us, not ~10 checks
        return None
    if quant_state.quant_type != "nf4":
        return f"quant_type {quant_state.quant_type!r} (the kernel's table is NF4)"
    if not _power_of_two(quant_state.blocksize) or quant_state.blocksize < 8:
        return f"blocksize {quant_state.blocksize} (a row of 8 outputs must lie in one block: a power of two >= 8)"
    if quant_state.dtype not in _DTYPES:
        return f"output dtype {quant_state.dtype}"
    absmax = quant_state.absmax
    if absmax.numel() < cdiv(quant_state.shape.numel(), quant_state.blocksize):
        return f"{absmax.numel()} absmax values for {quant_state.shape.numel()} elements"
    if not quant_state.nested:
        return None if absmax.dtype == torch.float32 else f"absmax in {absmax.dtype}, not float32"
    state2 = quant_state.state2
    if absmax.dtype != torch.uint8:
        return f"nested absmax codes in {absmax.dtype}, not uint8"
    if state2.nested or not _power_of_two(state2.blocksize) or quant_state.offset is None:
        return "a nested absmax quantized twice over, without an offset, or in non-power-of-two blocks"
    if state2.code.dtype != torch.float32 or state2.code.numel() != 256 or state2.absmax.dtype != torch.float32:
        return "a nested absmax whose table is not 256 float32 values or whose absmax is not float32"
    return None


class _Plan:
    """What a launch needs of one quant state, kept on it (`_PLAN`): the ~10 checks and tensor preparations a
    call would otherwise repeat, and the kernel bound to them (`launch_bound`). Measured on the H200 box,
    host work was ~40 us a call before (a 4096 x 4096 weight's GPU work is ~14 us). Valid while the state
    holds the very tensors and values it was made from (`QuantState.to` swaps them: a new plan is made)."""

    def __init__(self, quant_state, key: tuple):
        self.key, self.n = key, quant_state.shape.numel()
        self.n_bytes = cdiv(self.n, 2)
        device = quant_state.absmax.device
        code = _CODES.get(device)
        if code is None:
            code = _CODES[device] = nf4_code(device)
        nested, absmax = quant_state.nested, quant_state.absmax.reshape(-1)
        if nested:  # the offset stays on the device: no .item() sync
            state2 = quant_state.state2
            offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=device).reshape(1)
            self.tensors = (absmax, code, state2.code.reshape(-1), state2.absmax.reshape(-1), offset)
        else:
            self.tensors = (absmax, code, code, absmax, code)  # the nested slots go unread
        shift2 = quant_state.state2.blocksize.bit_length() - 1 if nested else 0
        block_bytes = compiled_or_interpreted(device, _BYTES, _INTERPRETER_BYTES)
        self.grid = (cdiv(self.n_bytes, block_bytes),)
        self.meta = dict(
            SHIFT=quant_state.blocksize.bit_length() - 1,
            SHIFT2=shift2,
            NESTED=nested,
            BYTES=block_bytes,
            num_warps=_WARPS,
            enable_fp_fusion=False,
        )
        self.relaunches: dict = {}  # (output dtype, packed bytes' address mod 16) -> relaunch

    def launch(self, data: torch.Tensor, out: torch.Tensor) -> None:
        device = data.get_device()
        if device >= 0 and device != torch.cuda.current_device():  # a relaunch uses the current stream
            _launch(_nf4_dequant_kernel, self.grid, data, *self.tensors, out, self.n, self.n_bytes, **self.meta)
            return
        which = (out.dtype, data.data_ptr() & 15)
        relaunch = self.relaunches.get(which)
        if relaunch is None:
            self.relaunches[which] = launch_bound(
                _nf4_dequant_kernel, self.grid, data, *self.tensors, out, self.n, self.n_bytes, **self.meta
            )
        else:
            relaunch(data, *self.tensors, out)


_PLAN = "_fastvision_nf4_plan"


def _state_key(quant_state) -> tuple:
    state2 = quant_state.state2
    nested = () if state2 is None else (state2.absmax, state2.code, state2.blocksize)
    return (
        quant_state.absmax,
        quant_state.offset,
        quant_state.shape,
        quant_state.dtype,
        quant_state.blocksize,
        quant_state.quant_type,
        *nested,
    )


def _same(key: tuple, other: tuple) -> bool:
    """Tensors by identity (== would compare them elementwise), everything else by value."""
    return len(key) == len(other) and all(
        a is b or not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b
        for a, b in zip(key, other)
    )


def _plan(quant_state) -> _Plan:
    key = _state_key(quant_state) if quant_state is not None else ()
    plan = vars(quant_state).get(_PLAN) if quant_state is not None else None
    if plan is not None and _same(plan.key, key):
        return plan
    reason = unreadable(quant_state)
    if reason is not None:
        raise ValueError(f"the NF4 kernel cannot read this quant state: {reason}")
    plan = _Plan(quant_state, key)
    setattr(quant_state, _PLAN, plan)  # not in QuantState.as_dict: never saved with the weight
    return plan


def dequantize_nf4(packed: torch.Tensor, quant_state, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of quant_state.shape in quant_state.dtype (or `dtype`) from its packed NF4 bytes ((n/2, 1)
    as bitsandbytes stores them, or flat), as `reference.ops.nf4_dequant.dequantize_nf4`. Raises ValueError
    on a quant state `unreadable` names. `dtype` lets the interpreter, whose fp32 -> bf16 cast rounds toward
    zero, write fp32 for a caller to round to bf16."""
    plan = _plan(quant_state)
    data = packed if packed.dtype == torch.uint8 and packed.is_contiguous() else _bytes(packed)
    if data.numel() * 2 < plan.n:
        raise ValueError(f"{data.numel()} packed bytes for {plan.n} elements")
    out = torch.empty(quant_state.shape, dtype=dtype or quant_state.dtype, device=data.device)
    if plan.n:
        plan.launch(data, out)
    return out


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    data = packed.reshape(-1)
    return data if data.dtype == torch.uint8 else data.view(torch.uint8)


__all__ = ["dequantize_nf4", "unreadable"]
