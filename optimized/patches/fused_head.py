"""The LM head and the loss as one op while training: the loss without the (tokens x vocab) logits.

A training forward with labels (`model.training`, gradients on) runs the family's own forward from
transformers, with two instance attributes switched for that call only: `lm_head` hands its input (the
final hidden states) through, and `loss_function` -- which transformers calls with what `lm_head`
returned -- computes lm_head + loss as one op (`optimized/kernels/linear_cross_entropy.py`). The
returned `logits` are then None: the model never built them. Everything else -- the image merge, Gemma3's
training mask (which reads the labels), `num_items_in_batch` -- is the family's own code.

Every other call builds the logits as transformers does, with the fused loss of
`optimized/kernels/cross_entropy.py`: eval mode, no labels, `torch.no_grad()`, `logits_to_keep`,
and models this does not fit: an LM head that is not a plain bias-free `nn.Linear` (a PEFT adapter on
it), or a config that transforms the logits between head and loss (final-logit softcapping, a logit
scale). Everything is set per instance and undone by `unpatch`.
"""

from __future__ import annotations

import contextvars
import inspect

import torch

from optimized import ops
from optimized.patches import switched_on
from reference.instance_methods import weakly_bound

# Config fields under which transformers changes the logits after lm_head: the head cannot be fused.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")

_head_deferred = contextvars.ContextVar("fastvision_head_deferred", default=False)


def fits(model) -> bool:
    """Whether the fused head can stand in for this model's lm_head + loss at all."""
    head = getattr(model, "lm_head", None)
    text = model.config.get_text_config()
    return type(head) is torch.nn.Linear and head.bias is None and \
        not any(getattr(text, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


def fuses(model, kwargs: dict) -> bool:
    """The one decision, per call: this forward computes its loss without logits."""
    return (kwargs.get("labels") is not None and model.training and torch.is_grad_enabled()
            and not kwargs.get("logits_to_keep") and kwargs.get("return_dict") is not False
            and type(model.lm_head) is torch.nn.Linear)


def _forward(model, *args, **kwargs):
    if args or not fuses(model, kwargs):  # positional calls come from generate-style code: as transformers
        return type(model).forward(model, *args, **kwargs)
    outputs = switched_on(_head_deferred, type(model).forward)(model, **kwargs)
    # What came back as `logits` are the hidden states: rebuilt without them (ModelOutput keeps a field
    # set to None in its dict, and refuses `del`).
    return type(outputs)(**{key: value for key, value in outputs.items() if key != "logits"})


def _head_forward(head, hidden_states):
    if _head_deferred.get():
        return hidden_states
    return type(head).forward(head, hidden_states)


def _loss(model, logits, labels, vocab_size, **kwargs):
    if _head_deferred.get():  # `logits` are the final hidden states: lm_head is deferred to here
        return ops.linear_causal_lm_loss(logits, model.lm_head.weight, labels, vocab_size, **kwargs)
    return ops.causal_lm_loss(logits, labels, vocab_size, **kwargs)


def patch(model) -> bool:
    """Fuse the loss (and, where the model fits, the head into it); True when the head is fused."""
    if not fits(model):
        model.loss_function = ops.causal_lm_loss
        return False
    model.loss_function = weakly_bound(_loss, model)
    model.lm_head.forward = weakly_bound(_head_forward, model.lm_head)
    forward = weakly_bound(_forward, model)
    # generate() validates its kwargs against the forward's signature: the family's own, without `self`
    forward.__signature__ = inspect.signature(type(model).forward.__get__(model))
    model.forward = forward
    return True


def unpatch(model, head_fused: bool) -> None:
    del model._loss_function  # transformers' `loss_function` property falls back to its loss mapping
    if head_fused:
        del model.lm_head.forward, model.forward  # the classes' forwards show through again


__all__ = ["fits", "fuses", "patch", "unpatch"]
