"""Fault: Qwen's text M-RoPE splits its frequencies into the wrong (temporal, height, width) sections."""

from tests.broken_backends._wrap import broken_backend


def _wrong_sections(model, _processor, _arguments) -> None:
    rotary = model.model.language_model.rotary_emb
    rotary.mrope_section = list(reversed(rotary.mrope_section))  # [4, 6, 6] -> [6, 6, 4]


FastBaseModel, FastModel, FastVisionModel = broken_backend(after=_wrong_sections)
