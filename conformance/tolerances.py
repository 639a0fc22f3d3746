"""Every tolerance fastvision's tests use, in one place, each with its reason: a table, one section per level.

- kernels: FlashAttention's own rule (tests/test_flash_attn.py): a backend's error against the float64 oracle
  may be at most twice the error of the plain-PyTorch reference computed in the same dtype, plus a floor for
  the dtype's rounding;
- whole models: logits and gradients on valid tokens, by the same rule against the fp32 eager model;
- anything 4-bit: signal-to-noise ratio in dB, not allclose; a family's own bound is on its record
  (`conformance.families.Family.nf4_logits_min_sqnr_db`, with the reason);
- training and adapters: what fine-tuning, saving and merging must keep;
- audits: the kernel rule, per layer.
"""

from __future__ import annotations

import torch

from conformance.families import FAMILIES

# ============================================================================================== kernels
# Twice the reference's own error: FlashAttention's rule (FA2 tests, "at most twice the numerical
# error of a PyTorch implementation").
KERNEL_ERROR_FACTOR = 2.0

# Floors: twice the rounding of an O(1) output, FA3's `2 * max|ref + 0.3 - 0.3 - ref|`. bf16 has an
# 8-bit mantissa (2^-8 = 3.9e-3), fp16 11 bits (4.9e-4), fp32 24 bits (6e-8, but accumulation order
# over a few hundred keys costs ~1e-6).
KERNEL_ERROR_FLOOR = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
    torch.float64: 1e-12,
}

# Gradients accumulate over every query (dk, dv) or key (dq) of a row, so their floor scales with
# sqrt of that count in practice; FA's tests use the same 2x rule for dq/dk/dv and a larger floor.
GRAD_ERROR_FLOOR = {
    torch.float32: 5e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
    torch.float64: 1e-10,
}


def kernel_bound(reference_error: float, dtype: torch.dtype, *, grad: bool = False) -> float:
    """The largest error against the oracle a backend may have, given the reference's own error."""
    floor = (GRAD_ERROR_FLOOR if grad else KERNEL_ERROR_FLOOR)[dtype]
    return KERNEL_ERROR_FACTOR * reference_error + floor


# ========================================================================================= whole models
# Whole-model parity in 16-bit: transformers' own `_test_eager_matches_sdpa_inference` bound for
# bf16/fp16 on valid rows. In fp32 the reference backend and transformers' eager model compute the same
# math; only summation order differs (SDPA vs matmul-softmax).
MODEL_LOGITS_ATOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}

# Whole-model gradients: d(loss)/d(input embeddings) on valid tokens, relative to the largest gradient
# entry (their scale follows the loss, ~1/tokens for a mean). The same numbers as MODEL_LOGITS_ATOL,
# since the backward repeats the forward's math once more: on the zoo in fp32 the error measures ~2e-6 of
# the largest entry (qwen2_vl: 6e-8 on 0.16; gemma3: 5e-8 on 0.05).
MODEL_GRADS_RTOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}

# Whole models in 16-bit follow the kernels' rule: the backend's error against the fp32 eager model (the
# truth) may be at most KERNEL_ERROR_FACTOR times the error of transformers' own eager model run in the
# same 16-bit dtype, plus the floors above. A fixed bound against the 16-bit eager model measures bf16
# rounding, not conformance: on the H100 (torch 2.11, transformers 5.17) the zoo's bf16 eager model is
# itself 8e-3 (llava, qwen2_vl, pixtral) to 2.6e-2 (gemma3: its sqrt(hidden) embedding scale and four
# norms per layer) away from its fp32 self on logits of |max| ~1.2, and 0.7-3.4e-2 on gradients; two
# bf16 runs differ by up to the sum of their errors. In fp32 the two eager models are one and the bound
# is the floor alone, as before.
def model_logits_bound(eager_error: float, dtype: torch.dtype) -> float:
    """The largest logits error against the fp32 eager model, given the same-dtype eager model's error."""
    return KERNEL_ERROR_FACTOR * eager_error + MODEL_LOGITS_ATOL[dtype]


def training_loss_bound(eager_error: float, dtype: torch.dtype) -> float:
    """The largest error of a training forward's loss against the fp32 eager model's, given the same-dtype
    eager model's error. The loss is a mean of per-token log-softmax terms of the logits, so it carries the
    logits' bound; a backend that fuses the LM head into the loss (no logits built) computes the same
    per-row dot products and softmax in the same dtypes, in chunks of rows."""
    return model_logits_bound(eager_error, dtype)


def model_grads_bound(eager_error: float, truth: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest gradient error against the fp32 eager model's gradients `truth`, given the same-dtype
    eager model's error on them."""
    return KERNEL_ERROR_FACTOR * eager_error + MODEL_GRADS_RTOL[dtype] * float(truth.abs().max())


# A model's logits must change when its image does: two different zoo images move the 16-bit logits by
# 0.31 (llava, pixtral) to 1.15 (gemma3) on logits of |max| ~1.1 (reference backend, CPU, fp32). A
# projection left at its zero init (the zoo's Gemma3 before ZOO_VERSION 2) changes them by exactly 0.
IMAGE_DEPENDENCE_MIN_LOGIT_CHANGE = 1e-2


# ================================================================================================ 4-bit
# NF4 keeps ~3.6 bits of signal per weight; a tiny random 4-bit model's logits against its 16-bit twin
# measure ~15-25 dB. Below 10 dB means the 4-bit path is broken (wrong layer quantized twice, wrong
# compute dtype), not merely quantized.
NF4_LOGITS_MIN_SQNR_DB = 10.0


def sqnr_db(signal: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's `compute_error`)."""
    signal, approximation = signal.double(), approximation.double()
    noise = (signal - approximation).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(signal.norm() / noise))


# NF4 dequantization against its float64 oracle (code * absmax with no rounding): the kernel and its twin
# round the nested absmax twice in fp32 (code2 * absmax2, + offset), the product code * absmax once more
# (each <= 2^-24 relative), then once to the output dtype (half an ulp: 2^-24 fp32, 2^-11 fp16, 2^-8 bf16).
# 2^-21 covers the fp32 steps with room; the floor is the dtype's smallest subnormal, for products that
# land there (an all-but-zero block's absmax). Between the kernel, its twin and bitsandbytes the tests ask
# for equality, not this bound.
NF4_DEQUANT_FP32_STEPS = 2.0**-21
NF4_DEQUANT_HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def nf4_dequant_bound(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest error, elementwise, a dequantized NF4 weight in `dtype` may have against the float64 oracle."""
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return (NF4_DEQUANT_FP32_STEPS + NF4_DEQUANT_HALF_ULP[dtype]) * exact.abs() + tiny


def nf4_logits_min_sqnr_db(family: str) -> float:
    """NF4_LOGITS_MIN_SQNR_DB, or the family's own bound where its record loosens it (with the reason)."""
    loosened = FAMILIES[family].nf4_logits_min_sqnr_db
    return NF4_LOGITS_MIN_SQNR_DB if loosened is None else loosened.bound


# ================================================================================ training and adapters
# A merged save of a 4-bit fine-tune must keep its effect: the change the adapter makes to the logits
# (adapter model - its 4-bit base) against the change the merged 16-bit model makes (merged - its 16-bit
# original), by SQNR. With lora_B ~ N(0, 0.05) on the zoo (CPU, fp32 compute) fastvision's merge keeps
# 8.8 (gemma3, whose NF4 noise is the largest: 8.5 dB on logits) to 17.1 dB (qwen2_vl), PEFT's
# merge_and_unload() on the 4-bit model -3.2 to -7.1 dB (-27 to -33 dB for a 0.03-logit fine-tune).
MERGED_DELTA_MIN_SQNR_DB = 4.0

# Data-parallel fine-tuning: the LoRA weights after 2 SGD steps (lr 0.5) of conformance.train_steps on 2
# gloo ranks against one process over the same global batch of 4, fp32 on the CPU. Only summation order
# differs (each rank's half-batch matmuls, then a 2-way all-reduce): measured 2.4e-8 on weights of |max|
# 0.125 (qwen2_vl, torch 2.14). Ranks that skip the all-reduce measure 1.5e-3 (as did fastvision before
# it undid TRL's bf16 cast of the adapters ahead of DDP's wrap): far past this bound.
DDP_LORA_ATOL = 1e-6


# =============================================================================================== audits
# Audits judge each layer by the kernel rule: the backend's max abs error against the judge (transformers
# eager in float64 on the CPU, float32 on a GPU) may be KERNEL_ERROR_FACTOR times the yardstick's
# (transformers eager in the backend's dtype) plus a floor relative to the layer's scale (its largest
# |value|): the kernels' floors, which are for O(1) outputs. Hidden states of the zoo's decoder layers
# reach |x| ~ 3-10; fp32 eager against fp64 measures 1e-7 relative there.
AUDIT_FLOOR = KERNEL_ERROR_FLOOR


def audit_bound(yardstick_error: float, scale: float, dtype: torch.dtype) -> float:
    return KERNEL_ERROR_FACTOR * yardstick_error + AUDIT_FLOOR[dtype] * scale


def audit_grew(error: float, baseline_error: float, yardstick_error: float, max_growth: float) -> bool:
    """A layer's error grew past its baseline: by more than `max_growth`, and beyond KERNEL_ERROR_FACTOR times
    transformers' own error in the same run (under that, a change is rounding and summation order, which
    move with library versions, not a regression)."""
    return error > max_growth * baseline_error and error > KERNEL_ERROR_FACTOR * yardstick_error
