"""The peer route of the optimized attention op: which kinds of call go to SDPA (decided once, recorded),
that the op takes the route, and that the peer computes the spec's attention (against the float64 oracle,
forward and backward, under the kernels' own rule)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

from conformance.oracle import attention_oracle, attention_oracle_grads  # noqa: E402
from conformance.tolerances import kernel_bound  # noqa: E402
from optimized import attention_peers, ops  # noqa: E402
from optimized.attention_peers import CallKind  # noqa: E402
from reference.ops.attention import AttentionSpec, attention  # noqa: E402
from tests.kernel_parity import error, reference_error  # noqa: E402

CLIP = CallKind("cuda", torch.bfloat16, "full", 64, grouped=False)


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    monkeypatch.setattr(attention_peers, "_decided", {})


@pytest.mark.parametrize(("mask", "head_dim", "grouped"), sorted(attention_peers.ROUTED))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_measured_kinds_go_to_the_peer_on_a_gpu_in_16_bit(mask, head_dim, grouped, dtype):
    assert attention_peers.peer_for(CallKind("cuda", dtype, mask, head_dim, grouped)) is not None


@pytest.mark.parametrize("kind", [
    CallKind("cpu", torch.bfloat16, "full", 64, grouped=False),  # the interpreter: the kernel is what is tested
    CallKind("cuda", torch.float32, "full", 64, grouped=False),  # cuDNN and flash take 16-bit only
    CallKind("cuda", torch.bfloat16, "full", 64, grouped=True),  # not measured: no vision tower groups
    CallKind("cuda", torch.bfloat16, "structured", 64, grouped=False),
    CallKind("cuda", torch.bfloat16, "causal", 256, grouped=False),  # Gemma3's text: the kernel is ahead
    CallKind("cuda", torch.bfloat16, "full", 80, grouped=False),  # Qwen2-VL's vision is varlen anyway
], ids=["cpu", "fp32", "grouped", "structured", "d256", "d80"])
def test_everything_else_stays_on_the_kernel(kind):
    assert attention_peers.peer_for(kind) is None


def _kind(spec: AttentionSpec, q_len: int = 8, kv_len: int = 8, kv_heads: int = 2) -> CallKind:
    q, k = torch.zeros(1, 2, q_len, 64), torch.zeros(1, kv_heads, kv_len, 64)
    return attention_peers.kind_of(q, k, spec)


def test_a_call_reads_as_structured_whenever_it_has_more_than_causality():
    padding = torch.ones(1, 8, dtype=torch.bool)
    for spec in (AttentionSpec(window=4), AttentionSpec(softcap=30.0), AttentionSpec(key_padding=padding),
                 AttentionSpec(cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32)),
                 AttentionSpec(causal=True, span_ids=torch.zeros(1, 8, dtype=torch.long))):
        assert _kind(spec).mask == "structured", spec
    assert _kind(AttentionSpec()).mask == "full" and _kind(AttentionSpec(causal=True)).mask == "causal"
    # SDPA's causal mask is top-left aligned, the spec's bottom-right: only equal lengths agree.
    assert _kind(AttentionSpec(causal=True), q_len=1, kv_len=8).mask == "structured"
    assert _kind(AttentionSpec(), kv_heads=1).grouped


def test_each_kind_is_decided_once_and_recorded(monkeypatch):
    assert attention_peers.peer_for(CLIP) is not None
    monkeypatch.setitem(attention_peers.ROUTED, ("full", 64, False), None)  # a changed rule is not re-read
    assert attention_peers.peer_for(CLIP) is not None and list(attention_peers.routes()) == [CLIP]


def test_the_op_takes_the_peer_route_where_the_rule_says(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_peers, "peer_for", lambda kind: "measured slower" if kind.mask == "full" else None)
    monkeypatch.setattr(attention_peers, "peer_attention", lambda q, k, v, spec: calls.append(spec) or q)
    q = torch.randn(1, 2, 8, 16)
    full, causal = AttentionSpec(), AttentionSpec(causal=True)
    assert ops.attention(q, q, q, full) is q and calls == [full]
    assert ops.attention(q, q, q, causal) is not q and calls == [full]  # the kernel's own result


@pytest.mark.parametrize("kv_heads", [6, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("spec", [AttentionSpec(), AttentionSpec(causal=True), AttentionSpec(scale=0.3)],
                         ids=["full", "causal", "scale"])
def test_the_peer_computes_the_spec_forward_and_backward(spec, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 6, 37, 64, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 37, 64, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(2, 6, 37, 64)
    out = attention_peers.peer_attention(q, k, v, spec)
    twin = attention(q, k, v, spec)
    exact, _ = attention_oracle(q, k, v, spec)
    assert error(out, exact) <= kernel_bound(reference_error(twin, exact), torch.float32)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    twin_grads = torch.autograd.grad(twin, (q, k, v), grad_out)
    for ours, theirs, truth in zip(grads, twin_grads, attention_oracle_grads(q, k, v, spec, grad_out)):
        assert error(ours, truth) <= kernel_bound(reference_error(theirs, truth), torch.float32, grad=True)
