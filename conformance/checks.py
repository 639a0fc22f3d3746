"""Assertions of the conformance suite: every failure carries a one-line reproduction.

A failing check reads like

    AssertionError: load_in_4bit=True with load_in_8bit=True loaded instead of raising ValueError
    reproduce: FastVisionModel.from_pretrained(zoo.checkpoint("llava"), load_in_4bit=True, load_in_8bit=True)

so a backend author can paste the last line into a shell (after `from conformance import zoo` and the
backend's import) — array-api-tests' `ph.add_note(exc, repro)` idiom. Errors are judged the way a user
catches them: by builtin type (ValueError, TypeError, ...) and by the message naming the argument; a
backend's own error classes are never imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import pathlib
import shutil
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

ENTRY = "FastVisionModel"  # the entry point a reproduction calls (the user-facing one)


class Raw(str):
    """Source text shown as is in a reproduction (e.g. `zoo.checkpoint("llava")`)."""

    def __repr__(self) -> str:
        return str(self)


def zoo_path(family: str) -> Raw:
    return Raw(f'zoo.checkpoint("{family}")')


def fmt(value) -> str:
    """One-line source text for a call argument."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value)  # "torch.bfloat16"
    if isinstance(value, os.PathLike):
        return repr(os.fspath(value))
    if isinstance(value, type):
        return f"{value.__module__.split('.')[0]}.{value.__name__}"
    return " ".join(repr(value).split())  # configs print over several lines


def call(model_name, entry: str = ENTRY, **kwargs) -> str:
    """`FastVisionModel.from_pretrained(zoo.checkpoint("llava"), dtype=torch.bfloat16)`."""
    args = [fmt(model_name), *(f"{k}={fmt(v)}" for k, v in kwargs.items())]
    return f"{entry}.from_pretrained({', '.join(args)})"


def fail(message: str, repro: str) -> AssertionError:
    return AssertionError(f"{message}\nreproduce: {repro}")


def check(condition, message: str, *, repro: str) -> None:
    if not condition:
        raise fail(message, repro)


def check_equal(actual, expected, what: str, *, repro: str) -> None:
    if not actual == expected:
        raise fail(f"{what}: got {actual!r}, expected {expected!r}", repro)


def add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(note)
    else:
        error.args = (*error.args, note)


@contextlib.contextmanager
def reproducing(repro: str):
    """Attach the reproduction to any exception that leaves the block (a crash inside a load, say)."""
    try:
        yield
    except BaseException as error:
        if not str(error).endswith(repro):
            add_note(error, f"reproduce: {repro}")
        raise


# ------------------------------------------------------------------------------------------- errors
@dataclasses.dataclass(frozen=True)
class SeenError:
    """What a caller observes of an error; the exception itself is not kept, since its traceback would
    keep a half-built model alive."""

    type_name: str
    class_names: tuple[str, ...]
    message: str


def _names_value(message: str, value) -> bool:
    return any(text in message for text in {repr(value), str(value)})


def expect_error(
    fn: Callable[[], object],
    types: type[BaseException] | tuple[type[BaseException], ...],
    *,
    names: Iterable[str] = (),
    value=dataclasses.MISSING,
    class_name: str | None = None,
    repro: str,
) -> SeenError:
    """Call `fn`; it must raise one of the builtin `types`, with a message containing every one of
    `names` (and `value`, as repr or str, when given), and be of a class called `class_name`."""
    expected = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
    try:
        fn()
    except BaseException as error:  # noqa: BLE001 - judged below, re-raised with the repro if wrong
        seen = SeenError(type(error).__name__, tuple(c.__name__ for c in type(error).__mro__), str(error))
        if not isinstance(error, types):
            raise fail(f"raised {seen.type_name}: {seen.message!r}; expected {expected}", repro) from error
        error.__traceback__ = None  # drop the frames (and any model they hold) now
    else:
        raise fail(f"returned normally; expected {expected}" + (f" naming {list(names)}" if names else ""), repro)
    for name in names:
        check(name in seen.message, f"{seen.type_name} message does not name {name!r}: {seen.message!r}", repro=repro)
    if value is not dataclasses.MISSING:
        check(_names_value(seen.message, value),
              f"{seen.type_name} message does not show the value {value!r}: {seen.message!r}", repro=repro)
    if class_name is not None:
        check(class_name in seen.class_names, f"raised {seen.type_name}, expected a {class_name}", repro=repro)
    return seen


def expect_offline_error(fn: Callable[[], object], *, names: Iterable[str] = (), repro: str) -> SeenError:
    """docs/contract.md: an uncached hub id offline raises `OfflineError`, an `OSError`."""
    return expect_error(fn, OSError, names=names, class_name="OfflineError", repro=repro)


# ----------------------------------------------------------------------------------------- warnings
@dataclasses.dataclass
class Recorded:
    messages: list[str] = dataclasses.field(default_factory=list)

    def naming(self, *names: str) -> list[str]:
        return [m for m in self.messages if all(n in m for n in names)]


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@contextlib.contextmanager
def recording_warnings():
    """Collect what a user would see as warnings: `warnings.warn` and WARNING log records."""
    recorded = Recorded()
    handler = _ListHandler(recorded.messages)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield recorded
    finally:
        root.removeHandler(handler)
    recorded.messages.extend(str(w.message) for w in caught)


def check_warned(recorded: Recorded, *names: str, repro: str) -> None:
    check(recorded.naming(*names), f"no warning naming {' and '.join(names)}; warnings seen: {recorded.messages}",
          repro=repro)


# ------------------------------------------------------------------------------------- leftovers
def live_modules(class_name: str | None = None) -> int:
    """How many `nn.Module` objects (of the class called `class_name`, if given) are alive."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some of torch's deprecated proxies warns
        warnings.simplefilter("ignore")
        return sum(
            1
            for obj in gc.get_objects()
            if isinstance(obj, nn.Module) and (class_name is None or type(obj).__name__ == class_name)
        )


def device_memory(device: str) -> int:
    """Bytes allocated on the device by tensors (0 on the CPU, where the allocator cannot be read)."""
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return 0


# -------------------------------------------------------------------------------- a temporary hub cache
# Hugging Face's own cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}. A fake commit
# hash is fine: offline, the hub client reads refs/main and opens that snapshot folder.
SNAPSHOT_COMMIT = "0" * 39 + "1"
# huggingface_hub reads these at import into `constants`; a process started with the variables set sees
# the same values, so setting both is what a user's HF_HOME does.
_HUB_PATHS = {
    "HF_HOME": lambda home: home,
    "HF_HUB_CACHE": lambda home: home / "hub",
    "HUGGINGFACE_HUB_CACHE": lambda home: home / "hub",
    "HF_ASSETS_CACHE": lambda home: home / "assets",
    "HF_XET_CACHE": lambda home: home / "xet",
    "HF_TOKEN_PATH": lambda home: home / "token",
    "HF_STORED_TOKENS_PATH": lambda home: home / "stored_tokens",
}


@dataclasses.dataclass
class HubCache:
    """A Hugging Face home under a temporary directory, made current for the test."""

    home: pathlib.Path

    @property
    def hub(self):
        return self.home / "hub"

    def add(self, repo_id: str, source) -> pathlib.Path:
        """Put a copy of the checkpoint directory `source` in the cache as `repo_id`; return its snapshot."""
        repo = self.hub / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / SNAPSHOT_COMMIT
        shutil.copytree(source, snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(SNAPSHOT_COMMIT)
        return snapshot


def use_hub_cache(home: pathlib.Path, monkeypatch) -> HubCache:
    """Point HF_HOME (and every path derived from it, in the environment and in huggingface_hub's
    constants) at `home` for the rest of the test."""
    from huggingface_hub import constants

    home.mkdir(parents=True, exist_ok=True)
    for name, path_of in _HUB_PATHS.items():
        monkeypatch.setenv(name, str(path_of(home)))
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, str(path_of(home)))
    return HubCache(home)
