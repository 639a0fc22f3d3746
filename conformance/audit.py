"""Numerical regression audits: where, layer by layer, a backend departs from transformers, and by how much.

    report = audit("path/or/hub-id", "optimized", dtype=torch.bfloat16, device="cuda")
    report.to_json("audit.json"); report.first_break  # the first layer past the kernel rule, or None

One fixed, seeded batch (two chat prompts of different lengths, left-padded, with images of different
sizes; the long prompt runs past a sliding window where the model has one) goes through three models of
the same checkpoint: the backend's; the judge, transformers' model in float64 on the CPU (SDPA's math
kernel: transformers' eager path gives NaN at padded rows in float64) or its eager model in float32 on a
GPU; and the yardstick, transformers' eager model in the backend's dtype. Forward hooks on every vision
block, the projector, every decoder layer, the final norm and the logits, and the gradient at the input
embeddings of a next-token loss, give per layer: the backend's max abs error against the judge, its
relative error, SQNR in dB, the yardstick's max abs error and the ratio of the two. The kernel rule of
conformance/tolerances.py (`audit_bound`) says how far a layer may be; `first_break` names the first past it.
The judge's tensors are written to disk as they come and read back one layer at a time, so no more than
one layer's captures sit in memory.

Report schema (`SCHEMA_VERSION`), a JSON object:
    schema, backend, family, versions {package: version}, device, dtype, load_in_4bit, seed,
    checkpoint_hash (sha256 over config.json and every weight file's header and size),
    inputs_hash (sha256 over the batch's tensors), plan (the quantization plan's mode and sha256),
    rows [{layer, kind, max_abs, relative, sqnr_db, yardstick_max_abs, ratio, bound, breaks}],
    first_break (a layer name or null).
A report of another schema version is refused (`SchemaError`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import pathlib
import platform
import tempfile
from collections.abc import Callable

import torch

from conformance import inputs, tolerances
from conformance.families import FAMILIES, Family

SCHEMA_VERSION = 1
KINDS = ("vision block", "projector", "decoder layer", "final norm", "logits", "input gradient")
VERSIONED = ("torch", "transformers", "triton", "peft", "bitsandbytes")


class SchemaError(ValueError):
    """A report written under another schema version."""


@dataclasses.dataclass(frozen=True)
class LayerRow:
    layer: str
    kind: str
    max_abs: float
    relative: float
    sqnr_db: float
    yardstick_max_abs: float
    ratio: float
    bound: float
    breaks: bool


@dataclasses.dataclass(frozen=True)
class AuditReport:
    backend: str
    family: str
    versions: dict
    device: str
    dtype: str
    load_in_4bit: bool
    seed: int
    checkpoint_hash: str
    inputs_hash: str
    plan: dict
    rows: tuple[LayerRow, ...]
    schema: int = SCHEMA_VERSION

    @property
    def first_break(self) -> str | None:
        return next((row.layer for row in self.rows if row.breaks), None)

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "first_break": self.first_break,
        }

    def to_json(self, path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_json(cls, path) -> AuditReport:
        data = json.loads(pathlib.Path(path).read_text())
        if data.get("schema") != SCHEMA_VERSION:
            raise SchemaError(
                f"{path}: an audit report of schema {data.get('schema')!r}; this fastvision reads "
                f"schema {SCHEMA_VERSION}. Run the audit again to write a current report."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        rows = tuple(LayerRow(**row) for row in data["rows"])
        return cls(**{k: v for k, v in data.items() if k in fields and k != "rows"}, rows=rows)

    def compared_with(self, baseline: AuditReport, max_growth: float) -> list[str]:
        """What differs from `baseline` that should fail a gate: inputs, checkpoint, plan, layers, or a
        layer whose error grew by more than `max_growth` (`tolerances.audit_grew`)."""
        problems = [
            f"{what} differ from the baseline's"
            for what, mine, theirs in (
                ("the inputs", self.inputs_hash, baseline.inputs_hash),
                ("the checkpoint's weights", self.checkpoint_hash, baseline.checkpoint_hash),
                ("the quantization plan", self.plan, baseline.plan),
                ("the layers", [r.layer for r in self.rows], [r.layer for r in baseline.rows]),
            )
            if mine != theirs
        ]
        if problems:
            return problems
        for row, old in zip(self.rows, baseline.rows):
            if tolerances.audit_grew(row.max_abs, old.max_abs, row.yardstick_max_abs, max_growth):
                problems.append(
                    f"{row.layer}: error {row.max_abs:.3g} grew {row.max_abs / max(old.max_abs, 1e-300):.1f}x "
                    f"from the baseline's {old.max_abs:.3g} (allowed {max_growth}x)"
                )
        return problems


# ------------------------------------------------------------------------------------------- the run
def audit(
    model_or_dir,
    backend: str,
    *,
    dtype: torch.dtype | None = None,
    load_in_4bit: bool = False,
    seed: int = 0,
    batch=None,
    device: str = "cpu",
    progress: Callable[[str], None] = print,
) -> AuditReport:
    """Audit `backend` (a module name) on a checkpoint directory or hub id; see the module docstring."""
    module = importlib.import_module(backend)
    kwargs = {"load_in_4bit": load_in_4bit, "device_map": device, "use_gradient_checkpointing": False}
    if not load_in_4bit:
        kwargs["load_in_16bit"] = True
    if dtype is not None:
        kwargs["dtype"] = dtype
    progress(f"loading {model_or_dir} with {backend}")
    model, processor = module.FastVisionModel.from_pretrained(str(model_or_dir), **kwargs)
    path = pathlib.Path(model.config._name_or_path)
    family = family_of(model.config)
    model_dtype = model.get_input_embeddings().weight.dtype
    batch = batch if batch is not None else audit_batch(processor, model.config, seed)
    judge_dtype = torch.float64 if device == "cpu" and not load_in_4bit else torch.float32
    with tempfile.TemporaryDirectory(prefix="fastvision-audit-") as scratch:
        progress(f"judge: transformers eager in {judge_dtype}")
        eager = _eager(path, judge_dtype, device, family if load_in_4bit else None)
        judge = _capture(eager, family, batch, pathlib.Path(scratch), None)
        del eager
        progress(f"yardstick: transformers eager in {model_dtype}")
        eager = _eager(path, model_dtype, device, family if load_in_4bit else None)
        yardstick = _capture(eager, family, batch, pathlib.Path(scratch), judge)
        del eager
        progress(f"backend {backend} in {model_dtype}")
        got = _capture(model, family, batch, pathlib.Path(scratch), judge)
    rows = tuple(_row(name, got[name], yardstick[name], model_dtype) for name in judge)
    plan = model.quantization_plan
    return AuditReport(
        backend=backend,
        family=family.name,
        versions=_versions(),
        device=device,
        dtype=str(model_dtype).removeprefix("torch."),
        load_in_4bit=load_in_4bit,
        seed=seed,
        checkpoint_hash=checkpoint_hash(path),
        inputs_hash=_hash_tensors(batch),
        plan={"mode": plan.mode, "sha256": hashlib.sha256(plan.to_json().encode()).hexdigest()},
        rows=rows,
    )


def family_of(config) -> Family:
    vision = getattr(getattr(config, "vision_config", None), "model_type", None)
    for family in FAMILIES.values():
        if family.model_type == config.model_type and family.vision_model_type == vision:
            return family
    raise ValueError(f"model_type {config.model_type!r} (vision {vision!r}) is no family the suite knows")


def audit_batch(processor, config, seed: int):
    """Two prompts of different lengths, left-padded, with images of two sizes; the long one is longer
    than the text model's sliding window, where it has one."""
    text_config = getattr(config, "text_config", config)
    window = getattr(text_config, "sliding_window", None) or 0
    long_prompt = inputs.PROMPTS[1]
    while len(processor.tokenizer(long_prompt)["input_ids"]) <= window + 8:
        long_prompt = f"{long_prompt} {inputs.PROMPTS[1]}"
    texts = inputs.chat_texts(processor, (inputs.PROMPTS[0], long_prompt))
    from conformance import zoo

    images = [[zoo.sample_image(seed, (96, 80))], [zoo.sample_image(seed + 1, (72, 104))]]
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def _eager(path: pathlib.Path, dtype: torch.dtype, device: str, quantized_like: Family | None):
    """transformers' eager model; with `quantized_like`, its language model in NF4 as docs/contract.md places
    it (so a 4-bit audit compares the same quantized weights, computed in `dtype`)."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    kwargs = {}
    if quantized_like is not None:
        skip = [quantized_like.vision_tower, quantized_like.projector, quantized_like.lm_head]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )
    # transformers 5.24's eager attention returns NaN at left-padded rows in float64 (3,648 NaN of the zoo's
    # qwen2_vl layer-0 output; float32 eager and float64 SDPA have none), and the NaN reaches every token
    # through the next layer's values: the float64 judge computes attention with SDPA's math kernel.
    attention = "sdpa" if dtype == torch.float64 else "eager"
    # use_kernels=False: transformers 5.25 would otherwise swap hub kernels into the judge (and fetch them on a GPU).
    model = AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation=attention, dtype=dtype, device_map=device, use_kernels=False, **kwargs
    )
    return model.eval().requires_grad_(False)


def _points(model, family: Family) -> list[tuple[str, str, torch.nn.Module]]:
    """(name, kind, module) of every place the audit looks at, in the order a forward reaches them."""
    points = [
        (f"{family.vision_layers}.{i}", "vision block", m)
        for i, m in enumerate(model.get_submodule(family.vision_layers))
    ]
    points.append((family.projector, "projector", model.get_submodule(family.projector)))
    points += [
        (f"{family.text_layers}.{i}", "decoder layer", m) for i, m in enumerate(model.get_submodule(family.text_layers))
    ]
    points.append((f"{family.language_model}.norm", "final norm", model.get_submodule(f"{family.language_model}.norm")))
    return points


def _capture(model, family: Family, batch, scratch: pathlib.Path, judge: dict | None) -> dict:
    """Run `model` on `batch`. Without `judge`: write each point's output to `scratch`, return name ->
    (kind, path). With it: compare each output, as it comes, with the judge's file; return name -> errors."""
    device = next(model.parameters()).device
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    valid = batch["attention_mask"].bool()
    found: dict = {}

    def keep(name: str, kind: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if kind in ("decoder layer", "final norm", "logits", "input gradient"):
            tensor = tensor[valid]
        if judge is None:
            file = scratch / f"{len(found):04d}.pt"
            torch.save(tensor.cpu(), file)
            found[name] = (kind, file)
        else:
            found[name] = _errors(tensor, torch.load(judge[name][1]), kind)

    handles = [
        module.register_forward_hook(lambda _m, _a, out, n=name, k=kind: keep(n, k, _first_tensor(out)))
        for name, kind, module in _points(model, family)
    ]
    leaf = []
    handles.append(
        model.get_input_embeddings().register_forward_hook(
            lambda _m, _a, out: leaf.append(out.detach().requires_grad_(True)) or leaf[-1]
        )
    )
    try:
        logits = model(**batch).logits
        keep("logits", "logits", logits)
        pairs = valid[:, 1:] & valid[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][pairs].double(), batch["input_ids"][:, 1:][pairs])
        loss.backward()
        keep("input gradient", "input gradient", leaf[0].grad)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _first_tensor(output) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)):
        return next(o for o in output if torch.is_tensor(o))
    return next(v for v in vars(output).values() if torch.is_tensor(v))  # a ModelOutput


def _errors(got: torch.Tensor, truth: torch.Tensor, kind: str) -> dict:
    got, truth = got.double().cpu(), truth.double()
    if got.shape != truth.shape:
        return {"kind": kind, "max_abs": math.inf, "relative": math.inf, "sqnr_db": -math.inf, "scale": 1.0}
    diff = got - truth
    finite = bool(torch.isfinite(got).all())
    norm = float(truth.norm()) or 1.0
    return {
        "kind": kind,
        "max_abs": float(diff.abs().max()) if finite else math.inf,
        "relative": float(diff.norm()) / norm if finite else math.inf,
        "sqnr_db": tolerances.sqnr_db(truth, got) if finite else -math.inf,
        "scale": float(truth.abs().max()) or 1.0,
    }


def _row(name: str, got: dict, yardstick: dict, dtype: torch.dtype) -> LayerRow:
    bound = tolerances.audit_bound(yardstick["max_abs"], got["scale"], dtype)
    ratio = (
        got["max_abs"] / yardstick["max_abs"]
        if yardstick["max_abs"] > 0
        else (0.0 if got["max_abs"] == 0 else math.inf)
    )
    return LayerRow(
        layer=name,
        kind=got["kind"],
        max_abs=got["max_abs"],
        relative=got["relative"],
        sqnr_db=got["sqnr_db"],
        yardstick_max_abs=yardstick["max_abs"],
        ratio=ratio,
        bound=bound,
        breaks=not got["max_abs"] <= bound,
    )


# ------------------------------------------------------------------------------------------- hashes
def checkpoint_hash(path: pathlib.Path) -> str:
    """sha256 over config.json's values less the writer's `transformers_version` stamp (the same zoo weights
    saved under transformers 5.24 and 5.25 differ only there) and, per weight file, its name, size,
    safetensors header and every byte of it up to 64 MiB (a real checkpoint's GBs are not read; its header
    and size still change with it)."""
    digest = hashlib.sha256()
    config = _unstamped(json.loads((path / "config.json").read_text()))
    digest.update(b"config.json" + json.dumps(config, sort_keys=True).encode())
    for file in sorted(path.glob("*.safetensors")):
        digest.update(file.name.encode())
        digest.update(str(file.stat().st_size).encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(64 << 20))
    return digest.hexdigest()


def _unstamped(config):
    if isinstance(config, dict):
        return {k: _unstamped(v) for k, v in config.items() if k != "transformers_version"}
    return config


def _hash_tensors(batch) -> str:
    digest = hashlib.sha256()
    for key in sorted(batch):
        value = batch[key]
        if torch.is_tensor(value):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - an optional package
            found[name] = None
    return found


# ------------------------------------------------------------------------------------------ output
def table(report: AuditReport) -> str:
    """One row a layer; the worst (largest error over its bound) marked."""
    worst = max(range(len(report.rows)), key=lambda i: report.rows[i].max_abs / max(report.rows[i].bound, 1e-300))
    header = ("layer", "kind", "max abs", "relative", "SQNR dB", "yardstick", "ratio", "bound", "")
    cells = [header] + [
        (
            r.layer,
            r.kind,
            f"{r.max_abs:.3g}",
            f"{r.relative:.3g}",
            f"{r.sqnr_db:.1f}",
            f"{r.yardstick_max_abs:.3g}",
            f"{r.ratio:.2f}",
            f"{r.bound:.3g}",
            ("BREAKS " if r.breaks else "") + ("<- worst" if i == worst else ""),
        )
        for i, r in enumerate(report.rows)
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    title = (
        f"audit of {report.backend} on {report.family} ({report.dtype}, {'4-bit' if report.load_in_4bit else '16-bit'},"
        f" {report.device}): first layer past the kernel rule: {report.first_break or 'none'}"
    )
    return "\n".join([title, *lines])


def plot(report: AuditReport, path) -> None:
    """A PNG: per layer, the backend's and the yardstick's max abs error and the rule's bound, log scale."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("fastvision audit --plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    short = {"vision block": "vision", "decoder layer": "text"}
    names = [f"{short[r.kind]} {r.layer.rsplit('.', 1)[-1]}" if r.kind in short else r.kind for r in report.rows]
    x = list(range(len(report.rows)))
    figure, axes = pyplot.subplots(figsize=(max(6, 0.5 * len(x)), 4))
    tiny = 1e-300  # log scale: an exact 0 is drawn at the axis floor
    axes.plot(x, [max(r.max_abs, tiny) for r in report.rows], "o-", label=f"{report.backend}")
    axes.plot(
        x, [max(r.yardstick_max_abs, tiny) for r in report.rows], "s--", label=f"transformers eager, {report.dtype}"
    )
    axes.plot(x, [r.bound for r in report.rows], "k:", label="kernel-rule bound")
    for i, row in enumerate(report.rows):
        if row.breaks:
            axes.plot([i], [max(row.max_abs, tiny)], "rx", markersize=12)
    axes.set_yscale("log")
    axes.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    axes.set_ylabel("max abs error vs the judge")
    axes.set_title(f"{report.family}: {report.backend} vs transformers, {report.dtype}", fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
