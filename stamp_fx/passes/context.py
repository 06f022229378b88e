"""What a pass receives (PassContext), what it leaves on nodes (StampMeta) and reports (PassRecord)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..analysis import Site
from ..plan import AllocationPlan


@dataclass(frozen=True, slots=True)
class StampMeta:
    """``node.meta["stamp"]`` on every node a pass creates or changes; one readable line."""

    sites: tuple[str, ...]
    roles: tuple[str, ...]
    policy: str
    reason: str = "plan"

    def __str__(self) -> str:
        roles = ",".join(sorted(set(self.roles)))
        return f"site={','.join(self.sites)} role={roles} {self.policy} reason={self.reason}"


@dataclass(frozen=True, slots=True)
class PassRecord:
    name: str
    seconds: float
    stats: dict


@dataclass
class PassContext:
    """Inputs of the passes. ``observer``, when set, replaces quantization by a call
    ``observer(x, site_keys, seq_dim) -> x`` (calibration runs the graph eagerly).
    ``lowering`` (a :class:`stamp_fx.lowering.Lowering`, None when the graph runs eagerly)
    chooses the op that runs each inserted node. ``padding_mask`` is the graph's
    ``attention_mask`` input (:func:`stamp_fx.analysis.find_padding_mask`), or None."""

    sites: list[Site]
    plan: AllocationPlan
    debug: Any = None
    observer: Callable | None = None
    lowering: Any = None
    padding_mask: Any = None
    extra: dict = field(default_factory=dict)
