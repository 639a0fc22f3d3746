"""Fault: keyword arguments the backend does not know are silently dropped instead of reported."""

from tests.broken_backends._wrap import broken_backend

KNOWN = {"quantization_config", "attn_implementation", "revision", "cache_dir", "local_files_only", "subfolder",
         "variant", "quantize_vision"}


def _drop_unknown(arguments: dict) -> dict:
    arguments["kwargs"] = {k: v for k, v in arguments.get("kwargs", {}).items() if k in KNOWN}
    return arguments


FastBaseModel, FastModel, FastVisionModel = broken_backend(before=_drop_unknown)
