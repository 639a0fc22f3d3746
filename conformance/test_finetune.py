"""Fine-tuning, as Unsloth's notebooks do it: `get_peft_model`, `for_training` / `for_inference`, the vision
data collator, TRL's `SFTTrainer`, saving, reloading and merging (docs/contract.md, "After loading").

Judged from outside, against what the suite computes itself from its own family records:
  - LoRA sits on exactly the linears of the selected blocks (attention / MLP) of the selected layers
    (vision / language, the last n) intersected with an explicit `target_modules`, and nowhere else;
    only LoRA weights train, in fp32, and an optimizer step changes nothing else;
  - the backend's LoRA logits and LoRA gradients match transformers' eager model carrying the same PEFT
    adapter (the model-parity rule of conformance/tolerances.py), saved adapters reload to the same
    logits, and a merged save loads in plain transformers with the adapter model's logits — including
    from a 4-bit model, where PEFT's own merge rounds the fine-tune away;
  - TRL's SFTTrainer with the backend's collator lowers the loss on a repeated batch (the collator's labels
    are checked in test_collator.py).
"""

from __future__ import annotations

import functools
import json

import peft
import pytest
import torch
import transformers
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from conformance import checks, inputs, tolerances, zoo
from conformance.families import FAMILIES, one_each, params

ALL = params()
FLOAT32 = {"load_in_4bit": False, "dtype": torch.float32}
PLACEMENT_EXAMPLES = 8  # each example loads a model (0.1-0.3 s) and attaches adapters
ANSWER = "The picture shows a red circle on a blue gradient."
QUESTION = "Describe the picture."


def load(backend, family: str, device: str, **kwargs):
    kwargs = {"device_map": device, **kwargs}
    repro = checks.call(checks.zoo_path(family), **kwargs)
    with checks.reproducing(repro):
        model, processor = backend.FastVisionModel.from_pretrained(zoo.checkpoint(family), **kwargs)
    return model, processor, repro


def conversation(image_seed: int | None = 0, answer: str = ANSWER) -> dict:
    user = [{"type": "text", "text": QUESTION}]
    if image_seed is not None:
        user.insert(0, {"type": "image", "image": zoo.sample_image(image_seed)})
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    }


# ------------------------------------------------------------------------------------------- placement
def expected_targets(model, family: str, vision, language, attention, mlp, last_n, explicit) -> set[str]:
    """The suite's own reading of the contract's target selection."""
    record = FAMILIES[family]
    wanted = set()
    for path, (attention_block, mlp_block), on in (
        (record.vision_layers, record.vision_blocks, vision),
        (record.text_layers, record.text_blocks, language),
    ):
        layers = model.get_submodule(path)
        first = 0 if last_n is None else max(0, len(layers) - last_n)
        for index in range(first, len(layers)) if on else ():
            for block, block_on in ((attention_block, attention), (mlp_block, mlp)):
                for name, module in layers[index].get_submodule(block).named_modules() if block_on else ():
                    full = f"{path}.{index}.{block}.{name}"
                    if isinstance(module, nn.Linear) and (explicit is None or full.rsplit(".", 1)[-1] in explicit):
                        wanted.add(full)
    # docs/contract.md: the projector/merger (and lm_head) get adapters only by name in target_modules, once the
    # flags select some part and block (else the flags' ValueError). A layer's leaf name can name one there too:
    # Qwen3-VL's vision MLP and its mergers both have linear_fc1 / linear_fc2.
    flags_select = (vision or language) and (attention or mlp)
    for name, module in model.named_modules() if explicit is not None and flags_select else ():
        inside = any(name.startswith(path + ".") for path in (record.vision_layers, record.text_layers))
        if isinstance(module, nn.Linear) and not inside and name.rsplit(".", 1)[-1] in explicit:
            wanted.add(name)
    return wanted


def lora_modules(peft_model) -> set[str]:
    return {name for name, module in peft_model.get_base_model().named_modules() if hasattr(module, "lora_A")}


def leaf_names(model, family: str) -> list[str]:
    record = FAMILIES[family]
    names = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and (n.startswith(record.vision_layers + ".") or n.startswith(record.text_layers + "."))
    }
    return sorted(names)


def _attach_where_nothing_fits(backend, model, kwargs, repro):
    """get_peft_model where the flags select no module: it must raise ValueError. A backend that attaches
    LoRA anyway is named for the modules it put LoRA on, as where the flags select some."""
    got = lora_modules(backend.FastVisionModel.get_peft_model(model, **kwargs))
    checks.check(not got, f"LoRA on {sorted(got)[:4]} (not asked for: the flags select no module)", repro=repro)


@pytest.mark.parametrize("family", ALL)
@settings(max_examples=PLACEMENT_EXAMPLES, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(data=st.data())
def test_lora_sits_exactly_where_the_flags_and_targets_say(backend, device, family, data):
    model, _, load_repro = load(backend, family, device)
    flags = {
        name: data.draw(st.booleans(), label=name)
        for name in (
            "finetune_vision_layers",
            "finetune_language_layers",
            "finetune_attention_modules",
            "finetune_mlp_modules",
        )
    }
    last_n = data.draw(st.sampled_from((None, 1)), label="finetune_last_n_layers")
    leaves = leaf_names(model, family)
    explicit = data.draw(
        st.one_of(st.none(), st.lists(st.sampled_from(leaves), min_size=1, max_size=3, unique=True)),
        label="target_modules",
    )
    kwargs = {**flags, "finetune_last_n_layers": last_n, "target_modules": explicit}
    repro = f"model = {load_repro}; FastVisionModel.get_peft_model(model, **{kwargs!r})"
    want = expected_targets(model, family, *flags.values(), last_n, explicit)
    if not want:
        checks.expect_error(lambda: _attach_where_nothing_fits(backend, model, kwargs, repro), ValueError, repro=repro)
        return
    with checks.reproducing(repro):
        peft_model = backend.FastVisionModel.get_peft_model(model, **kwargs)
    got = lora_modules(peft_model)
    checks.check(
        got == want,
        f"LoRA on {sorted(got - want)[:4]} (not asked for), missing on {sorted(want - got)[:4]}",
        repro=repro,
    )
    plan = getattr(peft_model, "lora_plan", None)
    checks.check(
        plan is not None and set(plan.targets()) == want, "model.lora_plan does not list the LoRA modules", repro=repro
    )


@pytest.mark.parametrize("family", ALL)
def test_only_lora_trains_in_fp32_and_a_step_changes_nothing_else(backend, device, family):
    model, processor, load_repro = load(backend, family, device)
    repro = f"model = {load_repro}; model = FastVisionModel.get_peft_model(model); one AdamW step"
    with checks.reproducing(repro):
        model = backend.FastVisionModel.get_peft_model(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    not_lora = [n for n in trainable if "lora_" not in n]
    checks.check(trainable and not not_lora, f"trainable besides LoRA: {not_lora[:3]}", repro=repro)
    wrong = {n: str(p.dtype) for n, p in trainable.items() if p.dtype != torch.float32}
    checks.check(not wrong, f"LoRA weights not in float32: {dict(list(wrong.items())[:3])}", repro=repro)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    batch = inputs.image_batch(processor).to(device)
    with checks.reproducing(repro):
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
    changed = [n for n, p in model.named_parameters() if not p.requires_grad and not torch.equal(p, frozen[n])]
    checks.check(not changed, f"an optimizer step changed frozen weights: {changed[:3]}", repro=repro)
    moved = [n for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0]
    checks.check(moved, "no LoRA weight got a gradient", repro=repro)


def test_get_peft_model_errors_name_the_argument(backend, device):
    cases = {
        "r": 0,
        "lora_alpha": 0,
        "lora_dropout": 1.0,
        "bias": "some",
        "task_type": "NOT_A_TASK",
        "use_gradient_checkpointing": "always",
        "finetune_last_n_layers": 0,
    }
    model, _, load_repro = load(backend, "llava", device)
    for name, value in cases.items():
        repro = f"model = {load_repro}; FastVisionModel.get_peft_model(model, {name}={value!r})"
        call = functools.partial(backend.FastVisionModel.get_peft_model, model, **{name: value})
        checks.expect_error(call, (TypeError, ValueError), names=(name,), repro=repro)
    for name in ("qat_scheme", "target_parameters"):
        repro = f"model = {load_repro}; FastVisionModel.get_peft_model(model, {name}='x')"
        call = functools.partial(backend.FastVisionModel.get_peft_model, model, **{name: "x"})
        checks.expect_error(call, NotImplementedError, names=(name,), repro=repro)
    peft_model = backend.FastVisionModel.get_peft_model(model)
    checks.expect_error(
        lambda: backend.FastVisionModel.get_peft_model(peft_model),
        ValueError,
        repro=f"model = {load_repro}; get_peft_model twice",
    )


# ----------------------------------------------------------------------------------- train / generate
def _state(model, processor) -> dict:
    configs = [model.config, getattr(model.config, "text_config", None)]
    return {
        "training": model.training,
        "checkpointed layers": sum(1 for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True),
        "use_cache": {c.use_cache for c in configs if c is not None and hasattr(c, "use_cache")},
        "padding_side": getattr(processor, "tokenizer", processor).padding_side,
    }


# Gemma3's tied lm_head is the one structural difference the training/inference toggles meet (one family each).
@pytest.mark.parametrize("family", one_each(lambda f: f.tied_embeddings))
def test_for_training_and_for_inference_toggle_the_model_and_processor(backend, device, family):
    model, processor, load_repro = load(backend, family, device)
    model = backend.FastVisionModel.get_peft_model(model)
    for step in ("for_training", "for_training", "for_inference", "for_inference", "for_training"):
        getattr(backend.FastVisionModel, step)(model)
        state, repro = _state(model, processor), f"model = {load_repro}; get_peft_model; ... {step}(model)"
        if step == "for_training":
            want = {"training": True, "use_cache": {False}, "padding_side": "right"}
            checks.check(state["checkpointed layers"] > 0, "for_training left checkpointing off", repro=repro)
        else:
            want = {"training": False, "use_cache": {True}, "padding_side": "left", "checkpointed layers": 0}
        checks.check_equal({k: state[k] for k in want}, want, f"state after {step}", repro=repro)


# ------------------------------------------------------------------------------------------------ TRL
@pytest.mark.parametrize("family", ALL)
def test_two_sft_trainer_steps_lower_the_loss_on_a_repeated_batch(backend, device, family, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, processor, load_repro = load(backend, family, device, max_seq_length=1024)
    model = backend.FastVisionModel.get_peft_model(model)
    backend.FastVisionModel.for_training(model)
    repro = f"model, processor = {load_repro}; get_peft_model; for_training; SFTTrainer(...).train() for 2 steps"
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        optim="adamw_torch",
        seed=0,
        remove_unused_columns=False,
        dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=1024,
        use_cpu=device == "cpu",
        disable_tqdm=True,
    )
    dataset = Dataset.from_list([conversation(0), conversation(0)] * 2)
    chosen = checkpointing_functions(model)
    with checks.reproducing(repro):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=processor,
            data_collator=backend.UnslothVisionDataCollator(model, processor),
        )
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    checks.check(len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), f"losses {losses}", repro=repro)
    checks.check(losses[1] < losses[0], f"the loss did not fall on a repeated batch: {losses}", repro=repro)
    # SFTConfig turns gradient checkpointing on by default, and the Trainer calls the model's checkpointing
    # entry point at train(): the mode chosen at load ("unsloth" offloading) must survive it.
    checks.check_equal(checkpointing_functions(model), chosen, "checkpoint functions after train()", repro=repro)


def checkpointing_functions(model) -> set:
    return {getattr(getattr(m, "_gradient_checkpointing_func", None), "__qualname__", None) for m in model.modules()
            if getattr(m, "gradient_checkpointing", False) is True}


# --------------------------------------------------------------------------- parity, reload and merges
def perturbed_adapter(backend, family: str, device: str, **kwargs):
    """A model with LoRA whose B weights are drawn (at init they are zero: no fine-tune to see)."""
    model, processor, load_repro = load(backend, family, device, **kwargs)
    model = backend.FastVisionModel.get_peft_model(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval(), processor, f"model, processor = {load_repro}; get_peft_model; lora_B ~ N(0, 0.05)"


def logits_and_lora_grads(model, batch, valid):
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits
    logits[valid].float().logsumexp(-1).mean().backward()
    grads = {
        n.replace(".default", ""): p.grad.detach().clone()
        for n, p in model.named_parameters()
        if "lora_" in n and p.grad is not None
    }
    return logits.detach(), grads


def _eager(family: str, device: str, dtype: torch.dtype):
    """transformers' eager model of the zoo checkpoint, a fresh one each call (PEFT wraps it in place)."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        zoo.checkpoint(family), attn_implementation="eager", dtype=dtype
    )
    return model.to(device).eval()


def eager_with(adapter_model, family: str, device: str, dtype: torch.dtype):
    """transformers' eager model in `dtype` carrying the same LoRA adapter as `adapter_model` (PEFT)."""
    config = adapter_model.peft_config["default"]
    judge = peft.get_peft_model(
        _eager(family, device, dtype),
        peft.LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha,
            target_modules=sorted(lora_modules(adapter_model)),
            lora_dropout=0.0,
        ),
    )
    peft.set_peft_model_state_dict(judge, peft.get_peft_model_state_dict(adapter_model))
    for parameter in judge.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return judge.eval()


@pytest.mark.parametrize("family", ALL)
def test_lora_logits_and_gradients_match_transformers_with_the_same_adapter(backend, device, family):
    model, processor, repro = perturbed_adapter(backend, family, device, load_in_4bit=False)
    dtype = model.get_input_embeddings().weight.dtype
    batch = inputs.image_batch(processor).to(device)
    valid = batch["attention_mask"].bool()
    with checks.reproducing(repro):
        got, got_grads = logits_and_lora_grads(model, batch, valid)
    truth, truth_grads = logits_and_lora_grads(eager_with(model, family, device, torch.float32), batch, valid)
    yard, yard_grads = logits_and_lora_grads(eager_with(model, family, device, dtype), batch, valid)
    err, yard_err = (got - truth)[valid].abs().max().item(), (yard - truth)[valid].abs().max().item()
    bound = tolerances.model_logits_bound(yard_err, dtype)
    checks.check(err <= bound, f"LoRA logits differ from transformers + PEFT by {err:.3g} > {bound:.3g}", repro=repro)
    checks.check(
        set(got_grads) == set(truth_grads), "the LoRA weights with gradients differ from the judge's", repro=repro
    )
    for name, want in truth_grads.items():
        error = (got_grads[name].float() - want).abs().max().item()
        bound = tolerances.model_grads_bound((yard_grads[name].float() - want).abs().max().item(), want, dtype)
        checks.check(
            error <= bound, f"gradient of {name} differs from the judge's by {error:.3g} > {bound:.3g}", repro=repro
        )


def training_loss_and_lora_grads(model, batch, labels):
    """A training forward with labels, as Trainer runs it: the loss, its LoRA gradients, the logits (None
    where the backend does not build them in training: the contract allows it)."""
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(**batch, labels=labels)
    out.loss.backward()
    grads = {n.replace(".default", ""): p.grad.detach().clone() for n, p in model.named_parameters()
             if "lora_" in n and p.grad is not None}
    return out.loss.detach(), grads, None if out.logits is None else out.logits.detach()


@pytest.mark.parametrize("family", ALL)
def test_the_training_loss_and_its_lora_gradients_match_transformers_with_the_same_adapter(backend, device, family):
    model, processor, repro = perturbed_adapter(backend, family, device, load_in_4bit=False)
    repro += "; model.train(); model(**batch, labels=labels).loss.backward()"
    dtype = model.get_input_embeddings().weight.dtype
    batch = inputs.image_batch(processor).to(device)
    # Padding and the first third of every row's own tokens ignored, as a responses-only collator leaves the
    # prompt. Counted from each row's first token, not from column 0: a row left-padded by a third or more (16
    # of 48 columns in Qwen3-VL's batch) would otherwise keep the label its last pad position predicts, and a
    # fully masked row's logits are the backend's own (0 from the contract's attention, a uniform average in
    # eager): a loss gap of 3e-3 that says nothing of training.
    valid = batch["attention_mask"].bool()
    prompt = valid.cumsum(dim=1) <= valid.sum(dim=1, keepdim=True) // 3
    labels = batch["input_ids"].masked_fill(~valid | prompt, -100)
    with checks.reproducing(repro):
        loss, grads, logits = training_loss_and_lora_grads(model, batch, labels)
    truth, truth_grads, truth_logits = training_loss_and_lora_grads(eager_with(model, family, device, torch.float32),
                                                                    batch, labels)
    yard, yard_grads, yard_logits = training_loss_and_lora_grads(eager_with(model, family, device, dtype), batch,
                                                                 labels)
    err, bound = (loss - truth).abs().item(), tolerances.training_loss_bound((yard - truth).abs().item(), dtype)
    checks.check(err <= bound, f"training loss differs from transformers + PEFT by {err:.3g} > {bound:.3g}",
                 repro=repro)
    checks.check_equal(set(grads), set(truth_grads), "LoRA weights with gradients", repro=repro)
    for name, want in truth_grads.items():
        error = (grads[name].float() - want).abs().max().item()
        bound = tolerances.model_grads_bound((yard_grads[name].float() - want).abs().max().item(), want, dtype)
        checks.check(error <= bound, f"training gradient of {name} differs from the judge's by {error:.3g} > "
                     f"{bound:.3g}", repro=repro)
    if logits is not None:  # built after all: they must be the model's logits
        valid = batch["attention_mask"].bool()
        error = (logits.float() - truth_logits)[valid].abs().max().item()
        bound = tolerances.model_logits_bound((yard_logits.float() - truth_logits)[valid].abs().max().item(), dtype)
        checks.check(error <= bound, f"training logits differ from the judge's by {error:.3g} > {bound:.3g}",
                     repro=repro)


def _valid_logits(model, processor, device):
    batch = inputs.image_batch(processor).to(device)
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()].float()


@pytest.mark.parametrize("bits", ["16bit", "4bit"])
# A reload finds its LoRA targets again by module name: one family per layout of block names, tied or not.
@pytest.mark.parametrize("family", one_each(lambda f: (f.vision_blocks, f.tied_embeddings)))
def test_a_saved_adapter_reloads_to_the_same_logits(backend, device, family, bits, tmp_path):
    kwargs = FLOAT32 if bits == "16bit" else {"dtype": torch.float32}
    model, processor, repro = perturbed_adapter(backend, family, device, **kwargs)
    want = _valid_logits(model, processor, device)
    model.save_pretrained(tmp_path / "lora")
    processor.save_pretrained(tmp_path / "lora")
    repro += f"; model.save_pretrained(dir); FastVisionModel.from_pretrained(dir, **{kwargs!r})"
    with checks.reproducing(repro):
        again, again_processor = backend.FastVisionModel.from_pretrained(tmp_path / "lora", device_map=device, **kwargs)
        got = _valid_logits(backend.FastVisionModel.for_inference(again), again_processor, device)
    error = (got - want).abs().max().item()
    checks.check(
        error <= tolerances.MODEL_LOGITS_ATOL[torch.float32],
        f"reloaded adapter: logits differ by {error:.3g}",
        repro=repro,
    )


@pytest.mark.parametrize("family", ALL)
def test_a_merged_16bit_save_loads_in_plain_transformers_with_the_adapter_logits(backend, device, family, tmp_path):
    model, processor, repro = perturbed_adapter(backend, family, device, **FLOAT32)
    want = _valid_logits(model, processor, device)
    repro += "; model.save_pretrained_merged(dir, processor); AutoModelForImageTextToText.from_pretrained(dir)"
    with checks.reproducing(repro):
        model.save_pretrained_merged(tmp_path / "merged", processor, save_method="merged_16bit")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    checks.check("quantization_config" not in config, "the merged config is quantized", repro=repro)
    plain = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).to(
        device
    )
    plain_processor = transformers.AutoProcessor.from_pretrained(tmp_path / "merged")
    error = (_valid_logits(plain, plain_processor, device) - want).abs().max().item()
    bound = tolerances.MODEL_LOGITS_ATOL[torch.float32]
    checks.check(
        error <= bound, f"merged model's logits differ from the adapter model's by {error:.3g} > {bound}", repro=repro
    )


# The merge must survive NF4's noise: the family with the most (its 4-bit bound loosened) and an ordinary one.
@pytest.mark.parametrize("family", one_each(lambda f: f.nf4_logits_min_sqnr_db is not None))
def test_merging_a_4bit_fine_tune_keeps_it(backend, device, family, tmp_path):
    # PEFT's merge_and_unload() on the 4-bit model re-quantizes base + delta and rounds the delta away.
    model, processor, repro = perturbed_adapter(backend, family, device, dtype=torch.float32)
    tuned = _valid_logits(model, processor, device)
    with model.disable_adapter():
        base4 = _valid_logits(model, processor, device)
    repro += "; model.save_pretrained_merged(dir, processor)"
    with checks.reproducing(repro):
        model.save_pretrained_merged(tmp_path / "merged", processor)
    merged = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).to(
        device
    )
    base16 = _eager(family, device, torch.float32)
    kept = tolerances.sqnr_db(
        tuned - base4, _valid_logits(merged, processor, device) - _valid_logits(base16, processor, device)
    )
    bound = tolerances.MERGED_DELTA_MIN_SQNR_DB
    checks.check(
        kept >= bound,
        f"the merged model keeps {kept:.1f} dB of the fine-tune's logit change, < {bound} dB",
        repro=repro,
    )
    model.save_pretrained_merged(tmp_path / "merged4", processor, save_method="merged_4bit_forced")
    config = json.loads((tmp_path / "merged4" / "config.json").read_text())
    checks.check(
        config.get("quantization_config", {}).get("load_in_4bit"), "merged_4bit_forced is not 4-bit", repro=repro
    )
    checks.expect_error(
        lambda: model.save_pretrained_merged(tmp_path / "x", processor, save_method="merged_4bit"),
        ValueError,
        names=("merged_4bit_forced",),
        repro=repro,
    )
