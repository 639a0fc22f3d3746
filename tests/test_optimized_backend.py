"""The optimized backend's own promises: where its attention runs, one launch per vision layer, masks as
structure, and patches that never leak into reference models loaded in the same process."""

from __future__ import annotations

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton reads this when its kernels are defined: before the import below
    os.environ.setdefault("TRITON_INTERPRET", "1")

import optimized
import reference
from conformance import families, inputs, tolerances, zoo
from optimized import ops
from reference.families import FAMILIES
from reference.ops.attention import AttentionSpec
from reference.ops.attention import attention as reference_attention

ALL = list(FAMILIES)
QWEN_VARLEN = [name for name, spec in FAMILIES.items() if spec.vision_patch == "qwen_varlen"]
PIXTRAL_SEGMENTS = [name for name, spec in FAMILIES.items() if spec.vision_patch == "pixtral_segments"]
VISION_PATCHED = QWEN_VARLEN + PIXTRAL_SEGMENTS


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call the Triton kernel serves, as (q shape, spec)."""
    calls = []
    original = ops.kernels()["attention"]

    def spy(q, k, v, spec):
        calls.append((tuple(q.shape), spec))
        return original(q, k, v, spec)

    monkeypatch.setitem(ops.kernels(), "attention", spy)
    return calls


def _load(backend, family: str):
    """The family's tiny checkpoint in float32 on the contract's default device (a GPU where there is
    one), so the float32 bounds below hold on both machines."""
    return backend.FastVisionModel.from_pretrained(str(zoo.checkpoint(family)), load_in_4bit=False,
                                                   dtype=torch.float32)


def _batch(processor, model):
    return inputs.image_batch(processor).to(model.device)


def _forward(backend, family):
    model, processor = _load(backend, family)
    batch = _batch(processor, model)
    with torch.no_grad():
        return model, batch, model(**batch).logits


def test_without_gpu_or_interpreter_the_reference_op_runs_and_the_log_says_so_once(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops._say_fallback_once.cache_clear()
    q = torch.randn(1, 2, 5, 8)
    spec = AttentionSpec(causal=True)
    with caplog.at_level(logging.WARNING, logger="fastvision.optimized"):
        for _ in range(3):
            out = ops.attention(q, q, q, spec)
    assert torch.equal(out, reference_attention(q, q, q, spec))
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "reference ops" in caplog.records[0].getMessage()


def _fused_op_calls():
    """Each fused op's call on small inputs: name -> (function of a module with the op, arguments)."""
    x, gate = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    return {"rmsnorm": ("rms_norm", (x, torch.randn(16), 1e-6)),
            "gated_activation": ("gated_activation", (gate, x, "silu")),
            "rope": ("apply_rotary", (q, k, cos, sin)),
            "cross_entropy": ("causal_lm_loss", (x, torch.randint(0, 16, (3, 5)), 16))}


@pytest.mark.parametrize("name", ["rmsnorm", "gated_activation", "rope", "cross_entropy"])
def test_without_gpu_or_interpreter_each_fused_op_is_its_reference_twin(monkeypatch, name):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    function, arguments = _fused_op_calls()[name]
    got = getattr(ops, function)(*arguments)
    want = ops.TWINS[function](*arguments)
    for one, two in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(one, two)


@pytest.mark.parametrize("family", QWEN_VARLEN)
def test_qwen_vision_attention_is_one_launch_per_layer(kernel_calls, family):
    model, _, _ = _forward(optimized, family)
    vision_calls = [spec for shape, spec in kernel_calls if spec.cu_seqlens is not None]
    # Two images in the batch (and, for Qwen2.5-VL, several windows each): still one call per layer.
    assert len(vision_calls) == model.config.vision_config.depth
    assert all(len(spec.cu_seqlens) > 2 for spec in vision_calls)


@pytest.mark.parametrize("family", PIXTRAL_SEGMENTS)
def test_pixtral_block_mask_reaches_the_kernel_as_segments(kernel_calls, family):
    _forward(optimized, family)
    assert kernel_calls, "the kernel served nothing"
    assert all(spec.dense_mask is None for _, spec in kernel_calls)
    assert any(spec.cu_seqlens is not None for _, spec in kernel_calls)


@pytest.mark.parametrize("family", VISION_PATCHED)
def test_a_reference_model_loaded_after_an_optimized_one_is_untouched(kernel_calls, family):
    _, batch, optimized_logits = _forward(optimized, family)
    served_by_optimized = len(kernel_calls)
    reference_model, _, reference_logits = _forward(reference, family)
    assert len(kernel_calls) == served_by_optimized, "the reference model's attention went to the kernel"
    # The patches set `forward` on module instances: none may carry one in the reference model.
    leaked = [type(m).__name__ for m in reference_model.modules() if "forward" in vars(m)]
    assert not leaked, f"a patched forward leaked into the reference model: {leaked}"
    valid = batch["attention_mask"].bool()
    difference = (optimized_logits - reference_logits)[valid].abs().max()
    assert difference <= tolerances.MODEL_LOGITS_ATOL[torch.float32]


FUSED = {"rmsnorm": "rms_norm", "gated_activation": "gated_activation", "rope": "apply_rotary",
         "cross_entropy": "causal_lm_loss", "linear_cross_entropy": "linear_causal_lm_loss",
         "gated_lora_down": "gated_lora_down"}


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times each fused kernel ran, by kernel file name."""
    counts = dict.fromkeys(FUSED, 0)
    for name, function in FUSED.items():
        original = ops.kernels()[function]

        def spy(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setitem(ops.kernels(), function, spy)
    return counts


def _loss_and_grads(model, family: str, batch, training: bool = False):
    """The loss of `batch` (in eval or training mode) and its gradient with respect to the input
    embeddings; the logits, or None where the model did not build them."""
    model.train(training)
    with families.capturing_input_embeddings(model, family) as captured:
        out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return None if out.logits is None else out.logits.detach(), out.loss.detach(), captured[0].grad


def _text_layers(model) -> int:
    config = model.config.get_text_config()
    return config.num_hidden_layers


@pytest.mark.parametrize("family", ALL)
def test_norms_gated_mlps_rotary_and_loss_run_fused_and_match_the_reference(fused_calls, family):
    model, processor = _load(optimized, family)
    reference_model, _ = _load(reference, family)
    batch = _batch(processor, model)
    logits, loss, grads = _loss_and_grads(model, family, batch)
    counts = dict(fused_calls)
    assert counts["rope"] == _text_layers(model), f"{family}: rotary ran fused {counts['rope']} times"
    assert counts["cross_entropy"] == 1, f"{family}: the loss ran fused {counts['cross_entropy']} times"
    assert counts["gated_activation"] >= _text_layers(model), f"{family}: gated MLPs fused {counts}"
    assert counts["rmsnorm"] >= 2 * _text_layers(model) + 1, f"{family}: norms fused {counts}"

    want_logits, want_loss, want_grads = _loss_and_grads(reference_model, family, batch)
    assert fused_calls == counts, "the reference model ran a fused kernel"
    valid = batch["attention_mask"].bool()
    bound = tolerances.MODEL_LOGITS_ATOL[torch.float32]
    assert (logits - want_logits)[valid].abs().max() <= bound
    assert (loss - want_loss).abs() <= bound
    assert (grads - want_grads)[valid].abs().max() <= tolerances.model_grads_bound(0.0, want_grads[valid],
                                                                                    torch.float32)


@pytest.mark.parametrize("family", ALL)
def test_a_training_forward_fuses_the_lm_head_into_the_loss_and_builds_no_logits(fused_calls, family):
    model, processor = _load(optimized, family)
    reference_model, _ = _load(reference, family)
    batch = _batch(processor, model)
    logits, loss, grads = _loss_and_grads(model, family, batch, training=True)
    assert logits is None, f"{family}: a training forward with labels built the logits"
    assert (fused_calls["linear_cross_entropy"], fused_calls["cross_entropy"]) == (1, 0), fused_calls
    _, want_loss, want_grads = _loss_and_grads(reference_model, family, batch, training=True)
    valid = batch["attention_mask"].bool()
    assert (loss - want_loss).abs() <= tolerances.MODEL_LOGITS_ATOL[torch.float32]
    assert (grads - want_grads)[valid].abs().max() <= tolerances.model_grads_bound(0.0, want_grads[valid],
                                                                                    torch.float32)
    with torch.no_grad():  # no gradients: the logits are built, as transformers does
        assert model(**batch, labels=batch["input_ids"]).logits is not None


@pytest.mark.parametrize("family", ALL)
def test_the_fused_layers_stay_through_the_mode_switches_of_a_training_run(fused_calls, family):
    """get_peft_model, for_training, the Trainer's train() at every step, for_inference: the fused norms and
    MLPs serve throughout. transformers 5.25 with the `kernels` package it installs maps hub kernels onto
    decorated layers at load and at every mode switch, which dropped the fused norms of Llama, Qwen2 and
    Mistral text layers at for_training (0 of 5 on the tiny Llava); fastvision loads with use_kernels=False."""
    model, processor = _load(optimized, family)
    model = optimized.FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=False)
    batch = _batch(processor, model)
    api = optimized.FastVisionModel
    for switch in (api.for_training, lambda m: m.train(), api.for_inference):  # train(): the Trainer's, every step
        switch(model)
        before = dict(fused_calls)
        with torch.set_grad_enabled(model.training):
            model(**batch, labels=batch["input_ids"])
        norms = fused_calls["rmsnorm"] - before["rmsnorm"]
        gated = sum(fused_calls[op] - before[op] for op in ("gated_activation", "gated_lora_down"))
        assert norms >= 2 * _text_layers(model) + 1 and gated >= _text_layers(model), (family, norms, gated)
    assert not model.get_base_model().use_kernels


def test_no_backend_maps_hub_kernels_unless_asked():
    for backend in (reference, optimized):
        model, _ = _load(backend, "llava")
        assert not model.use_kernels, backend.__name__


def test_an_adapter_on_the_lm_head_keeps_transformers_head_and_its_logits(fused_calls):
    import peft

    model, processor = _load(optimized, "llava")
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"]))
    model.train()
    out = model(**_batch(processor, model), labels=_batch(processor, model)["input_ids"])
    assert out.logits is not None and fused_calls["linear_cross_entropy"] == 0
    assert fused_calls["cross_entropy"] == 1


def test_unpatching_gives_back_transformers_own_layers(fused_calls):
    model, processor = _load(optimized, "llava")
    model.fastvision_unpatch()
    assert not [type(m).__name__ for m in model.modules() if "forward" in vars(m)]
    assert "_loss_function" not in vars(model) and "forward" not in vars(model)
    _loss_and_grads(model, "llava", _batch(processor, model))
    assert fused_calls == dict.fromkeys(FUSED, 0)


def _perturbed_adapters(family: str):
    """An optimized model with LoRA whose B weights are drawn (zero at init: nothing to see), as the suite's
    LoRA parity test draws them."""
    from conformance.test_finetune import perturbed_adapter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor, _ = perturbed_adapter(optimized, family, device, load_in_4bit=False, dtype=torch.float32)
    return model, _batch(processor, model)


def _lora_logits_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits
    logits[batch["attention_mask"].bool()].logsumexp(-1).mean().backward()
    # Llava reads the vision tower's second-to-last layer: the last one's adapters get no gradient.
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if "lora_" in n and p.grad is not None}


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "gemma3"])
def test_lora_projections_run_as_one_op_each_and_match_peft_own_modules(monkeypatch, family):
    """Every adapted projection runs the fused op once -- a gated MLP's down projection inside the op that also
    runs its activation (gated_lora_down) -- with PEFT's own modules' logits and LoRA gradients."""
    calls = {"lora_linear": 0, "gated_lora_down": 0}
    for op in calls:
        original = ops.kernels()[op]
        monkeypatch.setitem(ops.kernels(), op, lambda *args, op=op, original=original:
                            calls.__setitem__(op, calls[op] + 1) or original(*args))
    model, batch = _perturbed_adapters(family)
    adapted = len(model.lora_plan.targets())
    logits, grads = _lora_logits_and_grads(model, batch)
    assert sum(calls.values()) == adapted, f"{family}: {calls} fused LoRA calls for {adapted} adapted projections"
    assert calls["gated_lora_down"] == _text_layers(model), f"{family}: {calls}"  # each text MLP's down_proj
    optimized.use_peft_lora(model)
    assert not [n for n, m in model.named_modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
    counted = dict(calls)
    want_logits, want_grads = _lora_logits_and_grads(model, batch)
    assert calls == counted, "PEFT's own modules still ran the fused op"
    valid = batch["attention_mask"].bool()
    assert (logits - want_logits)[valid].abs().max() <= tolerances.MODEL_LOGITS_ATOL[torch.float32]
    assert set(grads) == set(want_grads) and grads, "other LoRA weights got gradients than through PEFT's modules"
    for name, want in want_grads.items():
        assert (grads[name] - want).abs().max() <= tolerances.model_grads_bound(0.0, want, torch.float32), name


def test_a_hooked_down_projection_is_called_as_a_module_not_folded_into_its_mlp(fused_calls):
    """The MLP folds its LoRA down projection into one op only where calling the module would run nothing
    else: a forward hook (a user's, or accelerate's offload hooks) must still fire."""
    from reference.families import family_of

    model, batch = _perturbed_adapters("llava")
    layers = model.get_base_model().get_submodule(family_of(model.config).text_layers)
    fired = []
    layers[0].mlp.down_proj.register_forward_hook(lambda *_: fired.append(1))
    with torch.no_grad():
        model(**batch)
    assert fired == [1] and fused_calls["gated_lora_down"] == len(layers) - 1, (fired, fused_calls)


def test_a_disabled_adapter_gives_the_base_model_through_peft(monkeypatch):
    model, batch = _perturbed_adapters("llava")
    with torch.no_grad(), model.disable_adapter():
        disabled = model(**batch).logits
    base, _ = _load(optimized, "llava")
    with torch.no_grad():
        assert (disabled - base(**batch).logits).abs().max() <= tolerances.MODEL_LOGITS_ATOL[torch.float32]


def test_a_trained_base_bias_gets_its_gradient_as_through_peft_modules():
    """bias="all" trains the biases of the adapted projections (CLIP's, in Llava's vision tower): the fused op
    gives a frozen base no gradient, so those projections must run PEFT's own forward."""
    model, processor = _load(optimized, "llava")
    model = optimized.FastVisionModel.get_peft_model(model, bias="all")
    batch = _batch(processor, model)

    def biases_with_gradients():
        model.zero_grad(set_to_none=True)
        model(**batch).logits[batch["attention_mask"].bool()].logsumexp(-1).mean().backward()
        return {n for n, p in model.named_parameters() if n.endswith("base_layer.bias") and p.grad is not None}

    got = biases_with_gradients()
    optimized.use_peft_lora(model)
    assert got and got == biases_with_gradients()
