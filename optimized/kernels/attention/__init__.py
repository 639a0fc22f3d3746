"""Flash attention in Triton for every `AttentionSpec`: the twin of `reference/ops/attention.py`.

The mask is never a tensor here. Each query row i (at key position pos = i + Sk - Sq) attends to a key
interval [lo, hi) built from the spec's structure -- padding [first, last + 1) of its batch row, its
packed segment, the window, causality -- plus two per-key refinements a tile applies when it straddles a
boundary: key padding with holes, and Gemma3 bidirectional spans (a causal row also sees the keys of
its own span). From the rows' intervals each program derives which key tiles to visit at all (the rest
are skipped), which of them every row attends fully (no mask arithmetic) and which need the per-pair
mask. The same bounds, read from the key side, drive the dK/dV kernel.

Forward is FlashAttention-2 (online softmax in base 2, one program per (batch * query head, query tile));
backward recomputes the probabilities from the saved log-sum-exp in two deterministic kernels: dQ (one
program per query tile; it also writes delta = rowsum(dO * O)), then dK/dV (one program per key tile of a
KV head, looping over the query heads of its GQA group, so K/V are never repeated). A head dim that is not
a power of two runs as two power-of-two column parts (80 = 64 + 16) instead of being padded. A dense spec
(causal or full, nothing else: a text model's unpadded batch) runs leaner kernels that read their tiles
through TMA descriptors. After a shape's first call, launches skip Triton's dispatch
(`optimized.kernels.launch`), and a repeated call signature goes straight to its recorded launches.

The package follows the Triton tutorial's order, one seam a module:
  masks.py           mask structure and tile I/O, the @triton.jit helpers every kernel shares
  forward.py         the general forward kernel          forward_dense.py   the dense forward kernel
  backward.py        the general dQ and dK/dV kernels    backward_dense.py  the dense dQ and dK/dV kernels
  plans.py           tile plans (Tiles, TilePlan, default_plan) and the head-dim split
  route.py           dense or general: decided once per call (route, Route.for_backward)
  lowering.py        the spec lowered to the kernels' arguments, input checks
  launchers.py       grids and arguments of each kernel's launch
  recorded.py        recorded launches of a repeated call signature
  function.py        the autograd Function and the public entries
"""

from optimized.kernels.attention.function import attention, attention_forward, attention_with_plan, kernel_thunk
from optimized.kernels.attention.launchers import kernels
from optimized.kernels.attention.plans import (
    PADDED_HEAD_DIMS,
    TilePlan,
    Tiles,
    default_plan,
    head_width,
    pad_head_dims,
    short_segments,
)
from optimized.kernels.attention.route import Route, folds_scale, route, uses_dense_backward, uses_dense_kernel

__all__ = [
    "PADDED_HEAD_DIMS", "Route", "TilePlan", "Tiles", "attention", "attention_forward", "attention_with_plan",
    "default_plan", "folds_scale", "head_width", "kernel_thunk", "kernels", "pad_head_dims", "route",
    "short_segments", "uses_dense_backward", "uses_dense_kernel",
]
