"""fastvision's optimized backend: the reference contract, served by Triton kernels."""

from optimized.loader import OPTIMIZED
from reference.api import FastBaseModel as _ReferenceBase


class FastBaseModel(_ReferenceBase):
    backend = OPTIMIZED


class FastModel(FastBaseModel):
    """Unsloth's general entry point; for vision-language models it is `FastBaseModel` itself."""


class FastVisionModel(FastModel):
    """The entry point for vision-language models."""


__all__ = ["FastBaseModel", "FastModel", "FastVisionModel"]
