"""NF4 dequantization in plain PyTorch: the twin of `optimized/kernels/nf4_dequant.py`.

A bitsandbytes NF4 weight of n elements is n/2 bytes (rounded up), two 4-bit codes a byte, the high nibble
first, and one fp32 absmax per `blocksize` consecutive elements of the flattened weight. Element i is
  NF4[code_i] * absmax[i // blocksize]     in fp32, then rounded once to quant_state.dtype.
With double quantization (`compress_statistics=True`, quant_state.nested) absmax is itself stored as 8-bit
codes into quant_state.state2.code (256 fp32 entries), with an fp32 absmax per state2.blocksize (256) of
them, and the mean quant_state.offset taken out before quantizing:
  absmax[j] = state2.code[q_j] * state2.absmax[j // state2.blocksize] + offset    two fp32 roundings, no FMA,
as bitsandbytes' `dequantize_blockwise` followed by its `absmax += offset` computes it.

This follows bitsandbytes' CUDA kernel, element i using absmax[i // blocksize] of the flattened weight. Its
CPU kernel (0.50.2) is the same where each row of the weight is a whole number of blocks; where it is not
it reads other blocks' absmax for some shapes (measured: (3, 96) at blocksize 64 and (4, 128) at blocksize
256 differ by up to 1.7; (5, 66) at 64 does not). bnb's own dequantize_4bit ignores quant_state.code for
nf4 and uses its built-in table: so does this.
"""

from __future__ import annotations

import torch

# bitsandbytes' NF4 codebook (functional.get_4bit_type("nf4"), csrc's dDequantizeNF4): the 16 quantiles
# of N(0, 1) scaled to [-1, 1], as fp32.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_code(device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def absmax_fp32(quant_state) -> torch.Tensor:
    """The per-block fp32 absmax of a quant state, undoing double quantization where there is one."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    state2 = quant_state.state2
    index = torch.arange(quant_state.absmax.numel(), device=quant_state.absmax.device) // state2.blocksize
    scaled = state2.code.float()[quant_state.absmax.reshape(-1).long()] * state2.absmax.float()[index]
    return scaled + quant_state.offset.float()  # a separate add: rounded twice, as bnb's `absmax += offset`


def dequantize_nf4(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The weight of quant_state.shape in quant_state.dtype from its packed NF4 bytes ((n/2, 1) as
    bitsandbytes stores them, or flat; another storage dtype is viewed as bytes)."""
    data = packed.reshape(-1)
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    n = quant_state.shape.numel()
    codes = torch.stack([data >> 4, data & 15], dim=1).reshape(-1)[:n].long()  # high nibble first
    index = torch.arange(n, device=data.device) // quant_state.blocksize
    values = nf4_code(data.device)[codes] * absmax_fp32(quant_state)[index]
    return values.to(quant_state.dtype).reshape(quant_state.shape)


__all__ = ["NF4_CODE", "absmax_fp32", "dequantize_nf4", "nf4_code"]
