"""Lowerings of ``stamp::`` ops for Inductor, in a name registry (``options={"kernel": name}``).

A :class:`Lowering` contributes a decomposition table (merged over Inductor's default one) and
Inductor config patches. ``reference`` keeps ``stamp::fake_quant`` as an opaque call to the
pure-PyTorch reference (correct everywhere, not fast).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cache import inductor_config_patches

__all__ = ["Lowering", "LOWERINGS", "register_lowering", "get_lowering", "available_lowerings"]


@dataclass(frozen=True)
class Lowering:
    name: str
    description: str
    decompositions: Callable[[], dict[Any, Callable]] = dict
    config_patches: Callable[[], dict[str, Any]] = field(default=inductor_config_patches)


LOWERINGS: dict[str, Lowering] = {}


def register_lowering(lowering: Lowering) -> Lowering:
    if lowering.name in LOWERINGS:
        raise ValueError(f"lowering {lowering.name!r} is already registered")
    LOWERINGS[lowering.name] = lowering
    return lowering


def available_lowerings() -> tuple[str, ...]:
    return tuple(sorted(LOWERINGS))


def get_lowering(name: str) -> Lowering:
    try:
        return LOWERINGS[name]
    except KeyError:
        raise ValueError(
            f"kernel: unknown {name!r}; valid kernels: {', '.join(available_lowerings())}"
        ) from None


register_lowering(
    Lowering(
        "reference",
        "stamp::fake_quant runs as an extern call to the PyTorch reference implementation",
    )
)
