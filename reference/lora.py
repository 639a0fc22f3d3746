"""Which linear layers get LoRA adapters: a plan computed from the family record, never from name substrings.

Unsloth picks targets with a regex over module names ("vision|image|visual|patch" then "attn|mlp|...");
here a target is every linear inside a selected block: the attention or MLP block (`FamilySpec.vision_blocks`,
`text_blocks`) of a selected layer (`vision_layers`, `text_layers`). The four `finetune_*` flags select
parts and blocks, `finetune_last_n_layers` the last n layers of each selected part (of the vision tower and
of the language model separately), `layers_to_transform` layer indices; an explicit `target_modules`
(names, or a regex PEFT-style) is intersected with that, except that it may also name linears outside both
towers' layers (the projector/merger, `lm_head`), which nothing else selects. The plan lists every linear of
the model, `lora` or `frozen`, with the reason, and goes to PEFT as the exact module names.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

from torch import nn

from reference.errors import ArgumentValueError
from reference.families import FamilySpec

# get_peft_model's arguments with Unsloth's defaults, in its order (unsloth/models/vision.py). task_type is
# peft.TaskType.CAUSAL_LM, a str enum equal to "CAUSAL_LM": the string keeps `import reference` free of peft.
GET_PEFT_MODEL_DEFAULTS = {
    "r": 16,
    "target_modules": None,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "bias": "none",
    "finetune_vision_layers": True,
    "finetune_language_layers": True,
    "finetune_attention_modules": True,
    "finetune_mlp_modules": True,
    "finetune_last_n_layers": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "use_gradient_checkpointing": "unsloth",
    "random_state": 3407,
    "max_seq_length": 2048,
    "use_rslora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "loftq_config": {},
    "task_type": "CAUSAL_LM",
    "temporary_location": "_unsloth_temporary_saved_buffers",
    "qat_scheme": None,
    "target_parameters": None,
    "ensure_weight_tying": False,
    "finetune_audio_layers": False,
}
LORA, FROZEN = "lora", "frozen"
OUTSIDE = "outside the vision and language layers (projector, lm_head): adapters only when named in target_modules"
FLAGS = ("finetune_vision_layers", "finetune_language_layers", "finetune_attention_modules", "finetune_mlp_modules")
_FIELD = dict(zip(FLAGS, ("vision", "language", "attention", "mlp")))  # flag -> Selection field


@dataclasses.dataclass(frozen=True)
class LoraEntry:
    module: str
    kind: str  # "lora" or "frozen"
    reason: str


@dataclasses.dataclass(frozen=True)
class LoraPlan:
    r: int
    lora_alpha: float
    entries: tuple[LoraEntry, ...]

    def targets(self) -> list[str]:
        return [e.module for e in self.entries if e.kind == LORA]

    def kinds(self) -> dict[str, str]:
        return {e.module: e.kind for e in self.entries}

    def table(self) -> list[tuple[str, str, str]]:
        return [(e.module, e.kind, e.reason) for e in self.entries]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LoraPlan:
        data = json.loads(text)
        return cls(data["r"], data["lora_alpha"], tuple(LoraEntry(**e) for e in data["entries"]))


@dataclasses.dataclass(frozen=True)
class Selection:
    """What the caller asked for, as get_peft_model's arguments say it."""

    vision: bool = True
    language: bool = True
    attention: bool = True
    mlp: bool = True
    last_n_layers: int | None = None
    layers: tuple[int, ...] | None = None  # layers_to_transform
    explicit: Sequence[str] | str | None = None  # target_modules other than None/"all-linear"


def linears(model: nn.Module) -> list[str]:
    """Every linear layer of the model (bitsandbytes' 4-bit and 8-bit layers are nn.Linear subclasses)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def plan_of(peft_model: nn.Module, r: int, lora_alpha: float) -> LoraPlan:
    """The plan a PEFT model carries (a reloaded adapter): its LoRA layers, and every other linear frozen."""
    base = peft_model.get_base_model()
    wrapped = {name for name, module in base.named_modules() if hasattr(module, "lora_A")}
    entries = [LoraEntry(name, LORA, "in the saved adapter") for name in sorted(wrapped)]
    entries += [
        LoraEntry(name, FROZEN, "not in the saved adapter")
        for name in linears(base)
        if name not in wrapped and not any(name.startswith(w + ".") for w in wrapped)
    ]
    return LoraPlan(r, lora_alpha, tuple(entries))


def plan_targets(model: nn.Module, family: FamilySpec, selection: Selection, r: int, lora_alpha: float) -> LoraPlan:
    """The LoRA plan of `model`; ArgumentValueError naming the arguments when it selects nothing."""
    for first, second in (FLAGS[:2], FLAGS[2:]):
        if not (getattr(selection, _FIELD[first]) or getattr(selection, _FIELD[second])):
            raise ArgumentValueError(
                first, False, f"True for at least one of {first} and {second}", "Both are False: nothing to fine-tune."
            )
    blocks = _blocks(model, family, selection)
    matches = _explicit_matcher(selection.explicit)
    entries = []
    for name in linears(model):
        selected, why = blocks.get(name, (False, None))
        if why is None:  # outside both towers' layers: the projector/merger, lm_head
            selected = selection.explicit is not None and matches(name)
            why = "named in target_modules" if selected else OUTSIDE
        elif selected and not matches(name):
            selected, why = False, f"{why}; not in target_modules"
        entries.append(LoraEntry(name, LORA if selected else FROZEN, why))
    plan = LoraPlan(r, lora_alpha, tuple(entries))
    _check_explicit_names(selection.explicit, [e.module for e in entries])
    if not plan.targets():
        chosen = {flag: getattr(selection, _FIELD[flag]) for flag in FLAGS}
        accepted = f"names or a pattern matching a linear layer of the parts the flags select ({chosen})"
        raise ArgumentValueError("target_modules", selection.explicit, accepted, "Nothing would be fine-tuned.")
    return plan


def _check_explicit_names(explicit, names: list[str]) -> None:
    if explicit is None or isinstance(explicit, str):
        return
    for wanted in explicit:
        if not any(name == wanted or name.endswith("." + wanted) for name in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ArgumentValueError("target_modules", wanted, f"names of linear layers of this model, e.g. {leaves}")


def _blocks(model: nn.Module, family: FamilySpec, selection: Selection) -> dict[str, tuple[bool, str]]:
    """Linear name -> (selected by the flags and layers, why) for every linear of the two towers' layers."""
    found: dict[str, tuple[bool, str]] = {}
    parts = (
        ("vision", family.vision_layers, family.vision_blocks, selection.vision, FLAGS[0]),
        ("language", family.text_layers, family.text_blocks, selection.language, FLAGS[1]),
    )
    for part, path, (attention, mlp), part_on, part_flag in parts:
        layers = model.get_submodule(path)
        chosen = set(_layer_indices(len(layers), selection))
        for index, layer in enumerate(layers):
            blocks = ((attention, "attention", selection.attention, FLAGS[2]), (mlp, "MLP", selection.mlp, FLAGS[3]))
            for block, kind, block_on, block_flag in blocks:
                if not part_on:
                    verdict = (False, f"{part} layer {index}: {part_flag}=False")
                elif not block_on:
                    verdict = (False, f"{part} {kind} block: {block_flag}=False")
                elif index not in chosen:
                    verdict = (False, f"{part} layer {index}: outside finetune_last_n_layers / layers_to_transform")
                else:
                    verdict = (True, f"{part} layer {index}, {kind}")
                for name, module in layer.get_submodule(block).named_modules():
                    if isinstance(module, nn.Linear):
                        found[f"{path}.{index}.{block}.{name}"] = verdict
    return found


def _layer_indices(count: int, selection: Selection) -> list[int]:
    indices = list(range(count))
    if selection.last_n_layers is not None:
        indices = indices[max(0, count - selection.last_n_layers) :]
    if selection.layers is not None:
        indices = [i for i in indices if i in set(selection.layers)]
    return indices


def _explicit_matcher(explicit):
    """A test for module names: everything (None), a PEFT-style regex (full match), or a list of names each
    matching a module's full name or its trailing components (`q_proj`, `self_attn.q_proj`)."""
    if explicit is None:
        return lambda name: True
    if isinstance(explicit, str):
        pattern = re.compile(explicit)
        return lambda name: pattern.fullmatch(name) is not None
    wanted = tuple(explicit)
    return lambda name: any(name == w or name.endswith("." + w) for w in wanted)
