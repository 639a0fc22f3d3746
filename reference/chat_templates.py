"""`get_chat_template(processor, "gemma-3")`: Unsloth's helper that puts a named chat template on a processor.

Unsloth's Gemma3 vision notebook calls it on a base (`-pt`) checkpoint, which ships without a chat
template. The templates here are written for fastvision in each family's own turn format (Gemma 3's
`<start_of_turn>user ... <end_of_turn>`, ChatML for Qwen, Llava-1.5's `USER: ... ASSISTANT:`, Mistral's
`[INST] ... [/INST]`), with images placed where the family's processor expands them.
"""

from __future__ import annotations

from reference.errors import ArgumentValueError

# The content of a message: a string, or parts of type "text" and "image".
_CONTENT = (
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}IMAGE{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)


def _content(image: str) -> str:
    return _CONTENT.replace("IMAGE", image)


GEMMA3 = (
    "{{ bos_token }}{%- set system = '' -%}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] if messages[0]['content'] "
    "is string else messages[0]['content'][0]['text'] -%}{%- set messages = messages[1:] -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{%- if loop.first and system %}{{ system }}\n\n{% endif -%}" + _content("<start_of_image>") + "<end_of_turn>\n"
    "{%- endfor -%}{%- if add_generation_prompt -%}<start_of_turn>model\n{%- endif -%}"
)
CHATML = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{%- endif -%}"
    "<|im_start|>{{ message['role'] }}\n"
    + _content("<|vision_start|><|image_pad|><|vision_end|>")
    + "<|im_end|>\n{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
LLAVA = (
    "{%- for message in messages -%}{{ message['role'].upper() }}: "
    + _content("<image>\n")
    + " {% endfor -%}{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)
MISTRAL = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}[INST]" + _content("[IMG]") + "[/INST]"
    "{%- elif message['role'] == 'assistant' -%}" + _content("") + "{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)
TEMPLATES = {
    "gemma-3": GEMMA3,
    "gemma3": GEMMA3,
    "chatml": CHATML,
    "qwen-2.5": CHATML,
    "qwen2.5": CHATML,
    "qwen-2": CHATML,
    "qwen2-vl": CHATML,
    "llava": LLAVA,
    "mistral": MISTRAL,
    "pixtral": MISTRAL,
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
