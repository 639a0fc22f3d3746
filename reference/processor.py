"""Processor loading and its fix-ups: left padding, a pad token, the chat template.

The processor stays the family's stock class from `AutoProcessor` (never a tokenizer standing in for
it), so saving it and loading it again gives the same class and the same outputs — Unsloth's
`_Unsloth_Patched_` processor_class made reloaded finetunes lose their image processor
(unslothai/unsloth#4085).
"""

from __future__ import annotations

import os


def load_processor(source: str | os.PathLike, *, token=None, trust_remote_code=False, **hub_kwargs):
    # Imported with the first load: the image processors import torchvision, which imports torch._dynamo.
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(
        os.fspath(source), token=token, trust_remote_code=trust_remote_code, **hub_kwargs
    )
    return fix_processor(processor)


def fix_processor(processor):
    """Left padding on the processor and its tokenizer (generation appends on the right); EOS as the pad
    token where the checkpoint has none; the tokenizer's chat template carried onto the processor."""
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # saved with the tokenizer, so a reloaded one pads left too
    if hasattr(processor, "padding_side") or processor is not tokenizer:
        processor.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if processor is not tokenizer and not getattr(processor, "chat_template", None):
        template = getattr(tokenizer, "chat_template", None)
        if template:
            processor.chat_template = template
    return processor
