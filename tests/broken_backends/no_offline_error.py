"""Fault: an uncached hub id offline raises a generic RuntimeError instead of OfflineError (an OSError)."""

import reference
from tests.broken_backends._wrap import broken_backend

_, _, _Working = broken_backend()


def _from_pretrained(cls, *args, **kwargs):
    try:
        return _Working.from_pretrained(*args, **kwargs)
    except OSError as error:
        raise RuntimeError("could not load the model") from error


_from_pretrained.__signature__ = reference.FastBaseModel.from_pretrained.__func__.__signature__
FastBaseModel = type("FastBaseModel", (), {"from_pretrained": classmethod(_from_pretrained)})
FastModel = type("FastModel", (FastBaseModel,), {})
FastVisionModel = type("FastVisionModel", (FastModel,), {})
