"""Loss gradients at each site's input, for the ``"fisher"`` objective (:mod:`stamp_fx.tuning`).

:class:`LossGradients` runs one eager forward and backward of ``loss_fn(model, batch)`` (default
:func:`next_token_loss`) with every site's input replaced by an alias of its own, through the
same hooks as the eager oracle (:func:`stamp_fx.site_hooks.hook_sites`), and returns the gradient
of the loss with respect to each alias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..calibrate import run_batch
from ..site_hooks import hook_sites

__all__ = ["LossFn", "LossGradients", "next_token_loss"]

LossFn = Callable[[torch.nn.Module, Any], Tensor]


def next_token_loss(model: torch.nn.Module, batch: Any) -> Tensor:
    """Mean next-token cross-entropy of a causal LM on a batch with ``input_ids`` (the default
    ``loss_fn`` of :func:`tune`)."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, Tensor):
        raise ValueError(
            "objective 'fisher' needs a loss: the default loss_fn (next-token cross-entropy) "
            "needs dict batches with 'input_ids'; pass loss_fn=(model, batch) -> scalar tensor"
        )
    out = run_batch(model, batch)
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, Tensor) or logits.shape[:2] != ids.shape:
        raise ValueError(
            "objective 'fisher': the default loss_fn needs a model output with 'logits' of shape "
            "[batch, seq, vocab]; pass loss_fn=(model, batch) -> scalar tensor"
        )
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


_CALLED_TWICE = (
    "objective 'fisher': site {key!r} is read more than once per forward, so its loss "
    "gradient is ambiguous; use objective='output_nsr' for this model"
)


def _unhookable(key: str, slot: str) -> ValueError:
    return ValueError(
        f"objective 'fisher' cannot hook site {key!r} (a module called several times, "
        "or an unknown slot); use objective='output_nsr' for this model"
    )


class LossGradients:
    """Per site key, the gradient of ``loss_fn(model, batch)`` with respect to the site's input
    as read by that site's consumer alone, from one eager forward and backward.

    Each consumer gets its own alias (``x.view_as(x)``) of its input, so q/k/v projections reading
    one tensor get three different gradients, and ``torch.autograd.grad`` on the aliases leaves
    every parameter's ``.grad`` untouched. ``fqn:in`` sites alias the first positional input of
    module ``fqn``; ``fqn:k`` / ``fqn:v`` alias key/value of the attention call in module ``fqn``.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn | None = None):
        self.model, self.loss_fn = model, loss_fn or next_token_loss

    def __call__(self, keys: Iterable[str], batch: Any) -> dict[str, Tensor]:
        aliases: dict[str, Tensor] = {}

        def alias(key: str, x: Tensor) -> Tensor:
            if key in aliases:
                raise ValueError(_CALLED_TWICE.format(key=key))
            aliases[key] = x.view_as(x)
            return aliases[key]

        handles = hook_sites(self.model, sorted(set(keys)), alias, unhookable=_unhookable)
        # Activations only carry gradients when something upstream requires them.
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        frozen = [p for p in params if not p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(True)
            loss = self.loss_fn(self.model, batch)
        finally:
            for h in handles:  # (the last one also leaves attention modes a raise left entered)
                h.remove()
            for p in frozen:
                p.requires_grad_(False)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        names = [k for k, a in aliases.items() if a.requires_grad]
        grads = torch.autograd.grad(
            loss, [aliases[k] for k in names], allow_unused=True, materialize_grads=True
        )
        return {k: g.detach() for k, g in zip(names, grads, strict=True)}
