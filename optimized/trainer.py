"""`from optimized.trainer import UnslothVisionDataCollator`: the reference collator (it runs no kernels)."""

from reference.trainer import UnslothVisionDataCollator

__all__ = ["UnslothVisionDataCollator"]
