"""Float64 attention math: the judge of every backend. Independent of both backends by design: it
reads the spec's fields and evaluates the mask predicate pair by pair, with nothing shared with
`reference.ops.attention` beyond the field names."""

from __future__ import annotations

import math

import torch


def _allowed(spec, batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """(B, Hm, Sq, Sk) bool, written as the spec's docstring states it, one condition a line."""
    i = torch.arange(q_len).view(1, 1, q_len, 1).double()
    pos = i + (kv_len - q_len)
    j = torch.arange(kv_len).view(1, 1, 1, kv_len).double()
    ok = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool)
    if spec.causal:
        causal_ok = j <= pos
        if spec.span_ids is not None:
            spans = spec.span_ids.cpu().long()
            q_span = spans[:, (torch.arange(q_len) + kv_len - q_len)].view(batch, 1, q_len, 1)
            k_span = spans.view(batch, 1, 1, kv_len)
            causal_ok = causal_ok | ((q_span == k_span) & (q_span >= 0))
        ok = ok & causal_ok
    if spec.window is not None:
        ok = ok & (j > pos - spec.window)
    if spec.key_padding is not None:
        ok = ok & spec.key_padding.cpu().bool().view(batch, 1, 1, kv_len)
    if spec.cu_seqlens is not None:
        bounds = spec.cu_seqlens.cpu().long().tolist()
        seg = torch.zeros(kv_len, dtype=torch.long)
        for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[lo:hi] = n
        q_seg = seg[(torch.arange(q_len) + kv_len - q_len)].view(1, 1, q_len, 1)
        ok = ok & (q_seg == seg.view(1, 1, 1, kv_len))
    if spec.dense_mask is not None:
        ok = ok & spec.dense_mask.cpu().bool()
    return ok


def _oracle_math(q64, k64, v64, spec):
    """Float64 out and lse, differentiable with respect to q64, k64, v64."""
    batch, q_heads, q_len, head_dim = q64.shape
    kv_heads, kv_len = k64.shape[1], k64.shape[2]
    kv_index = torch.arange(q_heads) // (q_heads // kv_heads)  # query head h reads KV head h // group
    kk, vv = k64[:, kv_index], v64[:, kv_index]
    scale = spec.scale if spec.scale is not None else 1.0 / math.sqrt(head_dim)
    scores = q64 @ kk.transpose(-1, -2) * scale
    if spec.softcap is not None:
        scores = spec.softcap * torch.tanh(scores / spec.softcap)
    allowed = _allowed(spec, batch, q_len, kv_len).expand(batch, q_heads, q_len, kv_len)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    row_has_key = allowed.any(dim=-1, keepdim=True)
    # A row with no key: softmax over all -inf is NaN, so it gets zero scores and then zero weights.
    probs = torch.softmax(torch.where(row_has_key, scores, torch.zeros_like(scores)), dim=-1)
    probs = torch.where(allowed, probs, torch.zeros_like(probs))
    return probs @ vv, lse


def _as_float64(*tensors, requires_grad=False):
    return [t.detach().cpu().double().requires_grad_(requires_grad) for t in tensors]


def attention_oracle(q, k, v, spec):
    """Returns (out (B, Hq, Sq, D), lse (B, Hq, Sq)) in float64 on the CPU; lse is -inf on rows with no key."""
    out, lse = _oracle_math(*_as_float64(q, k, v), spec)
    return out, lse


def attention_oracle_grads(q, k, v, spec, grad_out):
    """Float64 (dq, dk, dv) of sum(out * grad_out), by autograd through the oracle's math."""
    q64, k64, v64 = _as_float64(q, k, v, requires_grad=True)
    out, _ = _oracle_math(q64, k64, v64, spec)
    out.backward(grad_out.detach().cpu().double())
    return q64.grad, k64.grad, v64.grad
