"""The family records are the only place a family is described: what they name must be what the zoo's models
hold and what the optimized backend applies, and the suite's records must name the same families."""

from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch
import transformers

if not torch.cuda.is_available():  # Triton reads this when its kernels are defined: before the imports below
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conformance import families as suite_families
from conformance import zoo
from optimized.loader import VISION_PATCHES
from optimized.patches import fused_layers
from reference import chat_templates, naming
from reference.families import FAMILIES, family_of


def test_the_suite_and_the_product_know_the_same_families():
    assert set(suite_families.NAMES) == set(FAMILIES)


def test_every_vision_patch_a_record_names_is_one_the_optimized_backend_has():
    assert {spec.vision_patch for spec in FAMILIES.values()} - {None} <= set(VISION_PATCHES)


def test_no_norm_class_is_named_with_two_styles():
    styles = {}
    for spec in FAMILIES.values():
        for name in spec.norm_classes:
            assert styles.setdefault(name, spec.norm_style) == spec.norm_style, name
    assert {spec.norm_style for spec in FAMILIES.values()} <= {"llama", "gemma"}


def test_the_optimized_backend_fuses_exactly_what_the_records_name():
    assert set(fused_layers.NORM_CLASSES) == {n for spec in FAMILIES.values() for n in spec.norm_classes}
    assert fused_layers.GATED_MLP_CLASSES == {n for spec in FAMILIES.values() for n in spec.gated_mlp_classes}
    assert set(fused_layers.ROTARY_MODULES) == {n for spec in FAMILIES.values() for n in spec.rotary_modules}


@pytest.mark.parametrize("name", FAMILIES)
def test_each_record_names_the_fusable_classes_of_its_zoo_model(name):
    # A record that missed a class would leave that layer unfused without any test failing on numbers.
    model = transformers.AutoModelForImageTextToText.from_pretrained(zoo.checkpoint(name))
    spec = family_of(model.config)
    assert spec.name == name
    modules = list(model.modules())
    assert {type(m).__name__ for m in modules if type(m).__name__.endswith("RMSNorm")} <= set(spec.norm_classes)
    gated = {type(m).__name__ for m in modules if all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj"))}
    assert gated == set(spec.gated_mlp_classes) & {type(m).__name__ for m in modules}
    text_attention = model.get_submodule(spec.text_layers)[0].get_submodule(spec.text_blocks[0])
    modeling = sys.modules[type(text_attention).__module__]
    assert "apply_rotary_pos_emb" in inspect.unwrap(type(text_attention).forward).__code__.co_names
    assert modeling.__name__ in {f"transformers.models.{m}.modeling_{m}" for m in spec.rotary_modules}
    vision_attention = model.get_submodule(spec.vision_layers)[0].get_submodule(spec.vision_blocks[0])
    if spec.vision_patch == "qwen_varlen":
        assert type(vision_attention).__name__ in spec.vision_attention_classes


@pytest.mark.parametrize("name", FAMILIES)
def test_each_records_twins_resolve_both_ways(name):
    for sixteen, four in FAMILIES[name].four_bit_twins:
        assert four.endswith("-bnb-4bit")
        assert naming.remap(sixteen, load_in_4bit=True) == four
        assert naming.remap(four, load_in_4bit=False) == four.removesuffix("-bnb-4bit")
    mirrors = {sixteen for sixteen, _ in FAMILIES[name].four_bit_twins if sixteen.startswith("unsloth/")}
    for sixteen, dynamic in FAMILIES[name].dynamic_four_bit_twins:
        assert sixteen in mirrors and dynamic == f"{sixteen}-unsloth-bnb-4bit"
        assert naming.remap(dynamic, load_in_4bit=True) == dynamic  # pre-quantized: loaded as given
        assert naming.remap(dynamic, load_in_4bit=False) == sixteen
        assert naming.remap(dynamic.lower(), load_in_4bit=False) == sixteen  # hub ids are case-insensitive


def test_a_dynamic_quant_maps_back_to_its_mirror_and_nothing_maps_to_it():
    # Unsloth's own table (notes: unsloth-contract.md 2): the 7B's dynamic quant loads as given in 4-bit and
    # as unsloth/Qwen2.5-VL-7B-Instruct otherwise; the 16-bit id still goes to the plain -bnb-4bit twin.
    dynamic = "unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit"
    assert naming.remap(dynamic, load_in_4bit=False) == "unsloth/Qwen2.5-VL-7B-Instruct"
    assert naming.remap("Qwen/Qwen2.5-VL-7B-Instruct", load_in_4bit=True) == "unsloth/Qwen2.5-VL-7B-Instruct-bnb-4bit"
    assert dynamic not in naming.FOUR_BIT_TWINS.values()


def test_each_chat_template_name_belongs_to_one_family():
    names = [name for spec in FAMILIES.values() for name in spec.chat_template_names]
    assert len(names) == len(set(names)) and "chatml" not in names  # else the last record would win, silently
    assert set(chat_templates.TEMPLATES) == {"chatml", *names}
