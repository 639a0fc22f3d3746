"""What each `fastvision` subcommand does; `conformance.cli` imports this only once a command runs, so
`fastvision --help` and `--version` answer without importing torch or transformers."""

from __future__ import annotations

import contextlib
import importlib
import time

from conformance import zoo
from conformance.cli import MODES
from conformance.families import FAMILIES


@contextlib.contextmanager
def _step(name: str, timings: list):
    start = time.perf_counter()
    yield
    timings.append((name, time.perf_counter() - start))


def _load(model_name: str, backend_name: str, mode: str, timings: list):
    backend = importlib.import_module(backend_name)
    with _step("load", timings):
        return backend.FastVisionModel.from_pretrained(model_name, **MODES[mode])


def print_plan(model) -> None:
    plan = model.quantization_plan
    rows = [("module", "kind", "dtype", "reason"), *plan.table()]
    widths = [max(len(str(row[i])) for row in rows) for i in range(3)]
    print(f"quantization plan ({plan.mode}, decided by {plan.source}):")
    for row in rows:
        print("  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    counts = {kind: sum(1 for e in plan.entries if e.kind == kind) for kind in {e.kind for e in plan.entries}}
    print("  totals: " + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())))


def print_placement(model) -> None:
    placement = getattr(model, "device_placement", None)
    if placement is None:  # a backend that does not record it
        return
    rows = [("module", "device", "part"), *((m or "(whole model)", d, p) for m, d, p in placement.table())]
    width = max(len(row[0]) for row in rows)
    print("placement (accelerate's device map):")
    for module, device, part in rows:
        print(f"  {module.ljust(width)}  {device.ljust(6)}  {part}")
    for note in placement.notes:
        print(f"  note: {note}")


def print_memory(model) -> None:
    footprint = model.get_memory_footprint()
    devices = sorted({str(p.device) for p in model.parameters()})
    print(f"model memory: {footprint / 2**20:.2f} MiB on {', '.join(devices)} (backend {model.fastvision_backend})")


def _print_timings(timings: list) -> None:
    print("timings: " + ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in timings))


def demo(args) -> int:
    if args.train:
        from conformance import train_demo

        result = train_demo.run(args.backend, args.family, steps=args.steps, out_dir=args.out,
                                max_new_tokens=args.max_new_tokens)
        losses, answers = result["losses"], result["answers"]
        right = sum(colour in answer for colour, answer in zip(_colours_of_unseen(), answers))
        print(f"loss: {losses[0]:.3f} at the first step, {losses[-1]:.3f} at step {len(losses)}; "
              f"colours named right: {right} of {len(answers)}")
        if args.model is not None:
            print("note: --train fine-tunes the family's tiny checkpoint; --model is not used")
        return 0
    timings: list = []
    model_name = args.model
    if model_name is None:
        with _step("build tiny checkpoint", timings):
            model_name = str(zoo.checkpoint(args.family))
    model, processor = _load(model_name, args.backend, args.mode, timings)
    print_plan(model)
    print_memory(model)
    prompt = "What is in this image?"
    with _step("process", timings):
        inputs = processor(
            text=[_chat(processor, prompt)], images=[[zoo.sample_image()]], return_tensors="pt", padding=True
        ).to(model.device)
    with _step("generate", timings):
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    print(f"user: {prompt} [with a generated {zoo.sample_image().size[0]}x{zoo.sample_image().size[1]} image]")
    print(f"model: {answer!r}" + (" (random tiny weights: the words mean nothing)" if args.model is None else ""))
    _print_timings(timings)
    return 0


def _colours_of_unseen() -> list[str]:
    from conformance import inputs, train_demo

    names = list(inputs.COLOURS)
    return [names[i % len(names)] for i in range(train_demo.UNSEEN, train_demo.UNSEEN + len(names))]


def _chat(processor, prompt: str) -> str:
    return processor.apply_chat_template(zoo.sample_conversation(prompt), add_generation_prompt=True, tokenize=False)


def inspect_model(args) -> int:
    timings: list = []
    model, _ = _load(args.model, args.backend, args.mode, timings)
    print(f"{args.model}: {type(model).__name__}, family {model.fastvision_family}")
    family = FAMILIES[model.fastvision_family]
    print(
        f"  attention served by {model.config._attn_implementation}: vision {family.vision_attention_class}, "
        f"text {family.text_attention_class}"
    )
    print_plan(model)
    print_placement(model)
    if args.lora:
        with _step("get_peft_model", timings):
            model = importlib.import_module(args.backend).FastVisionModel.get_peft_model(model)
        print_lora_plan(model)
    print_memory(model)
    _print_timings(timings)
    return 0


def print_lora_plan(model) -> None:
    plan = model.lora_plan
    rows = [("module", "kind", "reason"), *plan.table()]
    width = max(len(row[0]) for row in rows)
    print(f"LoRA plan (get_peft_model defaults: r={plan.r}, lora_alpha={plan.lora_alpha}):")
    for module, kind, reason in rows:
        print(f"  {module.ljust(width)}  {kind.ljust(6)}  {reason}")
    print(f"  totals: lora {len(plan.targets())}, frozen {len(plan.entries) - len(plan.targets())}")


def conformance(args) -> int:
    from conformance.runner import run_conformance

    workers = ["-n", str(args.workers)] if args.workers > 1 else []  # pytest-xdist
    return run_conformance(args.backend, device=args.device, junit=args.junit, json_path=args.json, extra_args=workers,
                           profile=args.profile)


def build_zoo(args) -> int:
    for family in [args.family] if args.family else zoo.FAMILIES:
        print(f"{family}: {zoo.checkpoint(family)}")
    return 0




def audit(args) -> int:
    """`fastvision audit`: exit 0 clean, 1 a layer breaks the rule or the baseline gate, 2 a usage error."""
    import torch

    from conformance import audit as audits

    baseline = None
    if args.baseline:
        try:
            baseline = audits.AuditReport.from_json(args.baseline)
        except (OSError, ValueError) as error:  # SchemaError is a ValueError
            print(f"fastvision audit: --baseline {args.baseline}: {error}")
            return 2
    model = args.model or str(zoo.checkpoint(args.family))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    report = audits.audit(model, args.backend, dtype=dtype, load_in_4bit=args.mode == "4bit", seed=args.seed,
                          device=args.device, progress=lambda line: print(f"... {line}", flush=True))
    print(audits.table(report))
    if args.json:
        report.to_json(args.json)
        print(f"report: {args.json}")
    if args.plot:
        audits.plot(report, args.plot)
        print(f"plot: {args.plot}")
    failed = report.first_break is not None
    if failed:
        print(f"FAIL: {report.first_break} is the first layer past the kernel rule")
    if baseline is not None:
        problems = report.compared_with(baseline, args.max_growth)
        for problem in problems:
            print(f"FAIL against {args.baseline}: {problem}")
        failed = failed or bool(problems)
    return 1 if failed else 0
