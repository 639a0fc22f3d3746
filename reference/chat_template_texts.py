"""The chat templates fastvision can put on a processor, in each family's own turn format.

Written for fastvision (Gemma 3's `<start_of_turn>user ... <end_of_turn>`, ChatML for Qwen, Llava-1.5's
`USER: ... ASSISTANT:`, Mistral's `[INST] ... [/INST]`), with images placed where the family's processor
expands them. Each family's record (`reference.families`) names its template and the names Unsloth's
`get_chat_template` knows it by; this module is only the text, so the records can import it.
"""

from __future__ import annotations

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
# Qwen3(-VL)-Instruct: ChatML without a default system turn.
QWEN3 = (
    "{%- for message in messages -%}"
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
