"""Plugging an attention op into transformers: one mask builder, one attention function per backend.

transformers builds masks through `AttentionMaskInterface` by composing small mask functions
(`causal_mask_function`, `sliding_window_overlay(W)`, `blockwise_overlay(ids)`, a padding mask) and
evaluating them into an S x S tensor. Our mask builder reads that composition instead and returns an
`AttentionSpec` — structure a kernel can use tile by tile. A composition it does not recognise is
evaluated densely by transformers' own `sdpa_mask` and carried as `dense_mask`, so an unknown pattern
is slow, never wrong. Both backends register through here; they differ only in the op they pass.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable

import torch

from reference.ops.attention import AttentionSpec
from reference.shared_state import SharedChange, mapping_entry, together


class _Unrecognised(Exception):
    """A mask function whose structure we cannot read; the caller falls back to a dense mask."""


def _nonlocals(fn) -> dict:
    return inspect.getclosurevars(fn).nonlocals if getattr(fn, "__closure__", None) else {}


def _factory_of(fn) -> str:
    """`sliding_window_overlay.<locals>.inner_mask` -> `sliding_window_overlay`."""
    return fn.__qualname__.split(".<locals>")[0] if "<locals>" in fn.__qualname__ else fn.__qualname__


def _read(fn) -> dict:
    """The structure of a transformers mask function as {causal, window, spans, always}; raises
    _Unrecognised for anything else."""
    from transformers import masking_utils  # imported with the first mask: it imports torch._dynamo

    if fn is masking_utils.causal_mask_function:
        return {"causal": True}
    if fn is masking_utils.bidirectional_mask_function:
        return {"always": True}
    factory, captured = _factory_of(fn), _nonlocals(fn)
    if factory == "sliding_window_overlay":
        return {"window": int(captured["sliding_window"])}
    if factory == "blockwise_overlay":
        return {"spans": captured["block_sequence_ids"]}
    if factory == "token_type_ids_mask_function" and captured.get("image_group_ids") is not None:
        # Gemma3 before `blockwise_overlay` (transformers < 5.20): image tokens (type 1) of one group.
        return {"spans": torch.where(captured["token_type_ids"] == 1, captured["image_group_ids"], -1)}
    if factory == "and_masks":
        return _read_and([_read(f) for f in captured["mask_functions"]])
    if factory == "or_masks":
        return _read_or([_read(f) for f in captured["mask_functions"]])
    raise _Unrecognised(fn.__qualname__)


def _read_and(parts: list[dict]) -> dict:
    merged: dict = {}
    for part in parts:
        if "window" in part and "window" in merged:
            part = {**part, "window": min(part["window"], merged["window"])}
        if part.get("always"):
            part = {k: v for k, v in part.items() if k != "always"}
        merged.update(part)
    if not merged.get("causal") and "spans" in merged:
        raise _Unrecognised("spans without a causal base")
    return merged or {"always": True}


def _read_or(parts: list[dict]) -> dict:
    """Supported unions: causal | spans (Gemma3 image tokens), (causal & window) | spans (older Gemma3
    sliding layers), and anything | always (bidirectional)."""
    if any(p == {"always": True} for p in parts):
        return {"always": True}
    spans = [p for p in parts if set(p) == {"spans"}]
    base = [p for p in parts if set(p) != {"spans"}]
    if len(parts) == 2 and len(spans) == 1 and base[0] == {"causal": True}:
        return {"causal": True, "spans": spans[0]["spans"]}
    if len(parts) == 2 and len(spans) == 1 and set(base[0]) == {"causal", "window"}:
        # Here the window does not clip the spans; the spec's window does. Equal while no span is
        # longer than the window, which _spec_from_structure checks.
        return {**base[0], "spans": spans[0]["spans"], "spans_unclipped": True}
    if len(parts) == 2 and {"causal": True} in parts:
        other = next(p for p in parts if p != {"causal": True})
        if other.get("causal") and set(other) <= {"causal", "spans"}:
            return other
    raise _Unrecognised("union")


def _sizes(kwargs) -> tuple[int, int, int, int]:
    """(q_length, kv_length, q_offset, kv_offset) from either mask-builder calling convention
    (transformers >= 5.20 passes q_length/q_offset; earlier versions pass cache_position)."""
    kv_length, kv_offset = int(kwargs["kv_length"]), int(kwargs.get("kv_offset", 0))
    if "q_length" in kwargs:
        return int(kwargs["q_length"]), kv_length, int(kwargs.get("q_offset", 0)), kv_offset
    cache_position = kwargs["cache_position"]
    return cache_position.shape[0], kv_length, int(cache_position[0]), kv_offset


def _spec_from_structure(structure: dict, kwargs) -> AttentionSpec:

    from transformers import masking_utils  # imported with the first mask: it imports torch._dynamo
    q_length, kv_length, q_offset, kv_offset = _sizes(kwargs)
    if q_offset - kv_offset != kv_length - q_length:  # queries not bottom-right aligned (e.g. a static cache)
        raise _Unrecognised("offsets")
    padding = masking_utils.prepare_padding_mask(kwargs.get("attention_mask"), kv_length, kv_offset)
    key_padding = None
    if padding is not None:
        key_padding = padding[:, kv_offset : kv_offset + kv_length].bool()
        if bool(key_padding.all()):
            key_padding = None
    spans = structure.get("spans")
    if spans is not None:
        spans = masking_utils.maybe_pad_block_sequence_ids(spans, None, kv_length, kv_offset)
        spans = spans[:, kv_offset : kv_offset + kv_length]
        if structure.get("spans_unclipped") and _longest_span(spans) > structure["window"]:
            raise _Unrecognised("a span longer than the sliding window it is not clipped by")
    return AttentionSpec(
        causal=bool(structure.get("causal")), window=structure.get("window"), key_padding=key_padding, span_ids=spans
    )


def _longest_span(span_ids: torch.Tensor) -> int:
    """Most positions sharing one span id in one row (one host sync per mask build, not per layer)."""
    rows = torch.arange(span_ids.shape[0], device=span_ids.device)[:, None] * (span_ids.shape[1] + 1)
    keys = (rows + span_ids + 1)[span_ids >= 0]
    return int(torch.bincount(keys).max()) if keys.numel() else 0


def build_mask_spec(*args, **kwargs) -> AttentionSpec:
    """Our `AttentionMaskInterface` entry: transformers' mask arguments -> an AttentionSpec. A mask the
    reader cannot take apart is evaluated densely by transformers itself: quietly for a composition it
    does not know, with one warning when reading failed (a renamed captured variable, a changed closure
    in a new transformers), so a forward is never broken by the reader."""
    from transformers import masking_utils  # imported with the first mask: it imports torch._dynamo

    try:
        return _spec_from_structure(_read(kwargs["mask_function"]), kwargs)
    except _Unrecognised:
        pass
    except Exception as error:  # noqa: BLE001 - the reader looks inside transformers' closures
        function = getattr(kwargs.get("mask_function"), "__qualname__", "?")
        _warn_reader_failed(function, f"{type(error).__name__}: {error}")
    kwargs = {**kwargs, "allow_is_causal_skip": False}
    dense = masking_utils.sdpa_mask(*args, **kwargs)
    return AttentionSpec(dense_mask=dense)


@functools.cache
def _warn_reader_failed(mask_function: str, error: str) -> None:
    warnings.warn(
        f"fastvision could not read the structure of transformers' mask function {mask_function} ({error}); "
        "its attention uses the dense mask transformers builds instead (correct, but slower and with more "
        "memory). Please report this with your transformers version.",
        RuntimeWarning,
        stacklevel=3,
    )


def _spec_from_tensor(mask: torch.Tensor, key_length: int) -> AttentionSpec:
    """A mask a model built itself (Pixtral's block-diagonal float mask): boolean, True = attend."""
    mask = mask[..., :key_length]
    if mask.dtype == torch.bool:
        return AttentionSpec(dense_mask=mask)
    # Additive masks here are 0 (attend) or finfo.min (not); anything between would be a bias we drop.
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if bool(((mask != 0) & ~blocked).any()):
        raise ValueError("additive attention biases other than 0 / finfo.min are not supported")
    return AttentionSpec(dense_mask=~blocked)


def spec_for_call(module, query, key, attention_mask, scaling, kwargs) -> AttentionSpec:
    """The spec of one attention call, whatever form the model passed its mask in."""
    if isinstance(attention_mask, AttentionSpec):
        spec = attention_mask
    elif isinstance(attention_mask, torch.Tensor):
        spec = _spec_from_tensor(attention_mask, key.shape[-2])
    else:  # None: vision towers pass is_causal=False; text modules carry is_causal=True
        causal = kwargs.get("is_causal", getattr(module, "is_causal", False)) and query.shape[-2] > 1
        spec = AttentionSpec(causal=bool(causal), window=kwargs.get("sliding_window"))
    return AttentionSpec(**{**spec.__dict__, "scale": scaling, "softcap": kwargs.get("softcap")})


AttentionOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec], torch.Tensor]


def make_attention_forward(op: AttentionOp) -> Callable:
    """A transformers attention function serving every call through `op(q, k, v, spec)`."""

    def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if dropout and module.training:
            raise NotImplementedError(
                f"attention dropout={dropout} in training is not supported by fastvision's attention; set the "
                "config's attention_dropout to 0.0 (the default of every supported family)"
            )
        spec = spec_for_call(module, query, key, attention_mask, scaling, kwargs)
        out = op(query, key, value, spec)
        return out.transpose(1, 2).contiguous(), None  # transformers expects (B, Sq, H, D)

    attention_forward.fastvision_op = op
    return attention_forward


class AttentionRegistration(SharedChange):
    """`op` under `key` in transformers' attention and mask interfaces (both: with only the first,
    transformers hands the function attention_mask=None and padding is silently ignored), while a model
    holds it. transformers' public `register` has no inverse, and its mask preprocessing reads the class
    mapping itself (`_global_mapping`), so the entries are put there and taken out again directly.
    transformers' modeling and masking modules are imported at the first registration, not with
    `import reference` (masking_utils imports torch._dynamo: ~2 s on 2 cores)."""

    def __init__(self, key: str, op: AttentionOp, mask_builder: Callable = build_mask_spec):
        if "flash" in key:
            raise ValueError(f"attention key {key!r} must not contain 'flash': transformers would fetch a hub kernel")
        self.key, self.op, self.mask_builder = key, op, mask_builder
        self._entries: tuple[SharedChange, ...] | None = None
        super().__init__(f"attention key {key}", lambda: together(key, *self.entries())[0](),
                         lambda: together(key, *self.entries())[1]())

    def entries(self) -> tuple[SharedChange, ...]:
        if self._entries is None:
            from transformers import masking_utils
            from transformers.modeling_utils import AttentionInterface

            attention = mapping_entry(AttentionInterface._global_mapping, self.key, make_attention_forward(self.op),
                                      f"attention {self.key}")
            mask = mapping_entry(masking_utils.AttentionMaskInterface._global_mapping, self.key, self.mask_builder,
                                 f"mask {self.key}")
            self._entries = (attention, mask)
        return self._entries


def register(key: str, op: AttentionOp, mask_builder: Callable = build_mask_spec) -> AttentionRegistration:
    """The registration of `op` (and `mask_builder`) under `key`; registered while a model holds it."""
    return AttentionRegistration(key, op, mask_builder)
