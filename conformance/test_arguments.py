"""Every argument row of docs/contract.md: what each value does to the loaded model, and how each value the
contract does not accept is rejected (builtin type, message naming the argument and the value).

Loads are of the zoo's tiny checkpoints (0.1-1.5 s each on a CPU), so hypothesis tests that load bound
their examples; tests that only read a model share one load per family (`default_load`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import secrets
import shutil

import huggingface_hub
import pytest
import torch
import transformers
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from conformance import checks, inputs, plugin, strategies, tolerances, zoo
from conformance.families import FAMILIES, params

ALL = params()
NOT_TIED = params([f.name for f in FAMILIES.values() if not f.tied_embeddings])
TIED = params([f.name for f in FAMILIES.values() if f.tied_embeddings])
FAST_INFERENCE = params([f.name for f in FAMILIES.values() if f.fast_inference])
NO_FAST_INFERENCE = params([f.name for f in FAMILIES.values() if not f.fast_inference])
SIXTEEN_BIT = {"load_in_4bit": False}  # the quickest load, where quantization is beside the point
# A load is 0.1-0.3 s once a family's modules are imported; 10 examples per family cost ~2 s each.
LOAD_EXAMPLES = 10
# No shrinking where an example may load a model: each shrink step is one more load (a wrongly accepted
# dtype shrank for two minutes), and the failure's reproduction line already names the whole call.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


def load(backend, family: str, **kwargs):
    """(model, processor, repro) of `FastVisionModel.from_pretrained(zoo.checkpoint(family), **kwargs)`."""
    repro = checks.call(checks.zoo_path(family), **kwargs)
    with checks.reproducing(repro):
        model, processor = backend.FastVisionModel.from_pretrained(zoo.checkpoint(family), **kwargs)
    return model, processor, repro


@pytest.fixture(scope="module")
def default_load(backend):
    """The plain call `from_pretrained(zoo.checkpoint(family))`, loaded once per family, for tests that
    only read the result."""
    return functools.cache(lambda family: load(backend, family))


def resolved_dtype(dtype, device: str) -> torch.dtype:
    """docs/contract.md: None is bf16 on a GPU that has it, else fp16 on a GPU, float32 on the CPU."""
    if isinstance(dtype, str):
        dtype = strategies.DTYPE_NAMES[dtype]
    on_gpu = device == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if on_gpu else torch.float32
    if dtype == torch.bfloat16 and on_gpu and not torch.cuda.is_bf16_supported():
        return torch.float16
    return dtype


def parameter_dtype(kwargs: dict, device: str) -> torch.dtype:
    """Storage dtype of a parameter that is not quantized: fp32 master weights in full finetuning when
    float32_mixed_precision resolves to True (None: True, except bf16 full finetuning)."""
    dtype = resolved_dtype(kwargs.get("dtype"), device)
    if strategies.resolved_mode(kwargs) == "full":
        master_fp32 = kwargs.get("float32_mixed_precision")
        if master_fp32 is None:
            master_fp32 = dtype != torch.bfloat16
        if master_fp32:
            return torch.float32
    return dtype


def quantized_language_linears(model, family: str) -> list[str]:
    """Linear layers of the language model whose weight is not a float tensor (NF4 or int8 storage)."""
    lm = model.get_submodule(FAMILIES[family].language_model)
    return [n for n, m in lm.named_modules() if isinstance(m, nn.Linear) and not m.weight.dtype.is_floating_point]


def checkpointing_layers(model) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


def use_cache_values(model) -> dict[str, object]:
    configs = {"config": model.config, **{k: getattr(model.config, k, None) for k in ("text_config", "vision_config")}}
    return {name: c.use_cache for name, c in configs.items() if c is not None and hasattr(c, "use_cache")}


# ----------------------------------------------------------------------------- the model of the contract
def check_load_matches_contract(model, family: str, kwargs: dict, device: str, repro: str) -> None:
    """Everything docs/contract.md predicts from the arguments of one load, observed on the model."""
    mode = strategies.resolved_mode(kwargs)
    plan_kinds = set(model.quantization_plan.kinds().values()) - {"keep"}
    want_kinds = {"4bit": {"nf4"}, "8bit": {"int8"}}.get(mode, set())
    checks.check_equal(plan_kinds, want_kinds, f"quantized kinds in the plan of a {mode} load", repro=repro)
    quantized = quantized_language_linears(model, family)
    checks.check(bool(quantized) == bool(want_kinds),
                 f"{mode} load: {len(quantized)} language-model linears hold quantized weights",
                 repro=repro)
    want_dtype = parameter_dtype(kwargs, device)
    checks.check_equal(model.get_input_embeddings().weight.dtype, want_dtype, "input embedding dtype", repro=repro)
    floats = [(n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point]
    wrong = [n for n, p in floats if p.requires_grad != (mode == "full")]
    state = "trainable (full_finetuning)" if mode == "full" else "frozen (LoRA mode)"
    checks.check(not wrong, f"parameters not {state}: {wrong[:3]} (+{max(0, len(wrong) - 3)})", repro=repro)
    off_device = [n for n, p in model.named_parameters() if p.device.type != device]
    checks.check(not off_device, f"parameters not on {device}: {off_device[:3]}", repro=repro)
    check_max_seq_length(model, family, kwargs.get("max_seq_length", 2048), repro)
    checkpointing = kwargs.get("use_gradient_checkpointing", "unsloth")
    layers = len(checkpointing_layers(model))
    checks.check(bool(layers) == (checkpointing is not False),
                 f"use_gradient_checkpointing={checkpointing!r}: {layers} layers checkpointed", repro=repro)
    if checkpointing is not False:
        cached = {k: v for k, v in use_cache_values(model).items() if v is not False}
        checks.check(not cached, f"checkpointing on but use_cache is not False in {cached}", repro=repro)


def check_max_seq_length(model, family: str, expected: int, repro: str) -> None:
    checks.check_equal(getattr(model, "max_seq_length", None), expected, "model.max_seq_length", repro=repro)
    lm = model.get_submodule(FAMILIES[family].language_model)
    checks.check_equal(getattr(lm, "max_seq_length", None), expected, "language model's max_seq_length", repro=repro)


@pytest.mark.parametrize("family", ALL)
@settings(max_examples=LOAD_EXAMPLES, phases=NO_SHRINK)
@given(data=st.data())
def test_valid_arguments_load_as_the_contract_says(backend, device, family, data):
    # Defaults are randomly passed or left out (specified_kwargs), so both must give the same model.
    kwargs = data.draw(strategies.load_kwargs(device), label="kwargs")
    default_dtype = torch.get_default_dtype()
    model, _, repro = load(backend, family, **kwargs)
    check_load_matches_contract(model, family, kwargs, device, repro)
    checks.check_equal(torch.get_default_dtype(), default_dtype, "torch's default dtype after the load", repro=repro)


# ----------------------------------------------------------------------------------- invalid values
@pytest.mark.parametrize("argument", sorted(strategies.INVALID))
@settings(phases=NO_SHRINK)
@given(data=st.data())
def test_invalid_value_is_rejected_naming_it(backend, argument, data):
    invalid = strategies.INVALID[argument]
    value = data.draw(invalid.values, label=argument)
    kwargs = {**data.draw(strategies.harmless_kwargs(exclude=[argument]), label="others"), argument: value}
    kwargs.setdefault("model_name", zoo.checkpoint("llava"))
    shown = dict(kwargs)
    model_name = shown.pop("model_name")
    repro = checks.call(model_name if argument == "model_name" else checks.zoo_path("llava"), **shown)
    checks.expect_error(lambda: backend.FastVisionModel.from_pretrained(**kwargs), invalid.errors,
                        names=(argument,), value=value, repro=repro)


@settings(max_examples=3, phases=NO_SHRINK)  # each example reaches the model class (about 0.3 s)
@given(suffix=st.from_regex(r"\A[a-z][a-z0-9_]{0,8}\Z"))
def test_unknown_keyword_is_rejected_by_name(backend, suffix):
    name = f"fastvision_unknown_{suffix}"  # the prefix keeps it clear of every real keyword
    repro = checks.call(checks.zoo_path("llava"), **SIXTEEN_BIT, **{name: 1})
    kwargs = {**SIXTEEN_BIT, name: 1}
    checks.expect_error(lambda: backend.FastVisionModel.from_pretrained(zoo.checkpoint("llava"), **kwargs),
                        (TypeError, ValueError), names=(name,), repro=repro)


# ------------------------------------------------------------------------------- arguments at depth
def _drawn_invalid(data, count: int) -> dict:
    names = data.draw(st.lists(st.sampled_from(sorted(set(strategies.INVALID) - {"model_name"})), min_size=count,
                               max_size=count, unique=True), label="invalid arguments")
    return {name: data.draw(strategies.INVALID[name].values, label=name) for name in names}


@pytest.mark.parametrize("family", ALL)
@settings(max_examples=plugin.argument_fuzz_examples(), phases=NO_SHRINK)  # 1,000 under --profile thorough
@given(data=st.data())
def test_every_drawn_call_loads_or_raises_a_documented_error_naming_an_argument(backend, device, family, data):
    # Valid calls of every shape, and the same with one or two arguments made invalid: a valid call must load
    # as the contract says; any invalid one must raise a builtin the contract names, naming one of them.
    kwargs = data.draw(strategies.load_kwargs(device), label="valid")
    invalid = _drawn_invalid(data, data.draw(st.sampled_from((0, 0, 1, 2)), label="how many invalid"))
    kwargs.update(invalid)
    repro = checks.call(checks.zoo_path(family), **kwargs)
    if not invalid:
        with checks.reproducing(repro):
            model, _ = backend.FastVisionModel.from_pretrained(zoo.checkpoint(family), **kwargs)
        check_load_matches_contract(model, family, kwargs, device, repro)
        return
    errors = tuple({error for name in invalid for error in strategies.INVALID[name].errors})
    seen = checks.expect_error(lambda: backend.FastVisionModel.from_pretrained(zoo.checkpoint(family), **kwargs),
                               errors, repro=repro)
    checks.check(any(name in seen.message for name in invalid),
                 f"{seen.type_name} names none of the invalid arguments {sorted(invalid)}: {seen.message!r}",
                 repro=repro)


# ---------------------------------------------------------------------------------------- load modes
CONFLICTS = {
    "4bit+8bit": {"load_in_4bit": True, "load_in_8bit": True},
    "default 4bit+8bit": {"load_in_8bit": True},  # load_in_4bit defaults to True
    "4bit+16bit": {"load_in_4bit": True, "load_in_16bit": True},
    "8bit+16bit": {"load_in_4bit": False, "load_in_8bit": True, "load_in_16bit": True},
    "all three": {"load_in_4bit": True, "load_in_8bit": True, "load_in_16bit": True},
}


@pytest.mark.parametrize("case", CONFLICTS)
def test_only_one_load_mode(backend, case):
    kwargs = CONFLICTS[case]
    named = [k for k in ("load_in_4bit", "load_in_8bit", "load_in_16bit") if kwargs.get(k, k == "load_in_4bit")]
    repro = checks.call(checks.zoo_path("llava"), **kwargs)
    checks.expect_error(lambda: backend.FastVisionModel.from_pretrained(zoo.checkpoint("llava"), **kwargs), ValueError,
                        names=named, repro=repro)


@pytest.mark.parametrize("dtype", [None, *strategies.TORCH_DTYPES, *strategies.DTYPE_NAMES], ids=str)
def test_dtype_values(backend, device, dtype):
    model, _, repro = load(backend, "llava", dtype=dtype, **SIXTEEN_BIT)
    want = resolved_dtype(dtype, device)
    checks.check_equal(model.get_input_embeddings().weight.dtype, want, f"dtype={dtype!r} embedding dtype", repro=repro)
    checks.check_equal(model.lm_head.weight.dtype, want, f"dtype={dtype!r} lm_head dtype", repro=repro)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.is_bf16_supported(), reason="this GPU has bf16")
def test_bf16_on_a_gpu_without_it_warns_and_gives_fp16(backend):
    with checks.recording_warnings() as recorded:
        model, _, repro = load(backend, "llava", dtype=torch.bfloat16, **SIXTEEN_BIT)
    checks.check_warned(recorded, "bf", repro=repro)
    checks.check_equal(model.get_input_embeddings().weight.dtype, torch.float16, "embedding dtype", repro=repro)


@pytest.mark.parametrize("flags", [{}, {"load_in_4bit": False, "load_in_8bit": True}], ids=["4bit", "8bit"])
def test_full_finetuning_clears_quantization_with_a_warning(backend, device, flags):
    flag = "load_in_8bit" if flags else "load_in_4bit"
    with checks.recording_warnings() as recorded:
        model, _, repro = load(backend, "llava", full_finetuning=True, **flags)
    checks.check_warned(recorded, "full_finetuning", flag, repro=repro)
    check_load_matches_contract(model, "llava", {"full_finetuning": True, **flags}, device, repro)


@pytest.mark.parametrize("family", ALL)
def test_lora_mode_freezes_every_parameter(default_load, family):
    model, _, repro = default_load(family)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    checks.check(not trainable, f"LoRA mode left {len(trainable)} parameters trainable, e.g. {trainable[:3]}",
                 repro=repro)


@pytest.mark.parametrize("family", ALL)
def test_full_finetuning_trains_every_parameter(backend, device, family):
    model, _, repro = load(backend, family, full_finetuning=True)
    check_load_matches_contract(model, family, {"full_finetuning": True}, device, repro)


@pytest.mark.parametrize("mixed", [None, True, False], ids=lambda m: f"fp32_mixed={m}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_mixed_precision_in_full_finetuning(backend, device, dtype, mixed):
    kwargs = {"full_finetuning": True, "dtype": dtype, "float32_mixed_precision": mixed}
    model, _, repro = load(backend, "llava", **kwargs)
    want = parameter_dtype(kwargs, device)
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype.is_floating_point and p.dtype != want}
    checks.check(not wrong, f"full finetuning parameters in {wrong}, expected {want}", repro=repro)


# --------------------------------------------------------------------------------------------- token
def _files_containing(root, text: str) -> list[str]:
    needle = text.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_token_is_never_written_logged_or_set_globally(backend, tmp_path, monkeypatch, capfd, caplog):
    cache = checks.use_hub_cache(tmp_path / "hf_home", monkeypatch)
    repo_id = "fastvision-conformance/tiny-llava"
    cache.add(repo_id, zoo.checkpoint("llava"))
    secret = "hf_secret" + secrets.token_hex(12)
    env_before, token_before = dict(os.environ), huggingface_hub.get_token()
    caplog.set_level(logging.DEBUG)
    repro = checks.call(repo_id, token=secret, **SIXTEEN_BIT)
    with checks.recording_warnings() as recorded, checks.reproducing(repro):
        model, processor = backend.FastVisionModel.from_pretrained(repo_id, token=secret, **SIXTEEN_BIT)
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    written = _files_containing(tmp_path, secret) + _files_containing(zoo.checkpoint("llava"), secret)
    checks.check(not written, f"the token was written to {written}", repro=repro)
    out, err = capfd.readouterr()
    shown = [where for where, text in [("stdout", out), ("stderr", err), ("logs", caplog.text),
                                       ("warnings", " ".join(recorded.messages)), ("model.config", repr(model.config)),
                                       ("processor", repr(processor))] if secret in text]
    checks.check(not shown, f"the token appears in {shown}", repro=repro)
    changed = sorted(k for k in set(os.environ) | set(env_before) if os.environ.get(k) != env_before.get(k))
    checks.check(not changed, f"the load changed environment variables {changed}", repro=repro)
    checks.check_equal(huggingface_hub.get_token(), token_before, "huggingface_hub.get_token() after the load",
                       repro=repro)


# ---------------------------------------------------------------------------------------- device_map
@pytest.mark.parametrize("choice", ["sequential", "auto", "balanced", "device string", "dict"])
def test_device_map_values_place_the_model(backend, device, choice):
    device_string = "cuda:0" if device == "cuda" else "cpu"
    value = {"device string": device_string, "dict": {"": device_string}}.get(choice, choice)
    model, _, repro = load(backend, "llava", device_map=value, **SIXTEEN_BIT)
    elsewhere = {str(p.device) for p in model.parameters() if p.device.type != device}
    checks.check(not elsewhere, f"device_map={value!r} put parameters on {elsewhere}, expected {device}", repro=repro)


# ---------------------------------------------------------------------------- checkpoint directories
def _copy_checkpoint(family: str, destination, keep=lambda name: True):
    shutil.copytree(zoo.checkpoint(family), destination, ignore=lambda _d, names: [n for n in names if not keep(n)])
    return destination


def test_remote_code_checkpoint_is_refused_without_trust_remote_code(backend, tmp_path):
    # Only the config says so; the modeling file does not exist, so nothing can run even by mistake.
    path = _copy_checkpoint("llava", tmp_path / "remote")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_remote.RemoteForConditionalGeneration"}
    (path / "config.json").write_text(json.dumps(config))
    repro = f"{checks.call(path, **SIXTEEN_BIT)}  # config.json has an auto_map"
    checks.expect_error(lambda: backend.FastVisionModel.from_pretrained(path, **SIXTEEN_BIT), Exception,
                        names=("trust_remote_code",), repro=repro)


@pytest.mark.parametrize("model_types", [["llava"], ["siglip", "llava"]], ids=str)
def test_model_types_containing_the_checkpoint_type_load(backend, model_types):
    model, _, repro = load(backend, "llava", model_types=model_types, **SIXTEEN_BIT)
    checks.check_equal(model.config.model_type, "llava", "model_type", repro=repro)


def test_model_types_without_the_checkpoint_type_are_refused(backend):
    kwargs = {"model_types": ["qwen2_vl", "gemma3"], **SIXTEEN_BIT}
    repro = checks.call(checks.zoo_path("llava"), **kwargs)
    checks.expect_error(lambda: backend.FastVisionModel.from_pretrained(zoo.checkpoint("llava"), **kwargs), ValueError,
                        names=("model_types", "llava"), repro=repro)


PROCESSOR_MARKER = "{#- fastvision-conformance: this processor came from tokenizer_name -#}"


def test_tokenizer_name_is_where_the_processor_comes_from(backend, tmp_path):
    weights = {"config.json", "model.safetensors", "generation_config.json"}
    model_dir = _copy_checkpoint("llava", tmp_path / "weights", keep=lambda n: n in weights)
    processor_dir = _copy_checkpoint("llava", tmp_path / "processor", keep=lambda n: n not in weights)
    template = processor_dir / "chat_template.jinja"
    template.write_text(PROCESSOR_MARKER + template.read_text())
    repro = checks.call(model_dir, tokenizer_name=processor_dir, **SIXTEEN_BIT)
    with checks.reproducing(repro):
        _, processor = backend.FastVisionModel.from_pretrained(model_dir, tokenizer_name=processor_dir, **SIXTEEN_BIT)
    checks.check_equal(type(processor).__name__, FAMILIES["llava"].processor_class, "processor class", repro=repro)
    checks.check(PROCESSOR_MARKER in (processor.chat_template or ""),
                 "the processor's chat template is not the one in tokenizer_name's folder", repro=repro)


@pytest.mark.parametrize("family", ALL)
def test_auto_model_accepts_the_auto_class_and_the_family_class(backend, family):
    family_class = getattr(transformers, FAMILIES[family].model_class)
    by_auto, _, _ = load(backend, family, auto_model=transformers.AutoModelForImageTextToText, **SIXTEEN_BIT)
    by_class, _, repro = load(backend, family, auto_model=family_class, **SIXTEEN_BIT)
    for model in (by_auto, by_class):
        checks.check_equal(type(model).__name__, FAMILIES[family].model_class, "model class", repro=repro)
    auto_state, class_state = by_auto.state_dict(), by_class.state_dict()
    differ = [k for k in auto_state if k not in class_state or not torch.equal(auto_state[k], class_state[k])]
    checks.check(not differ, f"auto class and family class loads differ in {differ[:3]}", repro=repro)


def test_auto_config_is_used_instead_of_config_json(backend):
    config = transformers.AutoConfig.from_pretrained(zoo.checkpoint("llava"))
    config.fastvision_conformance_marker = "from auto_config"
    config.text_config.rms_norm_eps = 0.25  # the checkpoint's is 1e-6
    repro = checks.call(checks.zoo_path("llava"), auto_config=checks.Raw("<config with rms_norm_eps=0.25>"))
    with checks.reproducing(repro):
        model, _ = backend.FastVisionModel.from_pretrained(zoo.checkpoint("llava"), auto_config=config, **SIXTEEN_BIT)
    checks.check_equal(getattr(model.config, "fastvision_conformance_marker", None), "from auto_config",
                       "marker set on auto_config", repro=repro)
    checks.check_equal(model.config.text_config.rms_norm_eps, 0.25, "text_config.rms_norm_eps", repro=repro)


# ------------------------------------------------------------------------------------- checkpointing
def _describe(function) -> object:
    """A comparable description of a checkpoint function: partials by their function and arguments."""
    if isinstance(function, functools.partial):
        return ("partial", _describe(function.func), function.args, tuple(sorted(function.keywords.items())))
    return getattr(function, "__func__", function)


def checkpoint_functions(model) -> set:
    return {_describe(getattr(m, "_gradient_checkpointing_func", None)) for m in checkpointing_layers(model)}


CHECKPOINTING = [  # (use_gradient_checkpointing, max_seq_length, what docs/contract.md makes of it)
    (True, 2048, "plain"),
    (False, 2048, "off"),
    ("unsloth", 2048, "offloaded"),
    ("unsloth", 512, "offloaded"),
    ("unsloth", 511, "plain"),  # the < 512 rule
    ("unsloth", 256, "plain"),
    (False, 256, "off"),
]


@pytest.fixture(scope="module")
def plain_checkpointing(backend):
    model, _, _ = load(backend, "llava", use_gradient_checkpointing=True, **SIXTEEN_BIT)
    return checkpoint_functions(model)


@pytest.mark.parametrize(("value", "max_seq_length", "expected"), CHECKPOINTING, ids=lambda v: repr(v))
def test_gradient_checkpointing_modes(backend, plain_checkpointing, value, max_seq_length, expected):
    model, _, repro = load(backend, "llava", use_gradient_checkpointing=value, max_seq_length=max_seq_length,
                           **SIXTEEN_BIT)
    layers = checkpointing_layers(model)
    checks.check(bool(layers) == (expected != "off"), f"{len(layers)} layers checkpointed, expected {expected}",
                 repro=repro)
    if expected == "off":
        return
    cached = {k: v for k, v in use_cache_values(model).items() if v is not False}
    checks.check(not cached, f"checkpointing on but use_cache is not False in {cached}", repro=repro)
    functions = checkpoint_functions(model)
    same_as_plain = functions == plain_checkpointing
    checks.check(same_as_plain == (expected == "plain"),
                 f"use_gradient_checkpointing={value!r}, max_seq_length={max_seq_length}: checkpoint function "
                 f"{functions} {'is' if same_as_plain else 'is not'} the plain one {plain_checkpointing}; "
                 f"expected {expected} checkpointing", repro=repro)


@pytest.mark.parametrize("family", ALL)
def test_checkpointed_forward_has_a_graph_in_lora_mode(default_load, family):
    # Every base weight is frozen, so only input embeddings that require grad give checkpointed layers a
    # graph for adapters to train through.
    model, processor, repro = default_load(family)
    batch = inputs.image_batch(processor).to(model.device)
    with checks.reproducing(repro):
        logits = model(**batch).logits
    checks.check(logits.requires_grad and logits.grad_fn is not None,
                 "LoRA-mode forward gives logits without a graph: input embeddings do not require grad",
                 repro=repro)


def input_embedding_grads(model, processor):
    """Gradient of a fixed random projection of the logits w.r.t. the input embeddings, valid tokens."""
    model.train()
    batch = inputs.image_batch(processor).to(model.device)
    captured = []

    def as_leaf(_module, _args, output):  # a leaf that requires grad, whatever the backend set
        captured.append(output.detach().requires_grad_())
        return captured[-1]

    handle = model.get_input_embeddings().register_forward_hook(as_leaf)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same dropout draws (if any) for both models
            logits = model(**batch).logits.float()
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)).to(logits.device)
        valid = batch["attention_mask"].bool()
        (logits * weights)[valid].sum().backward()
    finally:
        handle.remove()
    return captured[0].grad[valid]


@pytest.mark.parametrize("family", ALL)
def test_unsloth_checkpointing_gives_the_gradients_of_no_checkpointing(backend, family):
    offloaded, processor, repro = load(backend, family, use_gradient_checkpointing="unsloth", max_seq_length=2048,
                                       **SIXTEEN_BIT)
    plain, _, _ = load(backend, family, use_gradient_checkpointing=False, **SIXTEEN_BIT)
    with checks.reproducing(repro):
        want, got = input_embedding_grads(plain, processor), input_embedding_grads(offloaded, processor)
    checks.check(want.abs().max() > 0, "no gradient reaches the input embeddings", repro=repro)
    error = (got.double() - want.double()).abs().max().item()
    bound = tolerances.GRAD_ERROR_FLOOR[offloaded.get_input_embeddings().weight.dtype]
    checks.check(error <= bound, f"input-embedding gradients differ by {error:.3g} (bound {bound:.3g}) from "
                 "use_gradient_checkpointing=False", repro=repro)


# ------------------------------------------------------------------------------------------- numerics
def valid_logits(model, processor):
    batch = inputs.image_batch(processor).to(model.device)
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


@pytest.mark.parametrize("family", ALL)
def test_supports_sdpa_false_computes_the_same_logits(backend, family):
    with_sdpa, processor, _ = load(backend, family, supports_sdpa=True, **SIXTEEN_BIT)
    without, _, repro = load(backend, family, supports_sdpa=False, **SIXTEEN_BIT)
    error = (valid_logits(with_sdpa, processor) - valid_logits(without, processor)).abs().max().item()
    bound = tolerances.MODEL_LOGITS_ATOL[with_sdpa.dtype]
    checks.check(error <= bound, f"supports_sdpa=False changes logits by {error:.3g} (bound {bound:.3g})", repro=repro)


@pytest.mark.parametrize("family", TIED)
def test_offload_embedding_is_refused_where_tied_to_lm_head(backend, device, family):
    with checks.recording_warnings() as recorded:
        model, _, repro = load(backend, family, offload_embedding=True, **SIXTEEN_BIT)
    checks.check_warned(recorded, "offload_embedding", repro=repro)
    checks.check_equal(model.get_input_embeddings().weight.device.type, device, "tied embedding device", repro=repro)


@pytest.mark.parametrize("family", NOT_TIED)
def test_offload_embedding_keeps_it_on_the_cpu_and_outputs_unchanged(backend, family):
    kept, processor, _ = load(backend, family, **SIXTEEN_BIT)
    offloaded, _, repro = load(backend, family, offload_embedding=True, **SIXTEEN_BIT)
    checks.check_equal(offloaded.get_input_embeddings().weight.device.type, "cpu", "offloaded embedding device",
                       repro=repro)
    checks.check(torch.equal(valid_logits(kept, processor), valid_logits(offloaded, processor)),
                 "offload_embedding=True changes the logits", repro=repro)


# ---------------------------------------------------------------------------------------- vLLM rows
@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: its absence is untestable")
@pytest.mark.parametrize("family", FAST_INFERENCE)
def test_fast_inference_without_vllm_is_an_import_error_naming_it(backend, family):
    repro = checks.call(checks.zoo_path(family), fast_inference=True)
    checks.expect_error(lambda: backend.FastVisionModel.from_pretrained(zoo.checkpoint(family), fast_inference=True),
                        ImportError, names=("vllm",), repro=repro)


@pytest.mark.parametrize("family", NO_FAST_INFERENCE)
def test_fast_inference_on_other_families_is_a_value_error(backend, family):
    repro = checks.call(checks.zoo_path(family), fast_inference=True)
    checks.expect_error(lambda: backend.FastVisionModel.from_pretrained(zoo.checkpoint(family), fast_inference=True),
                        ValueError, names=("fast_inference",), repro=repro)


def test_fast_inference_with_full_finetuning_is_not_implemented(backend):
    kwargs = {"fast_inference": True, "full_finetuning": True}
    repro = checks.call(checks.zoo_path("qwen2_5_vl"), **kwargs)
    checks.expect_error(lambda: backend.FastVisionModel.from_pretrained(zoo.checkpoint("qwen2_5_vl"), **kwargs),
                        NotImplementedError, repro=repro)


# -------------------------------------------------------------------------------------- random_state
@pytest.fixture(scope="module")
def missing_lm_head(tmp_path_factory):
    """A llava checkpoint without its (untied) lm_head weight, which a load must draw at random."""
    path = _copy_checkpoint("llava", tmp_path_factory.mktemp("missing") / "llava")
    weights = load_file(path / "model.safetensors")
    for key in [k for k in weights if k.endswith("lm_head.weight")]:
        del weights[key]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_random_state_seeds_the_draws_of_a_load(backend, missing_lm_head):
    def head(seed):
        repro = checks.call(missing_lm_head, random_state=seed, **SIXTEEN_BIT)
        with checks.reproducing(repro):
            model, _ = backend.FastVisionModel.from_pretrained(missing_lm_head, random_state=seed, **SIXTEEN_BIT)
        return model.lm_head.weight.detach().clone(), repro

    first, repro = head(1)
    again, _ = head(1)
    other, _ = head(2)
    checks.check(torch.equal(first, again), "two loads with random_state=1 drew different lm_head weights", repro=repro)
    checks.check(not torch.equal(first, other), "random_state=1 and 2 drew the same lm_head weights", repro=repro)


def test_a_load_leaves_the_callers_random_state_alone(backend):
    state = torch.get_rng_state()
    _, _, repro = load(backend, "llava", random_state=7, **SIXTEEN_BIT)
    checks.check(torch.equal(state, torch.get_rng_state()), "the load changed torch's global random state",
                 repro=repro)


# -------------------------------------------------------------------------------------------- kwargs
@pytest.mark.parametrize(
    ("config", "flags", "kind"),
    [
        (transformers.BitsAndBytesConfig(load_in_8bit=True), {}, "int8"),
        (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), SIXTEEN_BIT, "nf4"),
    ],
    ids=["8bit config over default 4bit", "4bit config over load_in_4bit=False"],
)
def test_quantization_config_sets_the_mode(backend, config, flags, kind):
    repro = checks.call(checks.zoo_path("llava"), quantization_config=checks.Raw(f"<{kind} BitsAndBytesConfig>"),
                        **flags)
    with checks.reproducing(repro):
        model, _ = backend.FastVisionModel.from_pretrained(zoo.checkpoint("llava"), quantization_config=config, **flags)
    kinds = set(model.quantization_plan.kinds().values()) - {"keep"}
    checks.check_equal(kinds, {kind}, "quantized kinds in the plan", repro=repro)
    checks.check(quantized_language_linears(model, "llava"), "no language-model linear holds quantized weights",
                 repro=repro)


def test_attn_implementation_is_honoured(backend):
    model, _, repro = load(backend, "llava", attn_implementation="eager", **SIXTEEN_BIT)
    checks.check_equal(model.config._attn_implementation, "eager", "model.config._attn_implementation", repro=repro)


# ----------------------------------------------------------------------------------- what comes back
@pytest.mark.parametrize("family", ALL)
def test_returns_the_family_model_with_its_attributes(default_load, family):
    model, processor, repro = default_load(family)
    checks.check_equal(type(model).__name__, FAMILIES[family].model_class, "model class", repro=repro)
    checks.check_equal(type(processor).__name__, FAMILIES[family].processor_class, "processor class", repro=repro)
    check_max_seq_length(model, family, 2048, repro)
    backend_name = getattr(model, "fastvision_backend", None)
    checks.check(isinstance(backend_name, str) and backend_name, f"model.fastvision_backend is {backend_name!r}",
                 repro=repro)


@pytest.mark.parametrize("family", ALL)
def test_quantization_plan_is_attached_and_round_trips(default_load, family):
    model, _, repro = default_load(family)
    plan = getattr(model, "quantization_plan", None)
    checks.check(plan is not None and len(plan.entries) > 0, "model.quantization_plan missing or empty", repro=repro)
    kinds = plan.kinds()
    modules = dict(model.named_modules())
    unknown = [name for name in kinds if name not in modules]
    checks.check(not unknown, f"the plan names modules the model lacks: {unknown[:3]}", repro=repro)
    quantized = set(quantized_language_linears(model, family))
    lm = FAMILIES[family].language_model
    wrong = [n for n in quantized if kinds.get(f"{lm}.{n}") != "nf4"]
    checks.check(quantized and not wrong, f"4-bit linears the plan does not call nf4: {wrong[:3]}", repro=repro)
    text = plan.to_json()
    json.loads(text)  # valid JSON
    checks.check_equal(type(plan).from_json(text).kinds(), kinds, "plan kinds after to_json/from_json", repro=repro)


# ------------------------------------------------------------------------------- nothing left behind
FAILING = {
    "unknown kwarg": {"fastvision_unknown_kwarg": 1, **SIXTEEN_BIT},  # fails inside the model class
    "conflicting modes": {"load_in_8bit": True},
    "model_types": {"model_types": ["gemma3"]},
    "full_finetuning with fast_inference": {"full_finetuning": True, "fast_inference": True},
}


@pytest.mark.parametrize("case", FAILING)
def test_a_failed_load_leaves_nothing_behind(backend, device, case):
    kwargs = FAILING[case]
    repro = checks.call(checks.zoo_path("llava"), **kwargs)

    def failing_load():
        checks.expect_error(lambda: backend.FastVisionModel.from_pretrained(zoo.checkpoint("llava"), **kwargs),
                            (TypeError, ValueError, NotImplementedError), repro=repro)

    failing_load()  # the first call may import modules and fill caches; a leak shows on every call
    modules, memory = checks.live_modules(), checks.device_memory(device)
    env, rng, default_dtype = dict(os.environ), torch.get_rng_state(), torch.get_default_dtype()
    failing_load()
    checks.check_equal(checks.live_modules(), modules, "live nn.Module objects after a failed load", repro=repro)
    checks.check_equal(checks.device_memory(device), memory, "device memory after a failed load", repro=repro)
    checks.check_equal(dict(os.environ), env, "environment after a failed load", repro=repro)
    checks.check(torch.equal(rng, torch.get_rng_state()), "a failed load changed torch's global random state",
                 repro=repro)
    checks.check_equal(torch.get_default_dtype(), default_dtype, "torch's default dtype", repro=repro)
