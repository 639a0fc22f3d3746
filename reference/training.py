"""What a load does to prepare a model for fine-tuning: freezing, checkpointing, embedding offload.

`"unsloth"` checkpointing is activation checkpointing whose saved layer inputs live in CPU memory:
only each layer's input is kept (as in plain checkpointing), and it is copied to the host in the
forward and back in the backward, so device memory for activations no longer grows with the layer count.
The copies run beside the layers, off the compute stream (`reference/host_offload.py`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch
from torch import nn

from reference import host_offload
from reference.instance_methods import weakly_bound

logger = logging.getLogger("fastvision")


def _pack(tensor: torch.Tensor) -> host_offload.Parked | host_offload.Kept:
    return host_offload.park(tensor)


def _unpack(parked: host_offload.Parked | host_offload.Kept) -> torch.Tensor:
    return parked.fetch()


def offloaded_checkpoint(function, *args, **kwargs):
    """A transformers `_gradient_checkpointing_func` whose saved layer inputs live in CPU memory.

    Two implementations, one choice: under a process group (DDP) the layer's graph must be walkable, so
    torch's non-reentrant checkpoint records it; otherwise the layer runs under no_grad and is replayed in
    the backward, which costs far less host time per op: one optimized QLoRA step on an H200 (real widths,
    4 x 2,000 tokens, benchmarks/finetune_ablation.py) took 153.3 ms recorded, 106.7 ms replayed for
    Qwen2-VL, whose step waits on the host, and 180.6 / 169.4 ms for Llava."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return recorded_checkpoint(function, *args, **kwargs)
    return replayed_checkpoint(function, *args, **kwargs)


def replayed_checkpoint(function, *args, **kwargs):
    """The layer under no_grad, replayed in the backward from its input kept in host memory."""
    function = functools.partial(function, **kwargs) if kwargs else function
    inputs_need_grad = any(torch.is_tensor(a) and a.requires_grad for a in args)
    if not torch.is_grad_enabled() or not (inputs_need_grad or _has_trainable_weights(function)):
        # Nothing of the layer needs a gradient (a frozen vision tower, or no grad at all): autograd would
        # record nothing, so it just runs, its input not copied to the host and back.
        return function(*args)
    if not inputs_need_grad:
        # No input needs a gradient, so autograd would never call this layer's backward and its LoRA weights
        # would get none: a vision tower's input, which no embedding hook makes require grad (see
        # require_text_input_grads; before it, Qwen3-VL's vision LoRA trained 0 of 24 weights, its tower
        # naming no `_input_embed_layer` for transformers' hook). An empty input that requires grad makes
        # autograd call it.
        anchor = torch.empty(0, requires_grad=True)
        return _ReplayedCheckpoint.apply(lambda *a: function(*a[:-1]), *args, anchor)
    return _ReplayedCheckpoint.apply(function, *args)


def _has_trainable_weights(function) -> bool:
    """Whether the layer `function` runs (transformers passes `partial(forward, layer, ...)`) has weights that
    require grad; True where the layer cannot be found, so a gradient is never lost."""
    while isinstance(function, functools.partial):
        layer = next((a for a in function.args if isinstance(a, nn.Module)), None)
        if layer is not None:
            return any(p.requires_grad for p in layer.parameters())
        function = function.func
    return True


def recorded_checkpoint(function, *args, **kwargs):
    """torch's non-reentrant checkpoint saves a layer's inputs through the saved-tensor hooks around it (the
    tensors saved inside the layer go through checkpoint's own, innermost hooks and are recomputed), so
    these hooks put exactly the layer inputs in host memory and bring them back for the recompute. The
    forward records a normal graph: DDP with find_unused_parameters=True (transformers' Trainer's choice
    for a PEFT model unless checkpointing is in its args) walks it to the LoRA weights; under a replayed
    checkpoint they are hidden by no_grad, DDP marks them unused and then fails with "Expected to mark a
    variable ready only once". torch's checkpoint also replays the forward's RNG state and autocast."""
    from torch.utils.checkpoint import checkpoint  # imported by transformers' checkpointing anyway

    parked = []

    def pack(tensor):
        parked.append(_pack(tensor))
        return parked[-1]

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        outputs = checkpoint(function, *args, use_reentrant=False, **kwargs)
    for each in parked:
        each.settle()  # the layer is done: later work waits for its input's copy to the host
    return outputs


class _ReplayedCheckpoint(torch.autograd.Function):
    """Runs `function(*args)` under no_grad, keeps its tensor args in host memory and replays it from them
    in the backward, under the forward's random state (dropout masks replay exactly) and autocast (a
    Trainer's bf16 wraps only the forward: replayed outside it, a 16-bit activation would meet fp32
    weights)."""

    @staticmethod
    def forward(ctx, function, *args):
        ctx.function = function
        ctx.tensors = [torch.is_tensor(a) for a in args]
        ctx.input_requires_grad = [torch.is_tensor(a) and a.requires_grad for a in args]
        ctx.args = [_pack(a) if torch.is_tensor(a) else a for a in args]
        ctx.rng_states = (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None)
        ctx.autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        with torch.no_grad():
            outputs = function(*args)
        for parked, tensor in zip(ctx.args, ctx.tensors):
            if tensor:
                parked.settle()  # the layer is done: later work waits for its input's copy to the host
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = [_unpack(a).requires_grad_(wants) if tensor else a
                  for a, tensor, wants in zip(ctx.args, ctx.tensors, ctx.input_requires_grad)]
        cpu_state, cuda_state = ctx.rng_states
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda_state is not None else []):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state)
            with torch.enable_grad(), contextlib.ExitStack() as autocast:
                for device, dtype in ctx.autocast:
                    autocast.enter_context(torch.autocast(device, dtype=dtype))
                outputs = ctx.function(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if torch.is_tensor(o) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [a.grad if wants else None for a, wants in zip(inputs, ctx.input_requires_grad)]
        return None, *grads


# transformers >= 5.18 renamed the entry point; Trainer calls whichever the model's class defines.
_ENABLE_NAMES = ("activation_checkpointing_enable", "gradient_checkpointing_enable")
_DISABLE_NAMES = ("activation_checkpointing_disable", "gradient_checkpointing_disable")


def _class_method(model: nn.Module, names: tuple[str, ...]) -> str:
    return next(name for name in names if hasattr(type(model), name))


def enable_checkpointing(model: nn.Module, mode: bool | str) -> None:
    """True: transformers' own checkpointing. "unsloth": the same with CPU-offloaded layer inputs.
    Either way `use_cache=False` (a cache is useless when layers are replayed) and the text input
    embedding's output requires grad (require_text_input_grads), so checkpointed text layers see a graph
    even with every base weight frozen.

    transformers' Trainer (and TRL's SFTTrainer, whose SFTConfig turns gradient_checkpointing on by
    default) calls the model's checkpointing entry point again at `train()`, which would silently replace
    "unsloth" offloading with plain torch.utils.checkpoint; the model's own entry point is therefore set to
    keep the mode chosen here."""
    if mode is False:
        return
    _apply_checkpointing(model, mode)
    model.fastvision_checkpointing = mode
    name = _class_method(model, _ENABLE_NAMES)
    setattr(model, name, weakly_bound(_keep_checkpointing, model))


def _apply_checkpointing(model: nn.Module, mode: bool | str) -> None:
    # Before the class's entry point, which calls the model's enable_input_require_grads itself.
    model.enable_input_require_grads = weakly_bound(require_text_input_grads, model)
    model.disable_input_require_grads = weakly_bound(unrequire_text_input_grads, model)
    enable = getattr(type(model), _class_method(model, _ENABLE_NAMES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable(model, {"use_reentrant": False})
    if mode == "unsloth":
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False):
                module._gradient_checkpointing_func = offloaded_checkpoint
    for config in _all_configs(model.config):
        config.use_cache = False
    model.enable_input_require_grads()


_INPUT_GRAD_HOOK = "fastvision_input_grad_hook"


def require_text_input_grads(model: nn.Module) -> None:
    """The model's `enable_input_require_grads` (PEFT, TRL and transformers' Trainer call it too): the text
    input embedding's output requires grad, so checkpointed text layers see a graph with every base weight
    frozen. transformers' own also hooks every sub-model's input embedding, a vision tower's patch embedding
    among them, and autograd then runs the backward of a frozen vision tower whose gradient nothing uses.
    A tower with LoRA needs no hook: fastvision's checkpoints give a layer's weights their gradients whatever
    its input (replayed_checkpoint's anchor, torch's non-reentrant checkpoint), and unchecked layers get
    them from autograd itself."""
    unrequire_text_input_grads(model)
    hook = model.get_input_embeddings().register_forward_hook(_output_requires_grad)
    setattr(model, _INPUT_GRAD_HOOK, hook)


def unrequire_text_input_grads(model: nn.Module) -> None:
    """The model's `disable_input_require_grads`: the hook above removed."""
    hook = vars(model).pop(_INPUT_GRAD_HOOK, None)
    if hook is not None:
        hook.remove()


def _output_requires_grad(_module, _inputs, output) -> None:
    output.requires_grad_(True)


def _keep_checkpointing(model: nn.Module, *args, **kwargs) -> None:
    """What a Trainer's call of the checkpointing entry point does to a fastvision model: the mode chosen
    at load (or by get_peft_model / for_training) again, whatever the Trainer's kwargs say."""
    mode = model.fastvision_checkpointing
    adapters_to_fp32(p for name, p in model.named_parameters() if p.requires_grad and "lora_" in name)
    logger.info("fastvision: the trainer turned gradient checkpointing on; keeping use_gradient_checkpointing=%r "
                "(its %s are not used)", mode, "arguments" if args or kwargs else "defaults")
    _apply_checkpointing(model, mode)


def adapters_to_fp32(adapter_weights) -> list[torch.Tensor]:
    """Undo TRL's bf16 cast of a 4-bit model's adapters (its SFTTrainer constructor does it, following the
    QLoRA paper); fastvision trains them in fp32 (docs/contract.md). Returns the weights it cast.

    Called twice: by the Trainer's checkpointing call in train(), which comes before the Trainer wraps the
    model in DDP, and at the first forward. DDP builds its gradient buckets in the dtype the weights have
    when it wraps them; cast back only at the first forward, the fp32 LoRA gradients met bf16 buckets and
    were not averaged at all: after 2 SGD steps of conformance.train_steps on 2 CPU ranks the LoRA weights
    came out bit-identical to those of ranks that skip the all-reduce (tests/broken_backends/
    ddp_skips_allreduce), 1.5e-3 from one process's; 2.4e-8 with this cast."""
    cast = [p for p in adapter_weights if p.dtype != torch.float32]
    for parameter in cast:
        parameter.data = parameter.data.float()
    return cast


def disable_checkpointing(model: nn.Module) -> None:
    """Checkpointing off (the class's own entry point again) and use_cache back on."""
    for name in _ENABLE_NAMES:
        model.__dict__.pop(name, None)
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            getattr(type(model), _class_method(model, _DISABLE_NAMES))(model)
    for config in _all_configs(model.config):
        config.use_cache = True


def _all_configs(config):
    yield config
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            yield sub


def set_trainable(model: nn.Module, full_finetuning: bool, master_fp32: bool) -> None:
    """Full finetuning: every parameter trains (in fp32 when `master_fp32`); otherwise all frozen, for
    adapters to be added later."""
    for parameter in model.parameters():
        trainable = full_finetuning and parameter.dtype.is_floating_point
        if trainable and master_fp32 and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
        parameter.requires_grad_(trainable)


def offload_embedding(model: nn.Module, tied: bool) -> bool:
    """Keep the input embedding in CPU memory and move its input and output per call. Refused (with a
    warning) when the embedding is tied to lm_head: moving it would move the head too."""
    if tied:
        warnings.warn(
            "offload_embedding=True is refused: this model's input embedding is tied to lm_head, so it stays on "
            "the device.",
            stacklevel=5,
        )
        return False
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    embedding.to("cpu")
    embedding.register_forward_pre_hook(lambda _m, args: tuple(a.to("cpu") for a in args))
    embedding.register_forward_hook(lambda _m, _args, output: output.to(device, non_blocking=True))
    embedding.fastvision_offloaded_from = device
    return True


def is_bf16_supported() -> bool:
    """Unsloth's helper for TrainingArguments(bf16=..., fp16=...): True on a GPU that computes in bf16."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
