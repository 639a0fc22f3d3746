"""Model-name resolution: an explicit table, local directories, the Hugging Face cache, the hub.

No fuzzy matching: when the load quantizes to 4-bit itself (the decided mode, not the raw flag), a known
16-bit id maps to its pre-quantized `-bnb-4bit` twin; otherwise a `-bnb-4bit` id maps back. Unknown ids
and local paths pass through unchanged. A twin that is not at hand while its original is (cached) gives
the original, quantized on load, and says so. Offline (`HF_HUB_OFFLINE=1`, `local_files_only=True`, or no
network), an id that is not cached fails at once with `OfflineError`: no hang, no retry loop. A name that
is a path (absolute, `./`, `~`) to nothing is a `CheckpointError`, not a hub lookup.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

from reference.errors import CheckpointError, OfflineError
from reference.families import FAMILIES

logger = logging.getLogger("fastvision")

# 16-bit id -> pre-quantized 4-bit twin, from the family records. Lookups are case-insensitive (the hub's
# ids are).
FOUR_BIT_TWINS = {sixteen: four for spec in FAMILIES.values() for sixteen, four in spec.four_bit_twins}
# 4-bit id -> its 16-bit twin: the unsloth/ mirror, which carries the same weights as the original. Unsloth's
# dynamic `-unsloth-bnb-4bit` quants map back too (nothing maps to them: they load as given).
SIXTEEN_BIT_TWINS = {
    **{four: sixteen for sixteen, four in FOUR_BIT_TWINS.items() if sixteen.startswith("unsloth/")},
    **{dynamic: sixteen for spec in FAMILIES.values() for sixteen, dynamic in spec.dynamic_four_bit_twins},
}

_FOUR_BIT_LOWER = {k.lower(): v for k, v in FOUR_BIT_TWINS.items()}
_SIXTEEN_BIT_LOWER = {k.lower(): v for k, v in SIXTEEN_BIT_TWINS.items()}


@dataclasses.dataclass(frozen=True)
class ResolvedName:
    requested: str
    name: str  # after the table
    path: Path  # the local directory the load reads from
    remapped: bool
    source: str  # "local directory", "cache" or "hub"
    note: str = ""  # what a user should know about the resolution (a twin replaced by its original)


def remap(model_name: str, load_in_4bit: bool) -> str:
    """The table's answer for a name: its 4-bit or 16-bit twin, or the name unchanged."""
    table = _FOUR_BIT_LOWER if load_in_4bit else _SIXTEEN_BIT_LOWER
    return table.get(model_name.lower(), model_name)


_TRUE = {"1", "true", "yes", "on"}


def is_offline(local_files_only: bool = False) -> bool:
    """Offline if asked for this call, or by the environment now (read per call, not at import)."""
    from_env = any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(local_files_only) or from_env or hub_constants.HF_HUB_OFFLINE


def looks_like_path(name: str) -> bool:
    """A name only a filesystem path can be: absolute, `./`, `../`, `~`, or more than one `/` (a hub id
    is `owner/name`)."""
    return (
        Path(name).is_absolute()
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or name.count("/") > 1
        or "\\" in name
    )


def resolve(
    model_name, *, to_4bit_twin: bool, token=None, hub_kwargs: dict | None = None, argument: str = "model_name"
) -> ResolvedName:
    """Where to load `model_name` from. A directory is used as is; an id goes through the table (toward
    the 4-bit twin when `to_4bit_twin`, else back to the 16-bit original), then the local cache, then
    (online) the hub. `hub_kwargs` may carry revision, cache_dir, local_files_only. `argument` names the
    argument in errors (model_name or tokenizer_name)."""
    hub_kwargs = dict(hub_kwargs or {})
    requested = os.fspath(model_name)
    local = Path(requested).expanduser()
    if local.is_dir():
        return ResolvedName(requested, requested, local, False, "local directory")
    if local.exists() or looks_like_path(requested):
        problem = "is a file, not a checkpoint directory" if local.exists() else "is a path, and nothing is there"
        raise CheckpointError(
            f"{argument}={requested!r}",
            f"{problem} ({local.resolve()})",
            "Pass the directory that holds config.json and the weights, or a hub id 'owner/name'.",
        )
    name = remap(requested, to_4bit_twin)
    if name == requested:
        path, source = _snapshot(name, argument, token=token, **hub_kwargs)
        return ResolvedName(requested, name, path, False, source)
    twin_kwargs = dict(hub_kwargs)
    if twin_kwargs.pop("revision", None) is not None:
        warnings.warn(
            f"{argument}={requested!r} was remapped to {name!r}, so revision= is dropped: it names a commit of "
            "the original repository, not of its twin.",
            stacklevel=5,
        )
    try:
        path, source = _snapshot(name, argument, token=token, **twin_kwargs)
        return ResolvedName(requested, name, path, True, source)
    except OfflineError:
        original = _cached_original(requested, argument, token, hub_kwargs) if to_4bit_twin else None
        if original is None:
            raise
    note = (
        f"the 4-bit twin {name} is not at hand, so the cached original {requested} is loaded and quantized "
        "on load"
    )
    logger.warning("fastvision: %s.", note)
    return ResolvedName(requested, requested, original, False, "cache", note)


def _cached_original(name: str, argument: str, token, hub_kwargs: dict) -> Path | None:
    try:
        return _snapshot(name, argument, token=token, **{**hub_kwargs, "local_files_only": True})[0]
    except OfflineError:
        return None


def _snapshot(
    name: str, argument: str, *, token, revision=None, cache_dir=None, local_files_only=False, **_
) -> tuple[Path, str]:
    try:
        cached = huggingface_hub.snapshot_download(
            name, revision=revision, cache_dir=cache_dir, local_files_only=True, token=token
        )
        return Path(cached), "cache"
    except hub_errors.LocalEntryNotFoundError:
        pass
    except hub_errors.HFValidationError as error:
        raise CheckpointError(f"{argument}={name!r}", f"is neither a directory nor a hub id ({error})",
                              "Pass a local checkpoint directory or a hub id 'owner/name'.") from None
    if is_offline(local_files_only):
        why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
        raise OfflineError(name, why, argument) from None
    try:
        return Path(huggingface_hub.snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token)), "hub"
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError, hub_errors.RevisionNotFoundError):
        raise
    except (hub_errors.LocalEntryNotFoundError, OSError) as error:
        raise OfflineError(name, f"{type(error).__name__}: {error}", argument) from error
    except Exception as error:  # the HTTP client's own connection errors are not OSErrors
        if type(error).__module__.split(".")[0].startswith(("httpx", "requests", "urllib3")):
            raise OfflineError(name, f"{type(error).__name__}: {error}", argument) from error
        raise
