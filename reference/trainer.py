"""`UnslothVisionDataCollator`: chat examples with images -> batches TRL's `SFTTrainer` trains on.

Unsloth's signature and behaviour (unsloth_zoo's vision collator), built on the model's own processor:
the chat template renders each conversation, the processor tokenizes it and prepares its images, and the
labels are the input ids with padding, every image placeholder token of the family and (on request)
everything but the responses masked. The only image preprocessing of our own is the resize rule
(`resize`, `resize_dimension`, `snap_to_patch_size`). Batches are padded on the right.

    collator = UnslothVisionDataCollator(model, processor)
    batch = collator([{"messages": [{"role": "user", "content": [{"type": "image", "image": pil_image},
                                                                  {"type": "text", "text": "What is it?"}]},
                                    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}])

Differences from Unsloth: pads are masked by the attention mask, not by the pad id (so an EOS that doubles
as the pad token is still learned); image URLs are not fetched (download them first); a `max_seq_length`
that would cut through an image's tokens is an error naming the sample, never a silent mismatch.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import warnings
from pathlib import Path

import torch
from PIL import Image

from reference.errors import ArgumentTypeError, ArgumentValueError
from reference.families import FAMILIES, family_of

logger = logging.getLogger("fastvision")
RESIZE_DIMENSIONS = (0, 1, "max", "min")
# Unsloth's size when a vision config has no image_size (the Qwen towers): longest side 512.
DEFAULT_IMAGE_SIZE = 512
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels")


class UnslothVisionDataCollator:
    def __init__(
        self,
        model,
        processor,
        max_seq_length=None,
        formatting_func=None,
        resize="min",
        ignore_index=-100,
        train_on_responses_only=False,
        instruction_part=None,
        response_part=None,
        force_match=True,
        num_proc=None,
        completion_only_loss=True,
        pad_to_multiple_of=None,
        resize_dimension=0,
        snap_to_patch_size=False,
        last_response_only=False,
    ):
        if not hasattr(processor, "image_processor"):
            raise ArgumentTypeError(
                "processor",
                type(processor).__name__,
                "the processor from_pretrained returned (it has an image processor)",
                "A tokenizer cannot prepare images: pass the second value of FastVisionModel.from_pretrained.",
            )
        self.processor, self.tokenizer = processor, getattr(processor, "tokenizer", processor)
        self.family = _family(model)
        vision = getattr(model.config, "vision_config", None)
        self.dtype = getattr(model, "fastvision_dtype", None) or next(model.parameters()).dtype
        self.max_seq_length = model.max_seq_length if max_seq_length is None else max_seq_length
        self.target_size = _target_size(resize, vision)
        self.patch_size = _patch_size(vision)
        self.formatting_func, self.ignore_index, self.pad_to_multiple_of = (
            formatting_func,
            ignore_index,
            pad_to_multiple_of,
        )
        self.resize_dimension, self.snap_to_patch_size = resize_dimension, snap_to_patch_size
        self.completion_only_loss, self.last_response_only = completion_only_loss, last_response_only
        self.force_match, self.num_proc = force_match, num_proc
        self._check(resize_dimension, ignore_index, pad_to_multiple_of)
        self.responses = None
        if train_on_responses_only:
            for name, part in (("instruction_part", instruction_part), ("response_part", response_part)):
                if not isinstance(part, str) or not part:
                    raise ArgumentValueError(
                        name,
                        part,
                        "the text that starts each turn of that role, e.g. '<|im_start|>assistant\\n'",
                        "train_on_responses_only=True needs both.",
                    )
            self.responses = (self._ids(instruction_part), self._ids(response_part))
        self.image_token_ids = self._image_token_ids()

    def _check(self, resize_dimension, ignore_index, pad_to_multiple_of) -> None:
        if resize_dimension not in RESIZE_DIMENSIONS:
            raise ArgumentValueError("resize_dimension", resize_dimension, ", ".join(map(repr, RESIZE_DIMENSIONS)))
        if not isinstance(self.max_seq_length, int) or isinstance(self.max_seq_length, bool) or self.max_seq_length < 1:
            raise ArgumentValueError("max_seq_length", self.max_seq_length, "None (the model's) or an int >= 1")
        if not isinstance(ignore_index, int):
            raise ArgumentTypeError("ignore_index", ignore_index, "an int")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ArgumentValueError("pad_to_multiple_of", pad_to_multiple_of, "None or an int >= 1")

    def _ids(self, text: str) -> list[list[int]]:
        """The token sequences `text` may have in a sample: alone, and after a space (byte-level BPE and
        SentencePiece fold a preceding space into the first token: " ASSISTANT:" in "hi ASSISTANT:")."""
        alone = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        spaced = self.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        return [alone] if spaced == alone or text.startswith(" ") else [alone, spaced]

    def _image_token_ids(self) -> list[int]:
        """The family's placeholder tokens that are in this vocabulary, and the processor's own image tokens."""
        vocab = self.tokenizer.get_vocab()
        names = {
            *self.family.image_tokens,
            *(getattr(self.tokenizer, a, None) for a in ("image_token", "boi_token", "eoi_token")),
        }
        return sorted(vocab[name] for name in names if isinstance(name, str) and name in vocab)

    # ------------------------------------------------------------------------------------------ batches
    def __call__(self, examples: list[dict]) -> dict:
        examples = [self.formatting_func(e) for e in examples] if self.formatting_func else list(examples)
        if examples and all(isinstance(e, dict) and "prompt" in e and "completion" in e for e in examples):
            return self._prompt_completion(examples)
        conversations = [_conversation(e, i) for i, e in enumerate(examples)]
        texts = [self._render(messages) for messages, _ in conversations]
        batch = self._process(texts, [images for _, images in conversations])
        labels = self._labels(batch)
        if self.responses is not None:
            self._mask_all_but_responses(batch["input_ids"], labels)
        batch["labels"] = labels
        return self._truncated(batch)

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _process(self, texts: list[str], images: list[list]):
        prepared = [[self._resize(_open_image(image)) for image in row] for row in images]
        bos = self.tokenizer.bos_token
        # A template that renders BOS itself gets no second one from the tokenizer.
        add_special = not (bos and all(text.startswith(bos) for text in texts))
        kwargs = {"images": prepared} if any(prepared) else {}
        batch = self.processor(
            text=texts,
            padding=True,
            padding_side="right",
            return_tensors="pt",
            add_special_tokens=add_special,
            pad_to_multiple_of=self.pad_to_multiple_of,
            **kwargs,
        )
        for key, value in batch.items():
            if key.startswith("pixel_values") and torch.is_tensor(value) and value.is_floating_point():
                batch[key] = value.to(self.dtype)
        return batch

    def _labels(self, batch) -> torch.Tensor:
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = self.ignore_index
        if self.image_token_ids:
            labels[torch.isin(labels, torch.tensor(self.image_token_ids))] = self.ignore_index
        return labels

    def _mask_all_but_responses(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the labels of each response (after response_part, up to the next instruction_part)."""
        instructions, responses = self.responses
        for row in range(input_ids.shape[0]):
            ids = input_ids[row].tolist()
            starts = sorted(i + len(r) for r in responses for i in _find(ids, r))
            if self.last_response_only:
                starts = starts[-1:]
            keep = torch.zeros(len(ids), dtype=torch.bool)
            for start in starts:
                ends = sorted(i for pattern in instructions for i in _find(ids, pattern) if i >= start)
                keep[start : ends[0] if ends else len(ids)] = True
            if not starts:
                _say_once(
                    f"UnslothVisionDataCollator: no response_part {self.tokenizer.decode(responses[0])!r} in a "
                    "sample; all its labels are masked."
                )
            labels[row][~keep] = self.ignore_index

    def _truncated(self, batch):
        """Cut rows longer than max_seq_length, never through image tokens (right padding: columns)."""
        lengths = batch["attention_mask"].sum(dim=1)
        if int(lengths.max()) <= self.max_seq_length:
            return batch
        ids = torch.tensor(self.image_token_ids, dtype=batch["input_ids"].dtype)
        for row in range(batch["input_ids"].shape[0]):
            positions = torch.nonzero(torch.isin(batch["input_ids"][row], ids)).flatten()
            if positions.numel() and int(positions.max()) >= self.max_seq_length:
                needed = int(lengths[row])
                raise ArgumentValueError(
                    "max_seq_length",
                    self.max_seq_length,
                    f"at least {int(positions.max()) + 1} for sample {row}",
                    f"Sample {row} needs {needed} tokens and its image tokens run to position {int(positions.max())}; "
                    "cutting there would leave image features without their tokens. Raise max_seq_length (to "
                    f"{needed} to keep the whole sample), or use smaller images (resize=).",
                )
        for key in SEQUENCE_KEYS:
            if key in batch:
                batch[key] = batch[key][:, : self.max_seq_length]
        return batch

    def _prompt_completion(self, examples: list[dict]) -> dict:
        """TRL's prompt/completion format: the prompt (with its images) then the completion; with
        completion_only_loss only the completion is learned."""
        prompts, full, images = [], [], []
        for index, example in enumerate(examples):
            prompt, prompt_images = _conversation({"messages": _as_messages(example["prompt"], "user")}, index)
            completion, _ = _conversation({"messages": _as_messages(example["completion"], "assistant")}, index)
            images.append(prompt_images + list(example.get("images") or []))
            prompts.append(self._render(prompt, generation_prompt=True))
            full.append(self._render(prompt + completion))
        batch = self._process(full, images)
        labels = self._labels(batch)
        if self.completion_only_loss:
            prompt_lengths = self._process(prompts, images)["attention_mask"].sum(dim=1)
            for row, length in enumerate(prompt_lengths.tolist()):
                labels[row, :length] = self.ignore_index
        batch["labels"] = labels
        return self._truncated(batch)

    def _resize(self, image: Image.Image) -> Image.Image:
        """Downsize (LANCZOS) an image whose chosen side exceeds the target; a (w, h) target is exact."""
        if self.target_size is None:
            return image
        if isinstance(self.target_size, tuple):
            return image.resize(self.target_size, Image.LANCZOS)
        width, height = image.size
        side = {0: width, 1: height, "max": max(width, height), "min": min(width, height)}[self.resize_dimension]
        if side <= self.target_size:
            size = (width, height)
        else:
            scale = self.target_size / side
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if self.snap_to_patch_size:
            size = tuple(max(self.patch_size, round(s / self.patch_size) * self.patch_size) for s in size)
        return image if size == image.size else image.resize(size, Image.LANCZOS)


# ---------------------------------------------------------------------------------------- examples
def _conversation(example, index: int) -> tuple[list[dict], list]:
    """(messages for the chat template, the images in the order their placeholders appear)."""
    if isinstance(example, dict):
        messages = example.get("messages") or example.get("conversations")
        column = example.get("images", example.get("image"))
    else:
        messages, column = example, None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ArgumentValueError(
            f"examples[{index}]",
            type(example).__name__,
            "a dict with 'messages' (or 'conversations', or 'prompt' and 'completion'): a list of {'role', 'content'}",
        )
    images, cleaned = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for part in content or []:
            part = {k: v for k, v in part.items() if v is not None}  # Arrow fills absent keys with None
            if part.get("type") == "image":
                source = next((part[k] for k in ("image", "path", "url") if k in part), None)
                if source is not None:
                    images.append(source)
                part = {"type": "image"}
            parts.append(part)
        cleaned.append({**{k: v for k, v in message.items() if v is not None}, "content": parts})
    if column is not None and not images:
        images = list(column) if isinstance(column, (list, tuple)) else [column]
    return cleaned, images


def _as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _open_image(source) -> Image.Image:
    """A PIL image from what datasets and users pass: PIL, a path, file:// or data: URIs, bytes, {bytes|path}."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        return _open_image(data if data is not None else path)
    elif isinstance(source, (bytes, bytearray)):
        image = Image.open(io.BytesIO(source))
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith("data:image"):
            image = Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[1])))
        elif text.startswith(("http://", "https://")):
            raise ArgumentValueError(
                "image",
                text,
                "a PIL image, a local path, bytes or a data: URI",
                "fastvision does not download images; fetch them first.",
            )
        else:
            path = Path(text.removeprefix("file://")).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"image {text!r}: no such file")
            image = Image.open(path)
    else:
        raise ArgumentTypeError(
            "image", type(source).__name__, "a PIL image, a path, bytes, a data: URI or a {'bytes' | 'path'} dict"
        )
    return image.convert("RGB")


def _find(ids: list[int], pattern: list[int]) -> list[int]:
    n = len(pattern)
    return [i for i in range(len(ids) - n + 1) if n and ids[i : i + n] == pattern]


def _family(model):
    name = getattr(model, "fastvision_family", None)
    return FAMILIES[name] if name in FAMILIES else family_of(model.config)


def _target_size(resize, vision):
    if resize == "max":
        return None
    if resize == "min":
        return getattr(vision, "image_size", None) or DEFAULT_IMAGE_SIZE
    if isinstance(resize, int) and not isinstance(resize, bool) and resize > 0:
        return resize
    if isinstance(resize, (tuple, list)) and len(resize) == 2 and all(isinstance(s, int) and s > 0 for s in resize):
        return tuple(resize)
    raise ArgumentTypeError(
        "resize",
        resize,
        "'min' (the vision tower's image size), 'max' (no resize), an int > 0 or a (width, height) pair",
    )


def _patch_size(vision) -> int:
    patch = getattr(vision, "patch_size", None) or 14
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        warnings.warn(message, stacklevel=3)
