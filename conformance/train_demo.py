"""`fastvision demo --train`: Unsloth's vision notebook, end to end, on a tiny offline checkpoint.

Load in 4-bit with "unsloth" checkpointing, attach LoRA (`get_peft_model`), fine-tune with TRL's
`SFTTrainer` and the backend's `UnslothVisionDataCollator` on generated image/caption pairs (a coloured
square, captioned with its colour), save the adapter, reload it through `from_pretrained` and generate.
The tiny model starts from random weights; after the default 300 steps it answers in the caption's form
about squares it never saw, and names some of their colours.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from pathlib import Path

from conformance import inputs, zoo

MAX_SEQ_LENGTH = 1024  # the zoo's prompts with one image are 40-110 tokens
UNSEEN = 10_000  # captioned_image indices past every training sample


def run(backend_name: str, family: str, *, steps: int, out_dir: str | None, max_new_tokens: int) -> dict:
    """Train, save, reload, generate; returns the losses, the adapter directory and the answer."""
    try:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
    except ImportError as error:
        missing = f"fastvision demo --train needs TRL and datasets: pip install trl datasets ({error})"
        raise SystemExit(missing) from None
    backend = importlib.import_module(backend_name)
    model, processor = backend.FastVisionModel.from_pretrained(
        str(zoo.checkpoint(family)),
        load_in_4bit=True,
        max_seq_length=MAX_SEQ_LENGTH,
        use_gradient_checkpointing="unsloth",
    )
    model = backend.FastVisionModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, random_state=3407)
    print(
        f"LoRA on {len(model.lora_plan.targets())} linear layers; trainable parameters: "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}"
    )
    out = Path(out_dir or tempfile.mkdtemp(prefix=f"fastvision-{family}-"))
    backend.FastVisionModel.for_training(model)
    trainer = SFTTrainer(
        model=model,
        processing_class=processor,
        data_collator=backend.UnslothVisionDataCollator(model, processor),
        train_dataset=Dataset.from_list(inputs.captioned_conversations(2 * steps)),
        args=SFTConfig(
            output_dir=str(out / "trainer"),
            max_steps=steps,
            per_device_train_batch_size=2,
            learning_rate=5e-3,
            warmup_steps=0,
            logging_steps=1,
            optim="adamw_torch",
            seed=3407,
            report_to="none",
            save_strategy="no",
            remove_unused_columns=False,
            dataset_text_field="",
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=MAX_SEQ_LENGTH,
            use_cpu=not _on_gpu(model),
        ),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    adapter = out / "lora"
    model.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    print(f"saved the adapter to {adapter}")
    answers = _generate_after_reload(backend, adapter, max_new_tokens)
    return {"losses": losses, "adapter": str(adapter), "answers": answers}


def _on_gpu(model) -> bool:
    return any(p.device.type == "cuda" for p in model.parameters())


def _generate_after_reload(backend, adapter: Path, max_new_tokens: int) -> list[str]:
    """Reload the saved adapter and caption one unseen image of each colour."""
    start = time.perf_counter()
    model, processor = backend.FastVisionModel.from_pretrained(str(adapter), load_in_4bit=True)
    backend.FastVisionModel.for_inference(model)
    print(f"reloaded the adapter with from_pretrained in {time.perf_counter() - start:.1f} s")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": inputs.CAPTION_PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answers = []
    for index in range(UNSEEN, UNSEEN + len(inputs.COLOURS)):
        image, caption = inputs.captioned_image(index)
        batch = processor(text=[text], images=[[image]], return_tensors="pt").to(model.device)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        answer = processor.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        print(f"user: {inputs.CAPTION_PROMPT} [an unseen image captioned {caption!r}]  model: {answer!r}")
        answers.append(answer)
    return answers
