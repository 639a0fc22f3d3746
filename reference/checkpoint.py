"""What is on disk, checked before any weight is read: config, weight files, shapes, processor files.

Damaged or hostile checkpoints would otherwise reach the user as whatever transformers, safetensors or
bitsandbytes happens to raise, from deep inside a load and after weights reached the device — or, for a
weight of the wrong shape loaded in 4-bit, not at all until the first forward. Everything here reads
only file headers and JSON: a safetensors file is 8 bytes of header length, a JSON header giving each
tensor's dtype, shape and byte range, then the bytes, so a truncated file, random bytes, a missing
shard and a shape that disagrees with the config are all visible without reading a tensor. Each fault
is a `CheckpointError` naming the file, what is wrong and what to do.

Pickled weights (`pytorch_model.bin`) can run code when unpickled: they are refused unless the user
passes `use_safetensors=False`, and then transformers reads them through torch's `weights_only` loader.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct
from pathlib import Path

from torch import nn

from reference.errors import CheckpointError

logger = logging.getLogger("fastvision")

SAFETENSORS = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# safetensors' own limit on the JSON header (its MAX_HEADER_SIZE): anything longer is not a header.
MAX_HEADER_BYTES = 100_000_000
# Bytes per element of each safetensors dtype; one not listed (a newer sub-byte format) skips the size check.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"}
# Files any of which makes a folder a tokenizer, and any of which gives it an image processor.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tekken.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
FRESH_DOWNLOAD = "Download or copy the checkpoint again; a partial download or a damaged disk leaves files like this."


@dataclasses.dataclass(frozen=True)
class Tensor:
    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class WeightFiles:
    format: str  # "safetensors" or "pickle"
    files: tuple[Path, ...]
    tensors: dict[str, Tensor]  # every tensor a safetensors header names (empty for pickles)


# ------------------------------------------------------------------------------------------- config
def read_config(directory: Path) -> dict:
    """config.json as a dict with a model_type; CheckpointError if it is missing or not one."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(
            path, "there is no config.json", "Pass the checkpoint's own directory, or a config as auto_config=."
        )
    config = _read_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise CheckpointError(path, "config.json has no model_type", FRESH_DOWNLOAD)
    return config


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(path, f"the file is not valid JSON ({error})", FRESH_DOWNLOAD) from None
    except OSError as error:
        raise CheckpointError(path, f"the file cannot be read ({error.strerror or error})", FRESH_DOWNLOAD) from None


# ------------------------------------------------------------------------------------------ weights
def weight_files(directory: Path, *, variant: str | None = None, use_safetensors: bool | None = None) -> WeightFiles:
    """The checkpoint's weight files with every safetensors header checked; pickles only when allowed."""
    index = directory / _with_variant(SAFETENSORS_INDEX, variant)
    single = directory / _with_variant(SAFETENSORS, variant)
    if use_safetensors is not False and index.is_file():
        placed = _index(index)  # shard -> the tensor names the index places in it
    elif use_safetensors is not False and single.is_file():
        placed = {single: set()}
    else:
        return _pickles(directory, variant, use_safetensors)
    tensors: dict[str, Tensor] = {}
    for shard, names in placed.items():
        held = read_header(shard)
        absent = sorted(names - set(held))
        if absent:
            raise CheckpointError(
                shard,
                f"the index places {len(absent)} tensors here that the shard lacks, e.g. {absent[0]!r}",
                FRESH_DOWNLOAD,
            )
        tensors.update(held)
    if not tensors:
        names = ", ".join(shard.name for shard in placed)
        raise CheckpointError(directory, f"its weight files ({names}) hold no tensors", FRESH_DOWNLOAD)
    return WeightFiles("safetensors", tuple(placed), tensors)


def _with_variant(name: str, variant: str | None) -> str:
    """transformers' naming: model.safetensors -> model.fp16.safetensors, ...index.json -> ...index.fp16.json."""
    if variant is None:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def _index(index: Path) -> dict[Path, set]:
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(index, "the index has no weight_map of tensor names to shard files", FRESH_DOWNLOAD)
    placed: dict[Path, set] = {}
    for key, name in weight_map.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(index, f"the index names a shard outside the checkpoint: {name!r}", FRESH_DOWNLOAD)
        placed.setdefault(index.parent / name, set()).add(key)
    for shard in sorted(placed):
        if not shard.is_file():
            raise CheckpointError(index, f"the index names the shard {shard.name!r}, which is missing", FRESH_DOWNLOAD)
    return placed


def _pickles(directory: Path, variant: str | None, use_safetensors: bool | None) -> WeightFiles:
    found = [directory / _with_variant(name, variant) for name in PICKLES]
    found = [path for path in found if path.is_file()]
    if not found:
        raise CheckpointError(
            directory,
            "there are no weights (no model.safetensors, no safetensors index)",
            "Pass a directory that holds the model's weights.",
        )
    if use_safetensors is not False:
        raise CheckpointError(
            found[0],
            "the weights are only a pickle, and unpickling can run code hidden in the file",
            "Convert them to safetensors, or, if you trust the file, pass use_safetensors=False to load them "
            "through torch's weights_only loader.",
        )
    return WeightFiles("pickle", tuple(found), {})


def read_header(file: Path) -> dict[str, Tensor]:
    """The tensors a safetensors file holds, with the file's size checked against its header."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            if length is None or length > min(size - 8, MAX_HEADER_BYTES):
                problem = f"the file ({size} bytes) is truncated or not safetensors: no header length fits in it"
                raise CheckpointError(file, problem, FRESH_DOWNLOAD)
            raw = handle.read(length)
    except OSError as error:
        raise CheckpointError(file, f"the file cannot be read ({error.strerror or error})", FRESH_DOWNLOAD) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(
            file, "the safetensors header is not JSON: the file is damaged or not safetensors", FRESH_DOWNLOAD
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(file, "the safetensors header is not a table of tensors", FRESH_DOWNLOAD)
    header.pop("__metadata__", None)
    tensors = {key: _entry(file, key, value) for key, value in header.items()}
    _check_byte_ranges(file, header, size - 8 - length)
    return tensors


def _entry(file: Path, key: str, value) -> Tensor:
    ok = (
        isinstance(value, dict)
        and isinstance(value.get("dtype"), str)
        and isinstance(value.get("shape"), list)
        and all(isinstance(d, int) and d >= 0 for d in value["shape"])
        and isinstance(value.get("data_offsets"), list)
        and len(value["data_offsets"]) == 2
        and all(isinstance(o, int) and o >= 0 for o in value["data_offsets"])
    )
    if not ok:
        raise CheckpointError(file, f"the header entry of {key!r} is not a dtype, shape and byte range", FRESH_DOWNLOAD)
    return Tensor(file, value["dtype"], tuple(value["shape"]))


def _check_byte_ranges(file: Path, header: dict, data_bytes: int) -> None:
    """Each tensor's byte range holds exactly its elements, and the ranges end where the file does."""
    end = 0
    for key, value in header.items():
        start, stop = value["data_offsets"]
        width = DTYPE_BYTES.get(value["dtype"])
        if stop < start or (width is not None and stop - start != math.prod(value["shape"]) * width):
            raise CheckpointError(
                file,
                f"the byte range of {key!r} does not hold its {value['dtype']} {value['shape']} elements",
                FRESH_DOWNLOAD,
            )
        end = max(end, stop)
    if end > data_bytes:
        raise CheckpointError(
            file,
            f"the file is truncated: its header needs {end} bytes of tensor data, the file holds {data_bytes}",
            FRESH_DOWNLOAD,
        )
    if end < data_bytes:
        raise CheckpointError(file, f"the file has {data_bytes - end} bytes after its last tensor", FRESH_DOWNLOAD)


# --------------------------------------------------------------------------- weights against config
def check_against_model(weights: WeightFiles, skeleton: nn.Module, directory: Path) -> None:
    """Every safetensors tensor that belongs to a weight of `skeleton` (the model the config builds, on
    the meta device) has its shape and a float dtype where the weight is float; at least one belongs."""
    if weights.format != "safetensors":
        return
    names = _model_names(weights.tensors, skeleton)
    if names is None:  # this transformers has no renaming API we know: transformers checks what it can
        return
    expected = skeleton.state_dict()
    matched = 0
    for key, tensor in weights.tensors.items():
        name = names.get(key)
        if name is None or name not in expected:
            continue
        matched += 1
        want = tuple(expected[name].shape)
        if tensor.shape != want:
            raise CheckpointError(
                tensor.file,
                f"the tensor {key!r} has shape {list(tensor.shape)}, but the config makes {name} {list(want)}",
                "Use the config.json that came with these weights, or weights that match this config.",
            )
        if expected[name].dtype.is_floating_point and tensor.dtype not in FLOAT_DTYPES and tensor.dtype in DTYPE_BYTES:
            raise CheckpointError(
                tensor.file,
                f"the tensor {key!r} is stored as {tensor.dtype}, but {name} holds floating-point weights",
                FRESH_DOWNLOAD,
            )
    if matched == 0:
        files = ", ".join(file.name for file in weights.files)
        raise CheckpointError(
            directory,
            f"none of the {len(weights.tensors)} tensors in {files} is a weight of "
            f"{type(skeleton).__name__} (e.g. {next(iter(weights.tensors))!r})",
            "The weights belong to another model; pass the checkpoint that matches config.json.",
        )


def _model_names(tensors: dict[str, Tensor], skeleton: nn.Module) -> dict[str, str | None] | None:
    """Checkpoint key -> the model's parameter name, through transformers' own renaming (on-disk keys are
    legacy: `language_model.model.*` for `model.language_model.*`). Keys a converter fuses or splits map
    to None: their shapes change on load."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(skeleton)
    except Exception:  # noqa: BLE001 - an API this transformers lacks or changed
        logger.debug(
            "fastvision: transformers' weight renaming is unavailable; shapes are checked on load", exc_info=True
        )
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = skeleton.state_dict()
    names: dict[str, str | None] = {}
    for key in tensors:
        name, converted_by = rename_source_key(key, renamings, converters, skeleton.base_model_prefix, meta)
        names[key] = None if converted_by is not None else name
    return names


# ---------------------------------------------------------------------------------------- adapters
def adapter_base(directory: Path) -> str:
    """The base model a saved PEFT adapter was trained on (adapter_config.json's base_model_name_or_path),
    with the adapter's weights checked like a checkpoint's."""
    config = _read_json(directory / ADAPTER_CONFIG)
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise CheckpointError(
            directory / ADAPTER_CONFIG,
            "it names no base_model_name_or_path",
            "Save the adapter with model.save_pretrained() of a PEFT model.",
        )
    weights = directory / "adapter_model.safetensors"
    if weights.is_file():
        read_header(weights)
    elif not (directory / "adapter_model.bin").is_file():
        raise CheckpointError(directory, "the adapter has no weights (no adapter_model.safetensors)", FRESH_DOWNLOAD)
    return base


# -------------------------------------------------------------------------------------- processor
def has_processor_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def check_processor_files(directory: Path) -> None:
    """A folder a processor can load from: a tokenizer and an image processor, their JSON readable."""
    present = {name for name in (*TOKENIZER_FILES, *IMAGE_PROCESSOR_FILES) if (directory / name).is_file()}
    remedy = (
        "Pass tokenizer_name= the folder or hub id of the model's processor (its tokenizer and preprocessor files)."
    )
    if not present & set(TOKENIZER_FILES):
        raise CheckpointError(directory, "there is no tokenizer (no tokenizer.json or tokenizer_config.json)", remedy)
    if not present & set(IMAGE_PROCESSOR_FILES):
        raise CheckpointError(
            directory,
            "there is no image processor (no preprocessor_config.json or "
            "processor_config.json): a VLM needs one to read images",
            remedy,
        )
    for name in sorted(present):
        if name.endswith("_config.json"):  # small; tokenizer.json (MBs) is read, and checked, by the load
            _read_json(directory / name)
