"""The tiny checkpoints of `conformance.zoo`: real structure, offline loading, determinism, caching."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import pathlib
import re

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from conformance import zoo

# The budget per checkpoint directory on disk.
MAX_CHECKPOINT_BYTES = 5 * 10**6

# How each family's chat template must show an image, and how a generation prompt must end.
IMAGE_MARKUP = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>\n",
    "pixtral": "[INST][IMG]",
    "mistral3": "[/SYSTEM_PROMPT][INST][IMG]",
    "gemma3": "<start_of_image>",
}
ASSISTANT_CUE = {
    "qwen2_vl": "<|im_start|>assistant\n",
    "qwen2_5_vl": "<|im_start|>assistant\n",
    "qwen3_vl": "<|im_start|>assistant\n",
    "llava": "ASSISTANT:",
    "pixtral": "[/INST]",
    "mistral3": "[/INST]",
    "gemma3": "<start_of_turn>model\n",
}
# Config field -> the token it must name in the tokenizer.
_QWEN_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
CONFIG_TOKENS = {
    "qwen2_vl": _QWEN_IDS,
    "qwen2_5_vl": _QWEN_IDS,
    "qwen3_vl": _QWEN_IDS,
    "llava": {"image_token_id": "<image>"},
    "pixtral": {"image_token_id": "[IMG]"},
    "mistral3": {"image_token_id": "[IMG]"},
    "gemma3": {
        "image_token_id": "<image_soft_token>",
        "boi_token_id": "<start_of_image>",
        "eoi_token_id": "<end_of_image>",
    },
}
# model_type of the whole config, its language model and its vision tower.
MODEL_TYPES = {
    "qwen2_vl": ("qwen2_vl", "qwen2_vl_text", "qwen2_vl_vision"),
    "qwen2_5_vl": ("qwen2_5_vl", "qwen2_5_vl_text", "qwen2_5_vl_vision"),
    "qwen3_vl": ("qwen3_vl", "qwen3_vl_text", "qwen3_vl_vision"),
    "llava": ("llava", "llama", "clip_vision_model"),
    "pixtral": ("llava", "mistral", "pixtral"),  # Pixtral is Llava with another encoder and LM
    "mistral3": ("mistral3", "mistral", "pixtral"),
    "gemma3": ("gemma3", "gemma3_text", "siglip_vision_model"),
}
# Anything that changes from run to run must not be written: dates, times, uuids.
_VOLATILE = re.compile(rb"\d{4}-\d\d-\d\d|\d\d:\d\d:\d\d|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-")


@dataclasses.dataclass
class Loaded:
    family: str
    path: pathlib.Path
    processor: object
    model: torch.nn.Module


@pytest.fixture(scope="module", params=zoo.FAMILIES)
def loaded(request, tmp_path_factory) -> Loaded:
    path = zoo.build(request.param, tmp_path_factory.mktemp(request.param))
    # Offline even when HF_HUB_OFFLINE was not exported: huggingface_hub reads it once at import,
    # and any hub request made while this flag is set raises instead of reaching the network.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return Loaded(request.param, path, processor, model)


def _prompt(processor, text: str = "What is in this image?") -> str:
    conversation = zoo.sample_conversation(text)
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def _digests(directory: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# --- structure ------------------------------------------------------------------------------------


def test_recipes_cover_exactly_the_families():
    assert tuple(zoo.RECIPES) == zoo.FAMILIES
    assert all(zoo.RECIPES[f].family == f for f in zoo.FAMILIES)


def test_language_model_uses_gqa_above_two(loaded):
    text = loaded.model.config.get_text_config(decoder=True)
    assert text.num_attention_heads % text.num_key_value_heads == 0
    assert text.num_attention_heads // text.num_key_value_heads > 2
    assert text.vocab_size == zoo.VOCAB_SIZE


def test_model_types_are_the_familys(loaded):
    config = loaded.model.config
    types = (config.model_type, config.text_config.model_type, config.vision_config.model_type)
    assert types == MODEL_TYPES[loaded.family]


@pytest.mark.parametrize("loaded", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"], indirect=True)
def test_qwen_mrope_sections_cover_half_the_head(loaded):
    text = loaded.model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2


@pytest.mark.parametrize("loaded", ["qwen2_5_vl"], indirect=True)
def test_qwen2_5_vision_has_several_windows_and_one_full_block(loaded):
    vision = loaded.model.config.vision_config
    assert len(vision.fullatt_block_indexes) == 1
    assert 0 <= vision.fullatt_block_indexes[0] < vision.depth
    inputs = loaded.processor(text=[_prompt(loaded.processor)], images=[zoo.sample_image()])
    _, patch_rows, patch_columns = (int(n) for n in inputs["image_grid_thw"][0])
    height, width = patch_rows // vision.spatial_merge_size, patch_columns // vision.spatial_merge_size
    # window_size is in pixels; windows tile the grid of merged tokens.
    edge = vision.window_size // (vision.patch_size * vision.spatial_merge_size)
    assert -(-height // edge) * -(-width // edge) > 1


@pytest.mark.parametrize("loaded", ["qwen3_vl"], indirect=True)
def test_qwen3_deepstack_feeds_every_text_layer_from_inside_the_tower(loaded):
    # DeepStack adds the merged features of tower block deepstack_visual_indexes[i] after text layer i: every
    # tiny text layer gets one, from a block before the last (whose output goes to the final merger).
    config = loaded.model.config
    indexes = config.vision_config.deepstack_visual_indexes
    assert len(indexes) == config.text_config.num_hidden_layers
    assert all(0 <= i < config.vision_config.depth - 1 for i in indexes)
    assert config.text_config.rope_parameters["mrope_interleaved"]
    inputs = loaded.processor(text=[_prompt(loaded.processor)], images=[zoo.sample_image()], return_tensors="pt")
    with torch.no_grad():
        features = loaded.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert len(features.deepstack_features) == len(indexes)


@pytest.mark.parametrize("loaded", ["mistral3"], indirect=True)
def test_mistral3_merges_2x2_patches_with_no_bias_no_window_and_its_own_head(loaded):
    # Mistral-Small-3.1: one image token per 2x2 group of Pixtral patches (the patch merger's), no bias anywhere,
    # sliding_window null, and an lm_head of its own although Mistral3Config defaults to tied embeddings.
    model, config = loaded.model, loaded.model.config
    assert config.spatial_merge_size == 2 and config.text_config.sliding_window is None
    assert not [name for name, _ in model.named_parameters() if name.endswith(".bias")]
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    inputs = loaded.processor(text=[_prompt(loaded.processor)], images=[zoo.sample_image()], return_tensors="pt")
    ((height, width),) = inputs["image_sizes"].tolist()
    cell = config.vision_config.patch_size * config.spatial_merge_size
    image_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    assert image_tokens == (height // cell) * (width // cell) > 1
    with torch.no_grad():
        (features,) = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert features.shape == (image_tokens, config.text_config.hidden_size)


@pytest.mark.parametrize("loaded", ["gemma3"], indirect=True)
def test_gemma3_mixes_sliding_and_full_attention(loaded):
    text = loaded.model.config.text_config
    assert {"sliding_attention", "full_attention"} <= set(text.layer_types)
    assert text.query_pre_attn_scalar != text.head_dim
    prompt_length = len(
        loaded.processor(text=[_prompt(loaded.processor)], images=[zoo.sample_image()])["input_ids"][0]
    )
    assert text.sliding_window < prompt_length


def test_config_token_ids_match_the_tokenizer(loaded):
    tokenizer, config = loaded.processor.tokenizer, loaded.model.config
    for field, token in CONFIG_TOKENS[loaded.family].items():
        assert getattr(config, field) == tokenizer.convert_tokens_to_ids(token), field
    text = config.get_text_config(decoder=True)
    for role in ("bos", "eos", "pad"):
        assert getattr(text, f"{role}_token_id") == getattr(tokenizer, f"{role}_token_id"), role
    assert tokenizer.eos_token_id in loaded.model.generation_config.eos_token_id
    assert tokenizer.pad_token_id is not None
    assert len(tokenizer) <= config.get_text_config(decoder=True).vocab_size


def test_norm_weights_and_biases_are_randomized(loaded):
    # Independent of how zoo finds them: every parameter named like a norm or a bias.
    perturbed = {
        name: p
        for name, p in loaded.model.named_parameters()
        if name.endswith(".bias") or re.search(r"norm|\bln_|layrnorm", name)
    }
    # Not vacuous: every family has norm weights (not every one has biases: Mistral-Small's linears have none).
    assert any(name.endswith(".weight") and "norm" in name for name in perturbed)
    constant = [name for name, p in perturbed.items() if p.unique().numel() == 1]
    assert constant == []
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


# --- processor and model --------------------------------------------------------------------------


def test_chat_template_places_the_image_like_the_family(loaded):
    prompt = _prompt(loaded.processor)
    assert prompt.count(IMAGE_MARKUP[loaded.family]) == 1
    assert prompt.endswith(ASSISTANT_CUE[loaded.family])
    if getattr(loaded.processor, "boi_token", None):  # the processor expands its boi token; the template must emit it
        assert loaded.processor.boi_token in prompt


def test_left_padded_batch_forward_and_generate(loaded):
    processor, model = loaded.processor, loaded.model
    processor.tokenizer.padding_side = "left"
    prompts = [_prompt(processor, "What is in this image? Describe it in detail."), _prompt(processor, "Hi")]
    images = [[zoo.sample_image(0)], [zoo.sample_image(1)]]
    batch = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()  # left-padded
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()

    width = batch["input_ids"].shape[1]
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert width < generated.shape[1] <= width + 3
    assert torch.equal(generated[:, :width], batch["input_ids"])
    # The padded row continues exactly as it does alone: padding is masked, positions are right.
    alone = processor(text=prompts[1:], images=images[1:], return_tensors="pt")
    alone_generated = model.generate(**alone, max_new_tokens=3, do_sample=False)
    new = alone_generated.shape[1] - alone["input_ids"].shape[1]
    assert torch.equal(generated[1, width : width + new], alone_generated[0, -new:])


# --- files ----------------------------------------------------------------------------------------


def test_checkpoint_is_small_and_complete(loaded):
    files = {p.name: p.stat().st_size for p in loaded.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(files)
    assert sum(files.values()) < MAX_CHECKPOINT_BYTES


def test_rebuild_is_byte_identical_and_timeless(loaded, tmp_path):
    rebuilt = zoo.build(loaded.family, tmp_path / "again")
    assert _digests(rebuilt) == _digests(loaded.path)
    for path in rebuilt.iterdir():
        if path.suffix != ".safetensors":
            assert not _VOLATILE.search(path.read_bytes()), path.name


def test_seed_changes_weights_only(tmp_path):
    a, b = zoo.build("llava", tmp_path / "a", seed=0), zoo.build("llava", tmp_path / "b", seed=1)
    differing = {name for name, digest in _digests(a).items() if _digests(b)[name] != digest}
    assert differing == {"model.safetensors"}


def test_build_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    zoo.build("llava", tmp_path)
    assert torch.equal(torch.rand(4), expected)


# --- cache ----------------------------------------------------------------------------------------


def test_checkpoint_builds_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVISION_CACHE", str(tmp_path))
    first = zoo.checkpoint("pixtral", seed=3)
    assert first.parent == tmp_path and f"seed3-v{zoo.ZOO_VERSION}" in first.name
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("checkpoint() rebuilt a cached checkpoint")

    monkeypatch.setattr(zoo, "build", no_rebuild)
    assert zoo.checkpoint("pixtral", seed=3) == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes


def _checkpoint_in_child(barrier, results, family: str) -> None:
    barrier.wait()  # both processes reach checkpoint() together, with the cache still empty
    path = zoo.checkpoint(family)
    results.put((str(path), _digests(path)))


def test_concurrent_checkpoint_builds_agree(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVISION_CACHE", str(tmp_path))
    context = multiprocessing.get_context("spawn")  # fork after torch's threads start is unsafe
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_checkpoint_in_child, args=(barrier, results, "llava")) for _ in "ab"]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert outcomes[0] == outcomes[1]
    # Built in another process, yet identical to a build here: nothing depends on per-process hashing.
    assert outcomes[0][1] == _digests(zoo.build("llava", tmp_path / "here" / "llava"))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


# --- errors and inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("call", [zoo.checkpoint, lambda family: zoo.build(family, "unused")])
def test_unknown_family_is_rejected(call, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVISION_CACHE", str(tmp_path))
    with pytest.raises(ValueError) as error:
        call("llava-next")
    message = str(error.value)
    assert "family" in message and "'llava-next'" in message
    assert all(family in message for family in zoo.FAMILIES)
    assert list(tmp_path.iterdir()) == []


def test_sample_image_is_deterministic_and_seeded():
    image = zoo.sample_image()
    assert image.mode == "RGB" and image.size == (96, 80)
    assert image.tobytes() == zoo.sample_image().tobytes()
    assert image.tobytes() != zoo.sample_image(1).tobytes()
    assert zoo.sample_image(size=(40, 50)).size == (40, 50)


def test_sample_conversation_is_one_user_turn_with_an_image():
    (message,) = zoo.sample_conversation("Count the shapes.")
    assert message["role"] == "user"
    assert message["content"] == [{"type": "image"}, {"type": "text", "text": "Count the shapes."}]
