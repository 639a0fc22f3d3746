"""The "unsloth" checkpointing function: the same gradients as no checkpointing, dropout replayed
exactly, the saved layer input held in host memory, and under a process group a graph DDP can walk."""

from __future__ import annotations

import functools

import pytest
import torch

from reference import host_offload, training
from reference.training import offloaded_checkpoint


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


@pytest.fixture(params=[False, True], ids=["one process", "under a process group"])
def process_group(request, monkeypatch):
    """Both implementations: outside DDP the layer is replayed from its input, under a process group its
    graph is recorded."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: request.param)
    return request.param


def test_offloaded_checkpoint_gives_the_gradients_of_no_checkpointing(process_group):
    plain = _grads(lambda block, hidden: block(hidden, scale=2.0))
    offloaded = _grads(lambda block, hidden: offloaded_checkpoint(block.forward, hidden, scale=2.0))
    for a, b in zip(plain, offloaded):
        assert torch.equal(a, b)  # same ops, same dropout mask: bit-identical


def test_saved_layer_input_is_packed_to_host_memory(monkeypatch, process_group):
    packed, pack = [], training._pack

    def spy(tensor):
        packed.append(tensor)
        return pack(tensor)

    monkeypatch.setattr(training, "_pack", spy)
    block = Block()
    hidden = torch.randn(2, 8, requires_grad=True)
    offloaded_checkpoint(block.forward, hidden).sum().backward()
    assert [tuple(t.shape) for t in packed] == [(2, 8)]  # the layer input only: the inside is recomputed
    assert packed[0] is hidden and hidden.grad is not None


def test_only_floating_inputs_that_require_grad_get_one(process_group):
    """transformers passes a layer non-tensor and integer arguments too (positions, flags)."""
    block = Block()
    hidden, frozen = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8)
    out = offloaded_checkpoint(lambda h, f, flag: block(h + f, scale=2.0 if flag else 1.0), hidden, frozen, True)
    out.sum().backward()
    assert hidden.grad is not None and frozen.grad is None and block.linear.weight.grad is not None


def _reachable(grad_fn) -> set:
    seen, todo = set(), [grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return {id(node.variable) for node in seen if hasattr(node, "variable")}


def test_under_a_process_group_checkpointed_weights_are_reachable_from_the_output_graph(monkeypatch):
    """DDP with find_unused_parameters=True walks the output's graph to find the parameters a step uses; a
    reentrant checkpoint runs the layer under no_grad, DDP marks its weights unused, and the backward then
    fails ("Expected to mark a variable ready only once")."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    block = Block()
    out = offloaded_checkpoint(block.forward, torch.randn(2, 8, requires_grad=True))
    assert {id(block.linear.weight), id(block.linear.bias)} <= _reachable(out.grad_fn)


def test_a_layer_whose_input_needs_no_gradient_still_gets_its_weight_gradients(process_group):
    """A vision tower's first layer gets patch embeddings of pixels, which need no gradient (Qwen3-VL's, which
    `enable_input_require_grads` does not reach); its weights (LoRA) do. transformers passes
    `partial(forward, layer, ...)`."""
    block = Block().eval()
    hidden = torch.randn(3, 8)
    block(hidden).square().sum().backward()
    want, block.linear.weight.grad = block.linear.weight.grad, None
    offloaded_checkpoint(functools.partial(Block.forward, block), hidden).square().sum().backward()
    assert torch.equal(block.linear.weight.grad, want) and hidden.grad is None


def test_a_layer_nothing_of_which_needs_a_gradient_just_runs_without_a_host_copy(monkeypatch):
    """A frozen vision tower's layer under "unsloth" checkpointing: nothing would record a graph, so its input
    is not copied to host memory and back, and its output needs no gradient."""
    copies = []
    monkeypatch.setattr(training, "_pack", lambda tensor: copies.append(tensor) or host_offload.Kept(tensor))
    block = Block().eval().requires_grad_(False)
    out = offloaded_checkpoint(functools.partial(Block.forward, block), torch.randn(3, 8))
    assert not out.requires_grad and not copies
    block.requires_grad_(True)
    offloaded_checkpoint(functools.partial(Block.forward, block), torch.randn(3, 8))
    assert any(c.shape == (3, 8) for c in copies)  # a layer with weights to train keeps its input on the host


def _vision_layer_outputs_need_grad(family: str, finetune_vision_layers: bool, checkpointing="unsloth"):
    """A training step of the zoo model: whether the vision tower's last layer and the first text layer gave
    outputs that require grad, and the trainable weights' gradients."""
    import reference
    from conformance import inputs, zoo
    from reference.families import family_of

    model, processor = reference.FastVisionModel.from_pretrained(str(zoo.checkpoint(family)), load_in_4bit=False,
                                                                 use_gradient_checkpointing=checkpointing)
    spec = family_of(model.config)
    model = reference.FastVisionModel.get_peft_model(model, finetune_vision_layers=finetune_vision_layers, r=4,
                                                     use_gradient_checkpointing=checkpointing)
    model = reference.FastVisionModel.for_training(model, use_gradient_checkpointing=checkpointing)
    model.enable_input_require_grads()  # as PEFT's and TRL's set-up calls it
    base = model.get_base_model()
    seen = {}
    for key, path in (("vision", spec.vision_layers), ("text", spec.text_layers)):
        def record(_module, _inputs, out, key=key):
            seen.setdefault(key, (out if torch.is_tensor(out) else out[0]).requires_grad)

        base.get_submodule(path)[-1 if key == "vision" else 0].register_forward_hook(record)
    batch = dict(inputs.image_batch(processor))
    torch.manual_seed(0)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return seen["vision"], seen["text"], grads


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_a_frozen_vision_tower_runs_no_backward_and_every_adapter_gets_its_gradient(family):
    """transformers' enable_input_require_grads also makes the patch embedding's output require grad, and
    autograd then runs a frozen tower's whole backward for a gradient nothing uses. The model's own keeps
    only the text input's hook (reference.training.require_text_input_grads). With vision LoRA or without,
    every adapter gets the gradient it gets without checkpointing (Llava's last CLIP layer none: its output
    is not used)."""
    for vision_lora in (False, True):
        vision, text, grads = _vision_layer_outputs_need_grad(family, finetune_vision_layers=vision_lora)
        assert vision is vision_lora and text
        _, _, plain = _vision_layer_outputs_need_grad(family, finetune_vision_layers=vision_lora, checkpointing=False)
        assert grads.keys() == plain.keys()
        assert all((grads[n] is None) == (plain[n] is None) for n in grads)
        assert all(torch.equal(grads[n], plain[n]) for n in grads if plain[n] is not None)
        assert any(plain[n] is not None for n in grads if "lora_B" in n and "language_model" not in n) is vision_lora
