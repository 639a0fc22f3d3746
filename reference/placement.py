"""Where a load puts the model: the device_map handed to transformers (decided once, before any weight is
read) and the record of which module went where, attached as `model.device_placement`.

Several GPUs are accelerate's: a strategy ("auto", "balanced", "balanced_low_0", "sequential") that would
span more than one device (more than one GPU visible, or a `max_memory`) becomes a dict here, inferred by
`accelerate.infer_auto_device_map` on the meta-device skeleton with the sizes the weights will have (NF4
or int8 for what the quantization plan quantizes, 16-bit for what it keeps) and transformers' own
`_no_split_modules` plus the vision tower's class; the projector is then put on the vision tower's device,
since every image feature crosses from one to the other. Under a DDP launcher (LOCAL_RANK, WORLD_SIZE > 1)
the default device_map becomes this rank's device: each rank loads its own copy.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from reference.errors import ArgumentValueError
from reference.families import FamilySpec
from reference.quantization import QuantPlan, part_of

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEFAULT = "sequential"  # the contract's default: what a DDP launch replaces
# transformers' bitsandbytes quantizers keep 10% of each device for the buffers quantization creates
# (adjust_max_memory in quantizer_bnb_4bit.py / _8bit.py); a map inferred here does the same.
QUANTIZED_MEMORY_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Placement:
    """Which module went to which device: the map accelerate dispatched with (module prefix -> device),
    each entry with the model part it belongs to, and what the load decided about it."""

    entries: tuple[tuple[str, str, str], ...]  # (module prefix, "" for the whole model; device; part)
    notes: tuple[str, ...] = ()

    def table(self) -> list[tuple[str, str, str]]:
        return list(self.entries)

    def device_of(self, module: str) -> str:
        """The device of `module`: its own entry or the closest one above it."""
        covering = [(m, d) for m, d, _ in self.entries if _under(module, m)]
        if covering:
            return max(covering, key=lambda entry: len(entry[0]))[1]
        raise KeyError(f"{module!r} is not placed by {self.entries}")

    def devices_under(self, module: str) -> set[str]:
        """Every device holding a part of `module`."""
        return {self.device_of(module)} | {d for m, d, _ in self.entries if _under(m, module)}


def _under(name: str, root: str) -> bool:
    return root == "" or name == root or name.startswith(root + ".")


def launched_rank(environ=os.environ) -> tuple[int, int] | None:
    """(LOCAL_RANK, WORLD_SIZE) when a DDP launcher (torchrun, accelerate launch) started this process with
    more than one rank, else None."""
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    local = environ.get("LOCAL_RANK")
    return (int(local), world) if local is not None and world > 1 else None


def decide(device_map, *, on_gpu: bool, max_memory, skeleton, family: FamilySpec, mode: str, dtype, plan):
    """(the device_map for transformers, notes for the plan)."""
    rank = launched_rank()
    if rank is not None and isinstance(device_map, str) and device_map == DEFAULT:
        return _rank_map(*rank, on_gpu=on_gpu)
    spans = max_memory is not None or (on_gpu and torch.cuda.device_count() > 1)
    if isinstance(device_map, str) and device_map in STRATEGIES and spans:
        inferred = infer(device_map, skeleton, family, mode=mode, dtype=dtype, plan=plan, max_memory=max_memory)
        devices = ", ".join(dict.fromkeys(str(d) for d in inferred.values()))
        return inferred, (f"device_map={device_map!r} placed the model over {devices} through accelerate, the "
                          "vision tower and projector on one device (model.device_placement)",)
    if not on_gpu and not isinstance(device_map, dict):
        return "cpu", ()
    return device_map, ()


def check_offload(device_map, mode: str, offload_folder) -> None:
    """A map with "disk" needs offload_folder=, and only 16-bit weights can go there: bitsandbytes' packed
    weights cannot be offloaded (transformers refuses them in validate_environment)."""
    if not isinstance(device_map, dict) or "disk" not in {str(d) for d in device_map.values()}:
        return
    if mode in ("4bit", "8bit", "quantized"):
        raise ArgumentValueError("device_map", device_map, f"a map without 'disk' for a {mode} load",
                                 "Quantized weights cannot be offloaded to disk; load_in_16bit=True can.")
    if offload_folder is None:
        raise ArgumentValueError("offload_folder", None, "a directory, since device_map puts modules on 'disk'")


def _rank_map(local: int, world: int, *, on_gpu: bool):
    if on_gpu and local >= torch.cuda.device_count():
        raise ArgumentValueError(
            "device_map", DEFAULT, f"a map for LOCAL_RANK={local}: only {torch.cuda.device_count()} GPUs are visible",
            "Launch at most one rank per GPU, or pass device_map= explicitly.",
        )
    target = f"cuda:{local}" if on_gpu else "cpu"
    note = (f"device_map={{'': {target!r}}}: launched as local rank {local} of {world} (LOCAL_RANK, WORLD_SIZE), "
            "each rank loads its own copy; pass device_map= to place it otherwise")
    return {"": target}, (note,)


def infer(strategy: str, skeleton, family: FamilySpec, *, mode: str, dtype, plan: QuantPlan | None, max_memory):
    """accelerate's device map for `strategy` on the skeleton, as transformers' `_get_device_map` computes it,
    with the vision tower unsplit and the projector beside it."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    no_split = sorted({*(skeleton._no_split_modules or ()), type(skeleton.get_submodule(family.vision_tower)).__name__})
    sizes = _sizes(skeleton, mode, dtype, plan)
    if strategy == "sequential":
        memory = get_max_memory(max_memory)
    else:
        memory = get_balanced_memory(skeleton, max_memory, no_split_module_classes=no_split,
                                     low_zero=strategy == "balanced_low_0", **sizes)
    if mode in ("4bit", "8bit"):
        memory = {device: int(size * QUANTIZED_MEMORY_FRACTION) for device, size in memory.items()}
    device_map = infer_auto_device_map(skeleton, max_memory=memory, no_split_module_classes=no_split, **sizes)
    return keep_together(device_map, family.vision_tower, family.projector)


def _sizes(skeleton, mode: str, dtype, plan: QuantPlan | None) -> dict:
    """accelerate's size arguments: the quantized dtype for every weight, the 16-bit dtype for the weights
    of what the plan keeps (vision tower, projector, lm_head, embeddings, norms)."""
    from accelerate.utils import CustomDtype

    quantized = {"4bit": CustomDtype.INT4, "8bit": torch.int8}.get(mode)
    if quantized is None or plan is None:
        return {"dtype": dtype}
    kept = {entry.module for entry in plan.entries if entry.kind == "keep"}
    special = {f"{module}.{name}": dtype for module in kept
               for name, _ in skeleton.get_submodule(module).named_parameters(recurse=False)}
    return {"dtype": quantized, "special_dtypes": special}


def keep_together(device_map: dict, vision: str, projector: str | None) -> dict:
    """`device_map` with the projector on the vision tower's device (the one holding its first entry)."""
    if projector is None or _under(projector, vision):
        return device_map  # Qwen's merger sits inside the vision tower, which is not split
    covering = [key for key in device_map if _under(projector, key)]
    if covering and _under(vision, max(covering, key=len)):
        return device_map  # one entry holds both
    vision_devices = [d for key, d in device_map.items() if _under(vision, key) or _under(key, vision)]
    kept = {key: d for key, d in device_map.items() if not _under(key, projector)}
    kept[projector] = vision_devices[0]
    return kept


def observed(model, family: FamilySpec, notes: tuple[str, ...]) -> Placement:
    """The placement of a loaded model: accelerate's dispatch map, or the one device of an undispatched model."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        device_map = {"": next(model.parameters()).device}
    entries = tuple((module, _device_name(device), part_of(module, family) if module else "whole model")
                    for module, device in device_map.items())
    return Placement(entries=entries, notes=notes)


def _device_name(device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)
