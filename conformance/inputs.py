"""Model inputs the suite, the CLI and the benchmarks share: chat prompts with one image each."""

from __future__ import annotations

from conformance import zoo

# Two prompts of different lengths, so a batch of both is left-padded.
PROMPTS = ("What is in this image?", "Describe the colours, the shapes and where each one sits, in detail.")


def chat_texts(processor, prompts=PROMPTS) -> list[str]:
    return [
        processor.apply_chat_template(zoo.sample_conversation(p), add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]


def image_batch(processor, prompts=PROMPTS, *, seed: int = 0, return_tensors: str = "pt"):
    """A padded batch: prompt i with sample image seed+i. Images are nested one list per prompt, the form
    every family's processor accepts (Gemma3's requires it)."""
    images = [[zoo.sample_image(seed + i)] for i in range(len(prompts))]
    return processor(text=chat_texts(processor, prompts), images=images, return_tensors=return_tensors, padding=True)


# Captioned images for the training demo: a square of one colour on a light background, captioned with
# the colour, so what the fine-tune learns is visible in what it generates.
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220)}
CAPTION_PROMPT = "What colour is the square?"


def captioned_image(index: int):
    """(image, caption) number `index`: the colour cycles, the square's place and size vary."""
    from PIL import Image, ImageDraw

    name, rgb = list(COLOURS.items())[index % len(COLOURS)]
    image = Image.new("RGB", (96, 80), (235, 235, 225))
    x, y, side = 8 + (index * 13) % 40, 6 + (index * 7) % 30, 30 + (index * 5) % 14
    ImageDraw.Draw(image).rectangle((x, y, x + side, y + side), fill=rgb)
    return image, f"The square is {name}."


def captioned_conversations(count: int) -> list[dict]:
    """Unsloth's notebook format: {"messages": [user: image + prompt, assistant: caption]}."""
    rows = []
    for index in range(count):
        image, caption = captioned_image(index)
        user = [{"type": "image", "image": image}, {"type": "text", "text": CAPTION_PROMPT}]
        assistant = [{"type": "text", "text": caption}]
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})
    return rows
