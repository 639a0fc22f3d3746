"""Fault: the collator masks padding but leaves the image placeholder tokens in the labels."""

from reference import FastBaseModel, FastModel, FastVisionModel  # noqa: F401 - the loader is the reference's
from reference.trainer import UnslothVisionDataCollator as _Collator


class UnslothVisionDataCollator(_Collator):
    def _image_token_ids(self):
        return []
