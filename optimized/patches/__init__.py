"""Per-family and shared patches of the optimized backend; each is set per instance and undone."""

from __future__ import annotations

import contextvars
import functools


def switched_on(switch: contextvars.ContextVar, forward):
    """`forward` with `switch` set to True for the duration of its calls (and whatever they call)."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        token = switch.set(True)
        try:
            return forward(*args, **kwargs)
        finally:
            switch.reset(token)

    return wrapper

