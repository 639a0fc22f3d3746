"""Fault: the token is set globally (HF_TOKEN in the environment), as Unsloth's hf_login does."""

import os

from tests.broken_backends._wrap import broken_backend


def _export_token(arguments: dict) -> dict:
    if arguments.get("token"):
        os.environ["HF_TOKEN"] = arguments["token"]
    return arguments


FastBaseModel, FastModel, FastVisionModel = broken_backend(before=_export_token)
