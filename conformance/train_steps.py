"""A few SFTTrainer steps of a tiny checkpoint, in one process or data-parallel under torchrun; writes the
LoRA weights. What the DDP test compares, and the README's "Several GPUs" command:

    python -m conformance.train_steps --out single --per-device-batch 4              # one process
    torchrun --nproc-per-node 2 -m conformance.train_steps --out ddp --per-device-batch 2   # DDP, 2 ranks

Both see the same global batch of 4 per step: samples are taken in order (no shuffling) and accelerate
gives rank r the r-th per-device slice of it, so with plain SGD and no dropout the two runs' LoRA weights
agree up to summation order. Each rank loads its own copy (from_pretrained derives device_map from
LOCAL_RANK) in 4-bit with "unsloth" checkpointing; on a machine without a GPU the ranks talk over gloo.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

# "unsloth" checkpointing offloads only from 512 tokens of max_seq_length on (OFFLOAD_MIN_SEQ_LENGTH);
# the zoo's prompts with one image are 40-110 tokens.
MAX_SEQ_LENGTH = 1024


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="reference", help="reference, optimized or a module path")
    parser.add_argument("--family", default="qwen2_vl", help="a zoo family")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--out", required=True, help="where the main process saves the adapter")
    return parser.parse_args(argv)


def train(args: argparse.Namespace):
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from conformance import inputs, zoo

    backend = importlib.import_module(args.backend)
    model, processor = backend.FastVisionModel.from_pretrained(
        str(zoo.checkpoint(args.family)), load_in_4bit=True, max_seq_length=MAX_SEQ_LENGTH,
        use_gradient_checkpointing="unsloth",
    )
    model = backend.FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0, random_state=3407)
    backend.FastVisionModel.for_training(model)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # bf16 autocast (SFTConfig's default) only on a GPU: on the CPU the model computes in fp32, and under
    # CPU bf16 autocast a batch split over 2 ranks rounds differently from the whole batch (0.4% of an update).
    on_gpu = torch.cuda.is_available()
    trainer = SFTTrainer(
        model=model,
        processing_class=processor,
        data_collator=backend.UnslothVisionDataCollator(model, processor),
        train_dataset=Dataset.from_list(inputs.captioned_conversations(args.steps * args.per_device_batch * world)),
        args=SFTConfig(
            output_dir=str(Path(args.out) / "trainer"), max_steps=args.steps,
            per_device_train_batch_size=args.per_device_batch, learning_rate=args.learning_rate,
            optim="sgd", lr_scheduler_type="constant", warmup_steps=0, seed=3407, data_seed=3407,
            train_sampling_strategy="sequential", logging_steps=1, report_to="none", save_strategy="no",
            remove_unused_columns=False, dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True},
            max_length=MAX_SEQ_LENGTH, use_cpu=not on_gpu, bf16=on_gpu, disable_tqdm=True,
        ),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        model.save_pretrained(args.out)
        notes = "; ".join(model.quantization_plan.notes) or "none"
        print(f"saved the adapter to {args.out} (world size {world}); load notes: {notes}", flush=True)
    # Under torchrun: every rank waits for rank 0's save, then the process group is destroyed before exit.
    # Left to interpreter shutdown, a gloo rank once aborted there ("terminate called without an active
    # exception", exit -6) after training and saving had finished.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return trainer


def main(argv=None) -> int:
    train(parse(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
