"""Rotate-half rotary position embedding in plain PyTorch: the twin of `optimized/kernels/rope.py`.

This is transformers' text `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` (llama, mistral,
qwen2_vl, qwen2_5_vl, gemma3 -- in 5.x the Qwen M-RoPE sections are interleaved inside the rotary
embedding, so the apply step is the same plain rotate-half everywhere), written out op for op so that
its results and gradients are bit-identical to transformers' in every dtype: each product is rounded to
the inputs' dtype, then their sum. The only addition is validation, shared with the kernel: the rotary
dim must be the whole head dim (partial rotary is sliced off by the caller in transformers).
"""

from __future__ import annotations

import torch


def validate_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The checks both backends make; each error names the argument at fault."""
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k must have q's head dim {head_dim} as its last dim, got k {tuple(k.shape)}")
    if head_dim % 2:
        raise ValueError(f"rotate-half RoPE needs an even head dim, got q {tuple(q.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape[-1] != head_dim:
            raise ValueError(
                f"{name} must cover the whole head dim: {name}.shape[-1] == {head_dim} (q's last dim), got "
                f"{name} {tuple(t.shape)}; partial rotary must be sliced off by the caller")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim, as transformers' `rotate_half`."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, the same for k), with cos/sin unsqueezed at `unsqueeze_dim`.

    q (B, Hq, S, D) and k (B, Hkv, S, D) -- transformers passes transposed views of (B, S, H, D)
    projections -- and cos, sin (B, S, D) in q's dtype with `unsqueeze_dim=1`; (B, S, H, D) inputs take
    `unsqueeze_dim=2`. Returns (q_embed, k_embed). Differentiable in all four inputs.
    """
    validate_rotary(q, k, cos, sin)
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


__all__ = ["apply_rotary", "rotate_half", "validate_rotary"]
