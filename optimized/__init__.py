"""fastvision's optimized backend: the reference contract, served by Triton kernels."""

from optimized.loader import OPTIMIZED
from optimized.patches.fused_lora import use_peft_lora
from reference.api import FastBaseModel as _ReferenceBase
from reference.chat_templates import get_chat_template
from reference.errors import CheckpointError, OfflineError
from reference.trainer import UnslothVisionDataCollator
from reference.training import is_bf16_supported


class FastBaseModel(_ReferenceBase):
    backend = OPTIMIZED


class FastModel(FastBaseModel):
    """Unsloth's general entry point; for vision-language models it is `FastBaseModel` itself."""


class FastVisionModel(FastModel):
    """The entry point for vision-language models."""


__all__ = [
    "CheckpointError",
    "FastBaseModel",
    "FastModel",
    "FastVisionModel",
    "OfflineError",
    "UnslothVisionDataCollator",
    "get_chat_template",
    "is_bf16_supported",
    "use_peft_lora",
]
