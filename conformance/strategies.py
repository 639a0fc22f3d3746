"""Hypothesis strategies of the conformance suite: load kwargs (first section), attention specs (last)."""

from __future__ import annotations

# ======================================================================================= load kwargs
# Draws of `from_pretrained` keyword arguments: valid ones, where a default passed explicitly must
# behave as one left out (array-api-tests' `specified_kwargs`/KVD idiom), and invalid ones for every
# argument with the builtin errors docs/contract.md allows. Defaults and accepted values are docs/contract.md's.
import typing  # noqa: E402

import torch  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class KVD(typing.NamedTuple):
    keyword: str
    value: typing.Any
    default: typing.Any


def _is_default(value, default) -> bool:
    # `1 == True` and `1.0 == 1`: a value only counts as the default when its type matches too.
    return type(value) is type(default) and value == default


@st.composite
def specified_kwargs(draw, *keys_values_defaults: KVD) -> dict:
    """Keyword arguments where a value equal to its default is randomly left out, so "passed
    explicitly" and "left out" must behave the same (array-api-tests' hypothesis_helpers)."""
    kw = {}
    for keyword, value, default in keys_values_defaults:
        if not _is_default(value, default) or draw(st.booleans()):
            kw[keyword] = value
    return kw


# docs/contract.md's defaults of the arguments drawn here.
DEFAULTS = {
    "max_seq_length": 2048, "dtype": None, "load_in_4bit": True, "load_in_8bit": False, "load_in_16bit": False,
    "full_finetuning": False, "device_map": "sequential", "trust_remote_code": False,
    "use_gradient_checkpointing": "unsloth", "supports_sdpa": True, "float32_mixed_precision": None,
    "gpu_memory_utilization": 0.5, "float8_kv_cache": False, "random_state": 3407, "max_lora_rank": 64,
    "disable_log_stats": False, "unsloth_vllm_standby": False,
}


def _kvd(keyword: str, value) -> KVD:
    return KVD(keyword, value, DEFAULTS[keyword])

# docs/contract.md's dtype names; None is resolved per device.
DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32,
}


TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
dtypes = st.sampled_from((None, *TORCH_DTYPES, *DTYPE_NAMES))

# 511/512: the boundary of docs/contract.md's "unsloth" checkpointing rule (< 512 is plain checkpointing).
max_seq_lengths = st.one_of(st.sampled_from((1, 255, 511, 512, 513, 2048)), st.integers(1, 2**20))
checkpointing_values = st.sampled_from((True, False, "unsloth"))

# The three load flags of each mode; "16bit" also as "every flag False" (docs/contract.md: "None True and
# not full finetuning: 16-bit"). load_in_4bit defaults to True, so every other mode passes it False.
MODE_FLAGS = {
    "4bit": (True, False, False),
    "8bit": (False, True, False),
    "16bit": (False, False, True),
    "16bit (no flag)": (False, False, False),
}


def resolved_mode(kwargs: dict) -> str:
    """"4bit", "8bit", "16bit" or "full", as docs/contract.md resolves the load flags."""
    if kwargs.get("full_finetuning", False):
        return "full"
    if kwargs.get("load_in_4bit", True):
        return "4bit"
    return "8bit" if kwargs.get("load_in_8bit", False) else "16bit"


def device_maps(device: str):
    """device_map values that all place a whole tiny model on `device`."""
    if device == "cuda":
        return st.sampled_from(("sequential", "auto", "balanced", "cuda", "cuda:0", {"": 0}))
    return st.sampled_from(("sequential", "auto", "balanced", "cpu", {"": "cpu"}))


@st.composite
def load_kwargs(draw, device: str = "cpu", modes=tuple(MODE_FLAGS)) -> dict:
    """Valid keyword arguments of one load (model_name aside), defaults randomly left out. vLLM-only
    arguments are drawn too: docs/contract.md validates them always and uses them only with fast_inference."""
    flags = MODE_FLAGS[draw(st.sampled_from(modes))]
    kvds = [
        _kvd("load_in_4bit", flags[0]),
        _kvd("load_in_8bit", flags[1]),
        _kvd("load_in_16bit", flags[2]),
        _kvd("full_finetuning", draw(st.booleans())),
        _kvd("dtype", draw(dtypes)),
        _kvd("max_seq_length", draw(max_seq_lengths)),
        _kvd("use_gradient_checkpointing", draw(checkpointing_values)),
        _kvd("float32_mixed_precision", draw(st.sampled_from((None, True, False)))),
        _kvd("device_map", draw(device_maps(device))),
        _kvd("supports_sdpa", draw(st.booleans())),
        _kvd("trust_remote_code", draw(st.booleans())),  # the zoo needs no remote code
        _kvd("random_state", draw(st.integers(0, 2**32 - 1))),
        _kvd("gpu_memory_utilization", draw(st.floats(0, 1, exclude_min=True))),
        _kvd("float8_kv_cache", draw(st.booleans())),
        _kvd("max_lora_rank", draw(st.integers(1, 1024))),
        _kvd("disable_log_stats", draw(st.booleans())),
        _kvd("unsloth_vllm_standby", draw(st.booleans())),
    ]
    return draw(specified_kwargs(*kvds))


@st.composite
def harmless_kwargs(draw, exclude: typing.Iterable[str] = ()) -> dict:
    """A few valid arguments that change nothing a validation depends on; drawn beside an invalid one
    to show it is rejected whatever else is passed."""
    kvds = [
        _kvd("dtype", draw(dtypes)),
        _kvd("max_seq_length", draw(max_seq_lengths)),
        _kvd("use_gradient_checkpointing", draw(checkpointing_values)),
        _kvd("random_state", draw(st.integers(0, 2**32 - 1))),
        _kvd("supports_sdpa", draw(st.booleans())),
    ]
    return draw(specified_kwargs(*(k for k in kvds if k.keyword not in set(exclude))))


class Invalid(typing.NamedTuple):
    values: typing.Any  # a strategy of values docs/contract.md does not accept
    errors: tuple[type[BaseException], ...]  # the builtins a rejection may be an instance of


_ARGUMENT_ERRORS = (TypeError, ValueError)  # docs/contract.md names no narrower builtin for these rows
_junk = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=6), st.lists(st.integers(), max_size=2))
_not_bool = _junk.filter(lambda v: not isinstance(v, bool))
_not_int = st.one_of(st.none(), st.floats(), st.text(max_size=6), st.lists(st.integers(), max_size=2))


def _not_a_dtype_name(text: str) -> bool:
    # "half" and "float" are torch's aliases, but docs/contract.md lists the six names only.
    return text not in DTYPE_NAMES


_BOOL_ARGUMENTS = (
    "load_in_4bit", "load_in_8bit", "load_in_16bit", "full_finetuning", "trust_remote_code", "supports_sdpa",
    "offload_embedding", "fast_inference", "float8_kv_cache", "disable_log_stats", "unsloth_vllm_standby",
)

INVALID: dict[str, Invalid] = {
    **{name: Invalid(_not_bool, _ARGUMENT_ERRORS) for name in _BOOL_ARGUMENTS},
    "model_name": Invalid(st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.text(max_size=3), max_size=2)),
                          _ARGUMENT_ERRORS),
    "max_seq_length": Invalid(st.one_of(st.integers(max_value=0), _not_int), _ARGUMENT_ERRORS),
    "dtype": Invalid(
        st.one_of(
            st.text(max_size=10).filter(_not_a_dtype_name),
            st.sampled_from(("half", "float", "float64", "FP16", "int8", "auto")),
            st.sampled_from((torch.float64, torch.int8, torch.int32, torch.uint8, torch.complex64)),
            st.integers(), st.floats(), st.lists(st.integers(), max_size=2),
        ),
        (TypeError, ValueError),  # docs/contract.md: "Anything else: TypeError/ValueError"
    ),
    "token": Invalid(st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.text(max_size=3), max_size=2)),
                     _ARGUMENT_ERRORS),
    # Ints and None are left out: transformers accepts them, docs/contract.md does not list them; a backend
    # may pass them on.
    "device_map": Invalid(
        st.one_of(st.sampled_from(("nowhere", "gpu", "cuda:x", "balanced_high", "")), st.floats(),
                  st.lists(st.text(max_size=3), min_size=1, max_size=2)),
        _ARGUMENT_ERRORS,
    ),
    "model_types": Invalid(
        st.one_of(st.just([]), st.text(min_size=1, max_size=8), st.integers(),
                  st.lists(st.integers(), min_size=1, max_size=2)),
        _ARGUMENT_ERRORS,
    ),
    "tokenizer_name": Invalid(st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2)),
                              _ARGUMENT_ERRORS),
    # None is left out: it is Unsloth's own default (pick the auto class), which a backend may honour.
    "auto_model": Invalid(st.one_of(st.text(max_size=30), st.integers(), st.sampled_from((object, dict, int))),
                          _ARGUMENT_ERRORS),
    # 0 and 1 (and 0.0, 1.0) are left out: they compare equal to False and True, which Unsloth accepts.
    "use_gradient_checkpointing": Invalid(
        st.one_of(st.text(max_size=10).filter(lambda s: s != "unsloth"), st.none(),
                  st.integers().filter(lambda i: i not in (0, 1)), st.floats().filter(lambda f: f not in (0, 1))),
        (ValueError,),  # docs/contract.md: "Any other value: ValueError"
    ),
    "whisper_language": Invalid(st.text(max_size=8), (ValueError,)),  # docs/contract.md: "set on a VLM: ValueError"
    "whisper_task": Invalid(st.sampled_from(("transcribe", "translate", "")), (ValueError,)),
    "auto_config": Invalid(
        st.one_of(st.dictionaries(st.text(max_size=4), st.integers(), max_size=2), st.text(max_size=6), st.integers()),
        _ARGUMENT_ERRORS,
    ),
    "float32_mixed_precision": Invalid(_not_bool.filter(lambda v: v is not None), _ARGUMENT_ERRORS),
    # Booleans are left out: True == 1 lies in (0, 1].
    "gpu_memory_utilization": Invalid(
        st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True), st.just(float("nan")),
                  st.integers(max_value=0), st.integers(min_value=2), st.text(max_size=4)),
        _ARGUMENT_ERRORS,
    ),
    "max_lora_rank": Invalid(st.one_of(st.integers(max_value=0), _not_int), _ARGUMENT_ERRORS),
    "random_state": Invalid(_not_int, _ARGUMENT_ERRORS),
}


# ==================================================================================== attention specs
# Hypothesis draws of one attention call, shaped like the calls the five families make through
# transformers' attention interface, each with the spec the float64 oracle judges it by. Small on
# purpose (S <= 64, heads <= 8): the oracle is float64 on the CPU and every example runs it.
# (This section keeps its own imports: the file's load-kwargs section is written separately.)
import dataclasses  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402
from hypothesis import strategies as _st  # noqa: E402

ATTENTION_MAX_LEN = 64
ATTENTION_HEAD_DIMS = (32, 64, 72, 80, 128, 256)  # 72: SigLIP, 80: Qwen vision, 256: Gemma3
ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (query heads, KV heads). Most pairs have a group >= 2 over >= 2 distinct KV heads: only there does
# `h // group` (transformers' repeat_kv) differ from the wrong `h % Hkv`. MHA and MQA are covered too.
GQA_HEADS = ((4, 2), (6, 2), (6, 3), (8, 2), (8, 4), (2, 2), (4, 4), (3, 1), (8, 1))
VISION_HEADS = (1, 2, 4, 8)  # vision towers are plain multi-head attention


@dataclasses.dataclass(frozen=True)
class OracleSpec:
    """The fields `conformance.oracle` reads, with the meaning of `AttentionSpec`'s docstring."""

    scale: float | None = None
    causal: bool = False
    window: int | None = None
    softcap: float | None = None
    key_padding: torch.Tensor | None = None  # (B, Sk) bool, True = real key
    cu_seqlens: torch.Tensor | None = None  # (N+1,) int32
    span_ids: torch.Tensor | None = None  # (B, Sk) long, -1 outside any span
    dense_mask: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """One attention call: shapes, dtype, scale and mask structure. Its repr is a reproduction.

    q is (batch, q_heads, q_len, head_dim), k and v (batch, kv_heads, kv_len, head_dim); query i sits
    at key position i + kv_len - q_len (a decode or chunked-prefill step when q_len < kv_len).
    `padding` gives per row ("left" | "right", number of padded keys); `spans` per row the
    (start, length) of each bidirectional block (Gemma3 image tokens); `segments` the lengths of packed
    images (batch 1, q_len == kv_len, as Qwen's vision passes `cu_seqlens`).
    """

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    scale: float = 1.0
    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    padding: tuple[tuple[str, int], ...] | None = None
    spans: tuple[tuple[tuple[int, int], ...], ...] | None = None
    segments: tuple[int, ...] | None = None
    seed: int = 0

    # ------------------------------------------------------------------ tensors
    def tensors(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v drawn N(0, 1) from `seed`, in `dtype` on `device`."""
        generator = torch.Generator().manual_seed(self.seed)
        shapes = [(self.batch, self.q_heads, self.q_len, self.head_dim)]
        shapes += [(self.batch, self.kv_heads, self.kv_len, self.head_dim)] * 2
        return tuple(torch.randn(s, generator=generator).to(device=device, dtype=self.dtype) for s in shapes)

    def key_padding(self) -> torch.Tensor | None:
        """(batch, kv_len) bool, True = a real key; None without padding."""
        if self.padding is None:
            return None
        valid = torch.ones(self.batch, self.kv_len, dtype=torch.bool)
        for row, (side, count) in enumerate(self.padding):
            if side == "left":
                valid[row, :count] = False
            else:
                valid[row, self.kv_len - count :] = False
        return valid

    def span_ids(self) -> torch.Tensor | None:
        """(batch, kv_len) block index per key, -1 outside every block (transformers' block_sequence_ids)."""
        if self.spans is None:
            return None
        ids = torch.full((self.batch, self.kv_len), -1, dtype=torch.long)
        for row, blocks in enumerate(self.spans):
            for index, (start, length) in enumerate(blocks):
                ids[row, start : start + length] = index
        return ids

    def cu_seqlens(self) -> torch.Tensor | None:
        if self.segments is None:
            return None
        return torch.tensor([0, *self.segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)

    def spec(self) -> OracleSpec:
        return OracleSpec(
            scale=self.scale, causal=self.causal, window=self.window, softcap=self.softcap,
            key_padding=self.key_padding(), cu_seqlens=self.cu_seqlens(), span_ids=self.span_ids(),
        )

    # ------------------------------------------------------------------ naming
    def features(self) -> list[str]:
        """The mask and shape features this case exercises, in the words a failure report uses."""
        found = []
        if self.kv_heads == 1 and self.q_heads > 1:
            found.append(f"MQA {self.q_heads}/1")
        elif self.q_heads != self.kv_heads:
            found.append(f"GQA {self.q_heads}/{self.kv_heads}")
        if self.q_len < self.kv_len:
            found.append(f"cached keys (decode, chunked prefill): Sq={self.q_len} < Sk={self.kv_len}")
        for side in ("left", "right"):
            if any(s == side and n for s, n in self.padding or ()):
                found.append(f"{side} padding")
        if self.fully_masked_rows():
            found.append(f"{self.fully_masked_rows()} fully masked query rows")
        if self.window is not None:
            found.append(f"sliding window {self.window}")
        if self.spans is not None and any(self.spans):
            found.append("bidirectional spans")
        if self.segments is not None:
            found.append(f"packed segments {list(self.segments)}")
        if self.softcap is not None:
            found.append(f"softcap {self.softcap}")
        if not math.isclose(self.scale, self.head_dim**-0.5):
            found.append(f"scale {self.scale:.4g} != 1/sqrt({self.head_dim})")
        return found

    def allowed(self) -> torch.Tensor:
        """(batch, q_len, kv_len) bool: which (query, key) pairs attend, by the spec's definition. The
        tests check that the transformers mask composition they build says exactly this."""
        pos = (torch.arange(self.q_len) + self.kv_len - self.q_len)[None, :, None]
        key = torch.arange(self.kv_len)[None, None, :]
        ok = torch.ones(self.batch, self.q_len, self.kv_len, dtype=torch.bool)
        if self.causal:
            reach = key <= pos
            spans = self.span_ids()
            if spans is not None:
                q_span = spans[:, pos[0, :, 0]][:, :, None]
                reach = reach | ((q_span == spans[:, None, :]) & (q_span >= 0))
            ok = ok & reach
        if self.window is not None:
            ok = ok & (key > pos - self.window)
        if self.padding is not None:
            ok = ok & self.key_padding()[:, None, :]
        if self.segments is not None:
            segment = torch.repeat_interleave(torch.arange(len(self.segments)), torch.tensor(self.segments))
            ok = ok & (segment[pos[0, :, 0]][None, :, None] == segment[None, None, :])
        return ok

    def tags(self) -> list[str]:
        """Coarse feature names (no sizes), for hypothesis' statistics: `--hypothesis-show-statistics`."""
        return [str(self.dtype).removeprefix("torch.")] + [
            " ".join(word for word in feature.split() if word.isalpha()) for feature in self.features()
        ]

    def fully_masked_rows(self) -> int:
        """How many (batch, query) rows have no key to attend to."""
        return int((~self.allowed().any(dim=-1)).sum())

    def __str__(self) -> str:
        shape = f"B={self.batch} Hq/Hkv={self.q_heads}/{self.kv_heads} Sq={self.q_len} Sk={self.kv_len}"
        return f"{shape} D={self.head_dim} {str(self.dtype).removeprefix('torch.')} [{'; '.join(self.features())}]"


def _padding_rows(draw, batch: int, kv_len: int, q_len: int) -> tuple[tuple[str, int], ...] | None:
    """Per row: no padding, right padding, or left padding — often long enough to reach past the first
    query (kv_len - q_len + 1 keys or more), which leaves that row's first queries with no key at all."""
    if not draw(_st.booleans()):
        return None
    rows = []
    for _ in range(batch):
        side = draw(_st.sampled_from(("left", "left", "right", "none")))
        reach = kv_len - q_len + 1
        count = draw(_st.one_of(_st.integers(0, kv_len), _st.integers(min(reach, kv_len), kv_len)))
        rows.append(("left" if side == "none" else side, 0 if side == "none" else count))
    return tuple(rows)


def _span_rows(draw, batch: int, kv_len: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per row, up to two non-overlapping blocks, as Gemma3 marks each image's soft tokens."""
    rows = []
    for _ in range(batch):
        blocks, start = [], draw(_st.integers(0, kv_len))
        while start < kv_len and len(blocks) < 2 and draw(_st.booleans()):
            length = draw(_st.integers(1, min(16, kv_len - start)))
            blocks.append((start, length))
            start += length + draw(_st.integers(0, 4))
        rows.append(tuple(blocks))
    return tuple(rows)


def _scale(draw, head_dim: int) -> float:
    """1/sqrt(D) mostly; else another scale, as Gemma3's query_pre_attn_scalar**-0.5 (27B: 168 with
    D=128; the zoo's: 24 with D=32)."""
    return draw(_st.sampled_from((head_dim**-0.5, head_dim**-0.5, (0.75 * head_dim) ** -0.5, (2 * head_dim) ** -0.5)))


@_st.composite
def text_attention_cases(draw, *, window: bool = False, spans: bool = False, softcap: bool = True,
                         dtypes: tuple[torch.dtype, ...] = ATTENTION_DTYPES):
    """A causal language-model attention call: GQA/MQA, prefill or decode (Sq < Sk), left/right
    padding per row, and, where the family has them, a sliding window and bidirectional spans."""
    batch = draw(_st.integers(1, 3))
    q_heads, kv_heads = draw(_st.sampled_from(GQA_HEADS))
    kv_len = draw(_st.integers(1, ATTENTION_MAX_LEN))
    q_len = draw(_st.one_of(_st.just(kv_len), _st.integers(1, kv_len)))
    head_dim = draw(_st.sampled_from(ATTENTION_HEAD_DIMS))
    return AttentionCase(
        batch=batch, q_heads=q_heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
        dtype=draw(_st.sampled_from(dtypes)),
        scale=_scale(draw, head_dim),
        causal=True,
        window=draw(_st.integers(1, kv_len + 2)) if window and draw(_st.booleans()) else None,
        softcap=draw(_st.sampled_from((None, None, 2.0, 10.0))) if softcap else None,
        padding=_padding_rows(draw, batch, kv_len, q_len),
        spans=_span_rows(draw, batch, kv_len) if spans and draw(_st.booleans()) else None,
        seed=draw(_st.integers(0, 2**16)),
    )


@_st.composite
def vision_attention_cases(draw, *, packed: bool, dtypes: tuple[torch.dtype, ...] = ATTENTION_DTYPES):
    """A vision-tower attention call: bidirectional multi-head attention, either a batch of images
    (CLIP, SigLIP) or several images packed in one sequence of batch 1 (`segments`: Qwen's cu_seqlens,
    Pixtral's block-diagonal mask)."""
    heads = draw(_st.sampled_from(VISION_HEADS))
    head_dim = draw(_st.sampled_from(ATTENTION_HEAD_DIMS))
    if packed:
        segments = tuple(draw(_st.lists(_st.integers(1, 24), min_size=1, max_size=4)))
        batch, length = 1, sum(segments)
    else:
        segments, batch, length = None, draw(_st.integers(1, 3)), draw(_st.integers(1, ATTENTION_MAX_LEN))
    return AttentionCase(
        batch=batch, q_heads=heads, kv_heads=heads, q_len=length, kv_len=length, head_dim=head_dim,
        dtype=draw(_st.sampled_from(dtypes)), scale=_scale(draw, head_dim), causal=False, segments=segments,
        seed=draw(_st.integers(0, 2**16)),
    )
