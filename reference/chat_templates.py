"""`get_chat_template(processor, "gemma-3")`: Unsloth's helper that puts a named chat template on a processor.

Unsloth's Gemma3 vision notebook calls it on a base (`-pt`) checkpoint, which ships without a chat
template. The names and texts come from the family records (`FamilySpec.chat_template_names`), plus
ChatML under its own name.
"""

from __future__ import annotations

from reference.chat_template_texts import CHATML
from reference.errors import ArgumentValueError
from reference.families import FAMILIES

TEMPLATES = {
    "chatml": CHATML,
    **{name: spec.chat_template for spec in FAMILIES.values() for name in spec.chat_template_names},
}


def get_chat_template(processor, chat_template="chatml", mapping=None, map_eos_token=True, system_message=None):
    """Set the named template on `processor` (and its tokenizer) and return it. Unsloth's `mapping` (ShareGPT
    role names), `map_eos_token` and `system_message` are accepted; messages use the standard role names."""
    if chat_template not in TEMPLATES:
        raise ArgumentValueError("chat_template", chat_template, ", ".join(map(repr, TEMPLATES)))
    template = TEMPLATES[chat_template]
    processor.chat_template = template
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.chat_template = template
    return processor
