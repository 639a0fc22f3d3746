"""Fault: load_in_4bit=True with load_in_8bit=True is accepted and silently loads in 4-bit."""

from tests.broken_backends._wrap import broken_backend


def _drop_8bit(arguments: dict) -> dict:
    if arguments.get("load_in_4bit", True) and arguments.get("load_in_8bit"):
        arguments["load_in_8bit"] = False
    return arguments


FastBaseModel, FastModel, FastVisionModel = broken_backend(before=_drop_8bit)
