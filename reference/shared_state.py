"""Process-wide changes that live exactly as long as a fastvision model needs them.

Serving attention through transformers means registering a key in its attention and mask registries,
and a few optimized patches swap a module-level function (Pixtral's block mask, the text rotary
helpers). Left in place, those outlive every model: a process that loaded one model once keeps
fastvision's functions in transformers' globals forever. A `SharedChange` is applied when its first
holder takes it and undone when the last holder is garbage-collected, so once no fastvision model is
alive, transformers' registries and modules are exactly as they were.

    >>> change = module_attribute(some_module, "function", replacement)
    >>> change.hold(model)           # applied now (if not already), undone when every holder is gone
    >>> with change.held(): ...      # held for a block, e.g. while from_pretrained looks the key up
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable

logger = logging.getLogger("fastvision")
_MISSING = object()


class SharedChange:
    """A change to global state, applied while at least one holder is alive."""

    def __init__(self, name: str, apply: Callable[[], None], undo: Callable[[], None]):
        self.name, self._apply, self._undo = name, apply, undo
        self._holders = 0
        self._lock = threading.RLock()  # RLock: a finalizer may run inside a held section on this thread

    @property
    def active(self) -> bool:
        return self._holders > 0

    def _acquire(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._apply()
            self._holders += 1

    def _release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                self._undo()

    def hold(self, owner: object) -> None:
        """Keep the change while `owner` is alive."""
        self._acquire()
        weakref.finalize(owner, self._release)

    @contextlib.contextmanager
    def held(self):
        self._acquire()
        try:
            yield self
        finally:
            self._release()

    def __repr__(self) -> str:
        return f"SharedChange({self.name!r}, holders={self._holders})"


def module_attribute(module: object, attribute: str, replacement: object) -> SharedChange:
    """`module.attribute = replacement` while held, then the original again. Another library's later
    swap of the same attribute is left alone (restoring would undo it)."""
    original = [_MISSING]

    def apply() -> None:
        original[0] = getattr(module, attribute, _MISSING)
        setattr(module, attribute, replacement)

    def undo() -> None:
        if getattr(module, attribute, _MISSING) is not replacement:
            logger.warning("fastvision: %s.%s was replaced by someone else; leaving it", module, attribute)
            return
        if original[0] is _MISSING:
            delattr(module, attribute)
        else:
            setattr(module, attribute, original[0])

    return SharedChange(f"{getattr(module, '__name__', module)}.{attribute}", apply, undo)


def mapping_entry(mapping: dict, key: str, value: object, name: str) -> SharedChange:
    """`mapping[key] = value` while held, then whatever was there before (or nothing)."""
    previous = [_MISSING]

    def apply() -> None:
        previous[0] = mapping.get(key, _MISSING)
        mapping[key] = value

    def undo() -> None:
        if mapping.get(key, _MISSING) is not value:
            return
        if previous[0] is _MISSING:
            del mapping[key]
        else:
            mapping[key] = previous[0]

    return SharedChange(name, apply, undo)


def together(name: str, *changes: SharedChange) -> tuple[Callable[[], None], Callable[[], None]]:
    """(apply, undo) of several changes as one: applied in order, undone in reverse."""

    def apply() -> None:
        for change in changes:
            change._apply()

    def undo() -> None:
        for change in reversed(changes):
            change._undo()

    return apply, undo
