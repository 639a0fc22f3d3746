"""Model-name resolution: an explicit table, local directories, the Hugging Face cache, the hub.

No fuzzy matching: with `load_in_4bit=True` a known 16-bit id maps to its pre-quantized `-bnb-4bit`
twin, without it a `-bnb-4bit` id maps back. Unknown ids and local paths pass through unchanged. Offline
(`HF_HUB_OFFLINE=1`, `local_files_only=True`, or no network), an id that is not cached fails at once with
`OfflineError`: no hang, no retry loop.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

from reference.errors import OfflineError

# 16-bit id -> pre-quantized 4-bit twin. Lookups are case-insensitive (the hub's ids are).
FOUR_BIT_TWINS = {
    "Qwen/Qwen2-VL-2B-Instruct": "unsloth/Qwen2-VL-2B-Instruct-bnb-4bit",
    "unsloth/Qwen2-VL-2B-Instruct": "unsloth/Qwen2-VL-2B-Instruct-bnb-4bit",
    "Qwen/Qwen2-VL-7B-Instruct": "unsloth/Qwen2-VL-7B-Instruct-bnb-4bit",
    "unsloth/Qwen2-VL-7B-Instruct": "unsloth/Qwen2-VL-7B-Instruct-bnb-4bit",
    "Qwen/Qwen2.5-VL-3B-Instruct": "unsloth/Qwen2.5-VL-3B-Instruct-bnb-4bit",
    "unsloth/Qwen2.5-VL-3B-Instruct": "unsloth/Qwen2.5-VL-3B-Instruct-bnb-4bit",
    "Qwen/Qwen2.5-VL-7B-Instruct": "unsloth/Qwen2.5-VL-7B-Instruct-bnb-4bit",
    "unsloth/Qwen2.5-VL-7B-Instruct": "unsloth/Qwen2.5-VL-7B-Instruct-bnb-4bit",
    "llava-hf/llava-1.5-7b-hf": "unsloth/llava-1.5-7b-hf-bnb-4bit",
    "unsloth/llava-1.5-7b-hf": "unsloth/llava-1.5-7b-hf-bnb-4bit",
    "mistral-community/pixtral-12b": "unsloth/Pixtral-12B-2409-bnb-4bit",
    "unsloth/Pixtral-12B-2409": "unsloth/Pixtral-12B-2409-bnb-4bit",
    "google/gemma-3-4b-it": "unsloth/gemma-3-4b-it-bnb-4bit",
    "unsloth/gemma-3-4b-it": "unsloth/gemma-3-4b-it-bnb-4bit",
    "google/gemma-3-12b-it": "unsloth/gemma-3-12b-it-bnb-4bit",
    "unsloth/gemma-3-12b-it": "unsloth/gemma-3-12b-it-bnb-4bit",
}
# 4-bit id -> its 16-bit twin: the unsloth/ mirror, which carries the same weights as the original.
SIXTEEN_BIT_TWINS = {four: sixteen for sixteen, four in FOUR_BIT_TWINS.items() if sixteen.startswith("unsloth/")}

_FOUR_BIT_LOWER = {k.lower(): v for k, v in FOUR_BIT_TWINS.items()}
_SIXTEEN_BIT_LOWER = {k.lower(): v for k, v in SIXTEEN_BIT_TWINS.items()}


@dataclasses.dataclass(frozen=True)
class ResolvedName:
    requested: str
    name: str  # after the table
    path: Path  # the local directory the load reads from
    remapped: bool
    source: str  # "local directory", "cache" or "hub"


def remap(model_name: str, load_in_4bit: bool) -> str:
    """The table's answer for a name: its 4-bit or 16-bit twin, or the name unchanged."""
    table = _FOUR_BIT_LOWER if load_in_4bit else _SIXTEEN_BIT_LOWER
    return table.get(model_name.lower(), model_name)


_TRUE = {"1", "true", "yes", "on"}


def is_offline(local_files_only: bool = False) -> bool:
    """Offline if asked for this call, or by the environment now (read per call, not at import)."""
    from_env = any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(local_files_only) or from_env or hub_constants.HF_HUB_OFFLINE


def resolve(model_name, *, load_in_4bit: bool, token=None, hub_kwargs: dict | None = None) -> ResolvedName:
    """Where to load `model_name` from. A directory is used as is; an id goes through the table, then
    the local cache, then (online) the hub. `hub_kwargs` may carry revision, cache_dir, local_files_only."""
    hub_kwargs = dict(hub_kwargs or {})
    requested = os.fspath(model_name)
    if Path(requested).expanduser().is_dir():
        return ResolvedName(requested, requested, Path(requested).expanduser(), False, "local directory")
    name = remap(requested, load_in_4bit)
    if name != requested and hub_kwargs.pop("revision", None) is not None:
        warnings.warn(
            f"model_name={requested!r} was remapped to {name!r}, so revision= is dropped: it names a commit of "
            "the original repository, not of its twin.",
            stacklevel=5,
        )
    path, source = _snapshot(name, token=token, **hub_kwargs)
    return ResolvedName(requested, name, path, name != requested, source)


def _snapshot(name: str, *, token, revision=None, cache_dir=None, local_files_only=False, **_) -> tuple[Path, str]:
    try:
        cached = huggingface_hub.snapshot_download(
            name, revision=revision, cache_dir=cache_dir, local_files_only=True, token=token
        )
        return Path(cached), "cache"
    except hub_errors.LocalEntryNotFoundError:
        pass
    if is_offline(local_files_only):
        why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
        raise OfflineError(name, why) from None
    try:
        return Path(huggingface_hub.snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token)), "hub"
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError, hub_errors.RevisionNotFoundError):
        raise
    except (hub_errors.LocalEntryNotFoundError, OSError) as error:
        raise OfflineError(name, f"{type(error).__name__}: {error}") from error
    except Exception as error:  # the HTTP client's own connection errors are not OSErrors
        if type(error).__module__.split(".")[0].startswith(("httpx", "requests", "urllib3")):
            raise OfflineError(name, f"{type(error).__name__}: {error}") from error
        raise
