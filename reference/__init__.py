"""fastvision's reference backend: the executable form of the contract, in plain PyTorch."""

from reference.api import FastBaseModel, FastModel, FastVisionModel
from reference.errors import OfflineError
from reference.quantization import QuantPlan

__all__ = ["FastBaseModel", "FastModel", "FastVisionModel", "OfflineError", "QuantPlan"]
