"""device_map over several devices through accelerate, on this CPU machine with its two devices, "cpu" and
"disk": a strategy with max_memory and a dict place modules as planned, keep the vision tower and the
projector on one device, record where each module went, and compute the logits of the undispatched model.
A DDP launch turns the default device_map into this rank's device."""

from __future__ import annotations

import pytest
import torch

from conformance import inputs, zoo
from conformance.tolerances import MODEL_LOGITS_ATOL
from reference import FastVisionModel, placement
from reference.errors import ArgumentValueError

VISION, PROJECTOR = "model.vision_tower", "model.multi_modal_projector"
# The zoo's 16-bit llava: vision tower 0.32 MB, projector 0.20 MB, each language layer 0.98 MB, 3.3 MB in
# all. With 1.5 MB of "cpu", accelerate keeps room for the largest layer it must bring back from disk
# (0.98 MB), so 0.52 MB is left: the vision tower fits and the projector would not.
CPU_BYTES = 1_500_000
LATER_LAYERS_ON_DISK = {
    VISION: "cpu", PROJECTOR: "cpu", "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
    "model.language_model.norm": "disk", "model.language_model.rotary_emb": "cpu", "lm_head": "cpu",
}


def _load(**kwargs):
    return FastVisionModel.from_pretrained(str(zoo.checkpoint("llava")), load_in_4bit=False, load_in_16bit=True,
                                           **kwargs)


@pytest.fixture(scope="module")
def undispatched():
    model, processor = _load()
    batch = inputs.image_batch(processor)
    with torch.no_grad():
        return batch, model(**batch).logits


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_auto_with_max_memory_offloads_to_disk_with_the_projector_beside_the_vision_tower(tmp_path, undispatched):
    model, _ = _load(device_map="auto", max_memory={"cpu": CPU_BYTES}, offload_folder=str(tmp_path))
    where = model.device_placement
    assert where.devices_under(VISION) == where.devices_under(PROJECTOR) == {"cpu"}
    assert where.device_of("model.language_model.layers.1") == "disk"
    assert dict((m, d) for m, d, _ in where.table()) == {m: str(d) for m, d in model.hf_device_map.items()}
    assert any("device_map='auto' placed the model over cpu, disk" in n for n in model.quantization_plan.notes)
    batch, expected = undispatched
    assert (_logits(model, batch) - expected).abs().max() <= MODEL_LOGITS_ATOL[torch.float32]


def test_a_dict_places_modules_as_given(tmp_path, undispatched):
    model, _ = _load(device_map=LATER_LAYERS_ON_DISK, offload_folder=str(tmp_path))
    for module, device in LATER_LAYERS_ON_DISK.items():
        assert model.device_placement.device_of(module) == device, module
    batch, expected = undispatched
    assert (_logits(model, batch) - expected).abs().max() <= MODEL_LOGITS_ATOL[torch.float32]


def test_keep_together_moves_a_projector_placed_apart():
    inferred = {VISION: 0, PROJECTOR: 1, "model.language_model": 1, "lm_head": 1}
    assert placement.keep_together(inferred, VISION, PROJECTOR) == {VISION: 0, PROJECTOR: 0,
                                                                    "model.language_model": 1, "lm_head": 1}
    assert placement.keep_together({"model": 0, "lm_head": 1}, VISION, PROJECTOR) == {"model": 0, "lm_head": 1}
    qwen = {"model.visual": 0, "model.language_model": 1}  # the merger sits inside the vision tower
    assert placement.keep_together(qwen, "model.visual", "model.visual.merger") == qwen


def test_under_a_ddp_launch_the_default_device_map_is_this_ranks_device(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model, _ = FastVisionModel.from_pretrained(str(zoo.checkpoint("qwen2_vl")))
    assert model.device_placement.table() == [("", "cpu", "whole model")]
    assert any("launched as local rank 1 of 2" in note for note in model.quantization_plan.notes)
    explicit, _ = FastVisionModel.from_pretrained(str(zoo.checkpoint("qwen2_vl")), device_map="cpu")
    assert not any("local rank" in note for note in explicit.quantization_plan.notes)


def test_on_gpus_each_rank_gets_its_own(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert placement._rank_map(1, 2, on_gpu=True)[0] == {"": "cuda:1"}
    with pytest.raises(ArgumentValueError, match="LOCAL_RANK=2: only 2 GPUs are visible"):
        placement._rank_map(2, 3, on_gpu=True)


def test_disk_offload_needs_16_bit_weights_and_an_offload_folder(tmp_path):
    with pytest.raises(ArgumentValueError, match="device_map.*without 'disk' for a 4bit load"):
        FastVisionModel.from_pretrained(str(zoo.checkpoint("llava")), device_map=LATER_LAYERS_ON_DISK,
                                        offload_folder=str(tmp_path))
    with pytest.raises(ArgumentValueError, match="offload_folder"):
        _load(device_map=LATER_LAYERS_ON_DISK)
