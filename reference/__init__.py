"""fastvision's reference backend: the executable form of the contract, in plain PyTorch."""

from reference.api import FastBaseModel, FastModel, FastVisionModel
from reference.chat_templates import get_chat_template
from reference.errors import CheckpointError, OfflineError
from reference.quantization import QuantPlan
from reference.trainer import UnslothVisionDataCollator
from reference.training import is_bf16_supported

__all__ = [
    "CheckpointError",
    "FastBaseModel",
    "FastModel",
    "FastVisionModel",
    "OfflineError",
    "QuantPlan",
    "UnslothVisionDataCollator",
    "get_chat_template",
    "is_bf16_supported",
]
