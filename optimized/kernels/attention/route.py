"""Which kernels a call runs -- the dense ones (TMA reads, no mask structure) or the general ones -- decided
in one place. The autograd Function's forward calls `route` once and keeps the Route (on ctx, and with a
call signature's recorded launches); its backward decides its two kernels once, with `Route.for_backward`,
from that Route and the gradient. The launchers only read the Route."""

from __future__ import annotations

from typing import NamedTuple

import torch

from optimized.kernels.attention.plans import _DENSE_HEAD_DIMS
from reference.ops.attention import AttentionSpec


class Route(NamedTuple):
    """fold_scale: the general forward folds the scale into its exp2 FMA (its FOLD_SCALE; see folds_scale).
    forward_dense: the forward runs _attn_fwd_dense_kernel, else _attn_fwd_kernel.
    dq_dense, dkdv_dense: the backward runs the dense dQ, dK/dV kernels (decided by for_backward)."""

    fold_scale: bool
    forward_dense: bool
    dq_dense: bool = False
    dkdv_dense: bool = False

    def for_backward(self, grad_out: torch.Tensor, out: torch.Tensor) -> Route:
        """This route with the backward decided: dense where the forward was and TMA reads grad_out in place
        (the autograd backward clones one it cannot, see _dense_readable); dQ also reads the output, which
        has q's layout in a fresh buffer (_forward_outputs), so is readable with q."""
        dkdv = self.forward_dense and _tma_readable(grad_out)
        return self._replace(dq_dense=dkdv and _tma_readable(out), dkdv_dense=dkdv)


def route(q, k, v, spec: AttentionSpec, fold_scale: bool = True) -> Route:
    """The forward's route for q, k, v (as the kernels will read them) and `spec`; fold_scale=False keeps
    the scale out of the exp2 even where folds_scale allows it, and so takes the general kernel."""
    fold = fold_scale and folds_scale(spec, q.shape[-1])
    return Route(fold_scale=fold, forward_dense=fold and _dense_eligible(q, k, v, spec))


def folds_scale(spec: AttentionSpec, head_dim: int) -> bool:
    """Whether the forward folds the scale into its exp2 FMA (see _attn_fwd_tiles): needs max(qk * scale)
    = max(qk) * scale, so a positive scale, and raw scores (no softcap)."""
    return spec.softcap is None and spec.resolved_scale(head_dim) > 0


def _tma_readable(t: torch.Tensor) -> bool:
    """TMA reads a tensor in place from a 16-byte aligned base, a unit last stride and other strides that
    are nonzero (where the extent is over 1) 16-byte multiples."""
    size = t.element_size()
    return (t.numel() > 0 and t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(stride * size % 16 == 0 and (stride > 0 or extent == 1)
                    for stride, extent in zip(t.stride()[:-1], t.shape[:-1])))


def _dense_eligible(q, k, v, spec: AttentionSpec) -> bool:
    """The dense forward's needs besides a folded scale: a causal or full spec and nothing else, a head dim
    of _DENSE_HEAD_DIMS, 16-bit inputs on a GPU (fp32 too in the interpreter, for the CPU tests) and q, k,
    v that TMA can read in place."""
    if (spec.window is not None or spec.cu_seqlens is not None or spec.key_padding is not None
            or spec.span_ids is not None or spec.dense_mask is not None):
        return False
    dtypes = (torch.float16, torch.bfloat16) if q.is_cuda else (torch.float16, torch.bfloat16, torch.float32)
    return (q.shape[-1] in _DENSE_HEAD_DIMS and q.dtype in dtypes
            and all(_tma_readable(t) for t in (q, k, v)))


def uses_dense_kernel(q, k, v, spec: AttentionSpec) -> bool:
    """Whether the forward runs _attn_fwd_dense_kernel: a causal or full spec with a positive scale and
    nothing else, on inputs the dense kernel reads (route's forward_dense)."""
    return route(q, k, v, spec).forward_dense


def uses_dense_backward(q, k, v, grad_out, spec: AttentionSpec) -> bool:
    """Whether the backward runs the dense dQ and dK/dV kernels: uses_dense_kernel, with the output's
    gradient TMA-readable too (Route.for_backward; the output has q's layout)."""
    return route(q, k, v, spec).for_backward(grad_out, q).dkdv_dense


def _dense_readable(grad_out: torch.Tensor) -> torch.Tensor:
    """grad_out for a dense backward: a contiguous copy where TMA cannot read it in place (an expanded
    gradient of zero strides, a misaligned view), so the backward runs the kernels the plan was made for.
    A clone, since contiguous() returns a misaligned contiguous view as it is."""
    return grad_out if _tma_readable(grad_out) else grad_out.clone(memory_format=torch.contiguous_format)
