"""Fault: a dtype given as a string ("bf16", "float16", ...) is ignored, as if dtype=None."""

from tests.broken_backends._wrap import broken_backend


def _drop_string_dtype(arguments: dict) -> dict:
    if isinstance(arguments.get("dtype"), str):
        arguments["dtype"] = None
    return arguments


FastBaseModel, FastModel, FastVisionModel = broken_backend(before=_drop_string_dtype)
