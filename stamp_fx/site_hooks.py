"""Eager (no FX) access to a site's input: the one hook mechanism behind every eager application.

A site key names what a site quantizes (``stamp_fx.analysis``):

* ``fqn:in`` is the first positional input of module ``fqn``: a forward pre-hook rewrites it;
* ``fqn:k`` / ``fqn:v`` are the key / value of every ``scaled_dot_product_attention`` call made
  while module ``fqn`` runs: a :class:`~torch.overrides.TorchFunctionMode`, entered by a pre-hook
  of ``fqn`` and left by its forward hook, rewrites them.

:func:`hook_sites` installs both for a set of keys with one ``rewrite(key, tensor) -> tensor``
callback. :func:`stamp_fx.reference.apply_plan_eager` (the oracle: ``rewrite`` fake-quantizes)
and the tuner's loss-gradient capture (``rewrite`` returns an alias whose gradient is the one
seen by that site alone) are built on it, so both reach exactly the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["Rewrite", "hook_sites"]

Rewrite = Callable[[str, Tensor], Tensor]
"""``rewrite(site_key, tensor) -> tensor`` put in its place (same shape)."""

_SDPA = torch.nn.functional.scaled_dot_product_attention
_SLOTS = ("in", "k", "v")


class _RewriteAttentionInputs(torch.overrides.TorchFunctionMode):
    """Rewrites key, then value, of ``scaled_dot_product_attention`` calls made while active
    (only the slots listed; positional key/value, which is how every supported model calls it)."""

    def __init__(self, fqn: str, slots: tuple[str, ...], rewrite: Rewrite):
        super().__init__()
        self.fqn, self.slots, self.rewrite = fqn, slots, rewrite

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA and len(args) >= 3:
            q, k, v, *rest = args
            if "k" in self.slots:
                k = self.rewrite(f"{self.fqn}:k", k)
            if "v" in self.slots:
                v = self.rewrite(f"{self.fqn}:v", v)
            args = (q, k, v, *rest)
        return func(*args, **kwargs)


class _ModeStack(list):
    """The attention modes entered and not yet left. Its :meth:`remove` (it is returned among
    the hook handles) leaves the ones a forward that raised inside the module left entered."""

    def remove(self) -> None:
        while self:
            self.pop().__exit__(None, None, None)


def hook_sites(
    model: torch.nn.Module,
    keys: Iterable[str],
    rewrite: Rewrite,
    *,
    unhookable: Callable[[str, str], Exception],
) -> list:
    """Hook every site key in ``keys`` on ``model`` so its tensor passes through
    ``rewrite(key, tensor)``; returns the handles (call ``.remove()`` on each to undo).

    Every key is checked before anything is hooked: a slot other than ``in``, ``k`` or ``v``
    (``"in#1"``, a module called several times, has no per-call hook) raises
    ``unhookable(key, slot)``, so a refused key leaves the model untouched.
    """
    keys = list(keys)
    for key in keys:
        slot = key.rpartition(":")[2]
        if slot not in _SLOTS:
            raise unhookable(key, slot)
    handles: list = []
    attn: dict[str, list[str]] = {}
    for key in keys:
        fqn, _, slot = key.rpartition(":")
        if slot == "in":

            def pre_hook(mod, args, kwargs, key=key):
                return (rewrite(key, args[0]), *args[1:]), kwargs

            module = model.get_submodule(fqn)
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            attn.setdefault(fqn, []).append(slot)
    # One stack for every attention module: a forward hook always leaves the innermost mode,
    # which is the one its own pre-hook entered (modules nest, their calls do not interleave).
    modes = _ModeStack()
    for fqn, slots in attn.items():

        def enter(mod, args, fqn=fqn, slots=tuple(slots)):
            mode = _RewriteAttentionInputs(fqn, slots, rewrite)
            mode.__enter__()
            modes.append(mode)

        def leave(mod, args, output):
            modes.pop().__exit__(None, None, None)

        module = model.get_submodule(fqn)
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    if attn:
        handles.append(modes)
    return handles
