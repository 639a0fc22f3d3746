"""Layer inputs parked in host memory by "unsloth" checkpointing, their copies off the compute stream
(`reference/host_offload.py`): gradients identical to no checkpointing when every copy finishes as late
as it may (tests/simulated_streams.py), each layer's input on its way back while the layer after it runs
its backward, and a layer that writes its own input in place refused rather than trained on a torn copy.
The last test runs the real streams on a CUDA device."""

from __future__ import annotations

import pytest
import torch

from reference import host_offload, training
from reference.training import offloaded_checkpoint
from tests.simulated_streams import SimulatedStreams

LAYERS = 3


class Layer(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, hidden):
        return torch.tanh(self.linear(hidden)) + hidden


@pytest.fixture(params=[False, True], ids=["replayed", "recorded (a process group)"])
def streams(request, monkeypatch):
    """The simulation in place of CUDA, under both checkpoint implementations, with no input parked before."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: request.param)
    simulated = SimulatedStreams()
    monkeypatch.setattr(host_offload, "STREAMS", simulated)
    monkeypatch.setattr(host_offload._newest, "ref", None, raising=False)
    return simulated


def _chain_gradients(checkpointed: bool, layer_hook=None):
    torch.manual_seed(0)
    layers = [Layer() for _ in range(LAYERS)]
    hidden = torch.randn(4, 8, requires_grad=True)
    out = hidden
    for index, layer in enumerate(layers):
        forward = layer.forward if layer_hook is None else (lambda h, i=index, f=layer.forward: layer_hook(i, f, h))
        out = offloaded_checkpoint(forward, out) if checkpointed else forward(out)
    out.square().sum().backward()
    return [hidden.grad] + [p.grad for layer in layers for p in layer.parameters()]


def test_gradients_are_those_of_no_checkpointing_when_every_copy_finishes_as_late_as_it_may(streams):
    plain = _chain_gradients(checkpointed=False)
    parked = _chain_gradients(checkpointed=True)
    assert streams.issued.count("out") == LAYERS and streams.issued.count("back") == LAYERS
    for want, got in zip(plain, parked):
        assert torch.equal(want, got)


def test_the_simulation_sees_a_read_that_skips_its_wait(streams, monkeypatch):
    """What the test above relies on: had the compute stream not waited for a copy, the layer would replay from
    a buffer the copy had not filled yet."""
    monkeypatch.setattr(streams, "wait", lambda stream, event: None)
    assert any(grad.isnan().any() for grad in _chain_gradients(checkpointed=True))


def test_each_input_comes_back_while_the_layer_after_it_runs_its_backward(streams):
    """In the backward, layer k replays with its own input back and the input of layer k - 1 on its way, and
    no earlier one (at most one layer's input in device memory ahead of its backward)."""
    backs_issued_at_replay = {}

    def hook(index, forward, hidden):
        if torch.is_grad_enabled() and hidden.requires_grad:  # the backward's replay, not the forward
            backs_issued_at_replay[index] = streams.issued.count("back")
        return forward(hidden)

    _chain_gradients(checkpointed=True, layer_hook=hook)
    # Replays run last layer first: its own copy and the next one's are issued, then one more a layer.
    assert backs_issued_at_replay == {2: 2, 1: 3, 0: 3}


def test_a_layer_that_writes_its_own_input_in_place_is_refused(streams):
    calls = []

    def writes_its_input(index, forward, hidden):
        calls.append(index)
        if calls.count(1) == 1 and index == 1:  # the second layer's forward (its input is not a leaf)
            hidden.mul_(1.0)
        return forward(hidden)

    with pytest.raises(RuntimeError, match=r'modified its own input in place.*use_gradient_checkpointing=True'):
        _chain_gradients(checkpointed=True, layer_hook=writes_its_input)


def test_an_input_written_after_its_layer_is_done_was_copied_before(streams):
    """Work after the layer waits for the copy out (settle), so writing the input then -- or its memory being
    handed out again -- cannot reach the parked copy."""
    torch.manual_seed(0)
    layer, hidden = Layer(), torch.randn(4, 8, requires_grad=True)
    inner = hidden * 1.0
    want_input = inner.detach().clone()
    out = offloaded_checkpoint(layer.forward, inner)
    with torch.no_grad():
        inner.fill_(7.0)  # the next op in the model, or a new tensor in the freed memory
    out.sum().backward()
    expected = torch.autograd.functional.vjp(layer.forward, want_input, torch.ones(4, 8))[1]
    assert torch.equal(hidden.grad, expected)


@pytest.mark.parametrize("where", ["simulated device", "cpu"])
def test_a_graph_kept_for_a_second_backward_replays_from_a_fresh_copy(streams, monkeypatch, where):
    if where == "cpu":  # inputs already in host memory are kept as they are (Kept), not copied
        monkeypatch.setattr(streams, "on_device", lambda tensor: False)
    torch.manual_seed(0)
    layer, hidden = Layer(), torch.randn(4, 8, requires_grad=True)
    out = offloaded_checkpoint(layer.forward, hidden * 1.0)
    out.sum().backward(retain_graph=True)
    first = hidden.grad.clone()
    out.sum().backward()
    assert torch.equal(hidden.grad, 2 * first) and streams.issued.count("back") == (2 if where != "cpu" else 0)


def test_a_cpu_tensor_is_kept_as_it_is():
    tensor = torch.randn(3)
    kept = host_offload.park(tensor)
    assert isinstance(kept, host_offload.Kept) and kept.fetch().data_ptr() == tensor.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real streams need a CUDA device")
def test_on_a_gpu_the_real_streams_give_the_gradients_of_no_checkpointing(monkeypatch):
    """Layers long enough (4 x 4,096-wide matmuls on 8,192 tokens) that the copies run beside them."""
    monkeypatch.setattr(host_offload, "STREAMS", host_offload.Streams())
    width, tokens = 4096, 8192

    def run(checkpointed: bool):
        torch.manual_seed(0)
        layers = [Layer(width).cuda().bfloat16() for _ in range(LAYERS)]
        hidden = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = hidden
        for layer in layers:
            out = training.replayed_checkpoint(layer.forward, out) if checkpointed else layer(out)
        out.float().square().mean().backward()
        return [hidden.grad] + [p.grad for layer in layers for p in layer.parameters()]

    for want, got in zip(run(False), run(True)):
        assert torch.equal(want, got)
