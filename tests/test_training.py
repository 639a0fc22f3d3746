"""The "unsloth" checkpointing function: the same gradients as no checkpointing, dropout replayed
exactly, and the saved layer input held in host memory."""

from __future__ import annotations

import torch

from reference.training import _OffloadedCheckpoint, offloaded_checkpoint


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, hidden, scale=1.0):
        return self.dropout(torch.tanh(self.linear(hidden))) * scale


def _grads(run):
    torch.manual_seed(0)
    block = Block()
    hidden = torch.randn(3, 8, requires_grad=True)
    torch.manual_seed(1)
    out = run(block, hidden)
    out.square().sum().backward()
    return hidden.grad, block.linear.weight.grad


def test_offloaded_checkpoint_gives_the_gradients_of_no_checkpointing():
    plain = _grads(lambda block, hidden: block(hidden, scale=2.0))
    offloaded = _grads(lambda block, hidden: offloaded_checkpoint(block.forward, hidden, scale=2.0))
    for a, b in zip(plain, offloaded):
        assert torch.equal(a, b)  # same ops, same dropout mask: bit-identical


def test_saved_layer_input_lives_in_host_memory():
    seen = {}

    def spy(hidden):
        seen.setdefault("forward", hidden)
        return hidden * 2

    hidden = torch.randn(2, 4, requires_grad=True)
    out = _OffloadedCheckpoint.apply(spy, hidden)
    saved = out.grad_fn.args[0]
    assert saved.device.type == "cpu" and not saved.requires_grad
    out.sum().backward()
    assert torch.equal(hidden.grad, torch.full_like(hidden, 2.0))
