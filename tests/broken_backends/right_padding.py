"""Fault: the processor and its tokenizer pad on the right."""

from tests.broken_backends._wrap import broken_backend


def _pad_right(_model, processor, _arguments) -> None:
    processor.tokenizer.padding_side = "right"
    processor.padding_side = "right"


FastBaseModel, FastModel, FastVisionModel = broken_backend(after=_pad_right)
