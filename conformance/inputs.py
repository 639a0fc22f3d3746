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
