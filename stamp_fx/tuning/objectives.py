"""What the tuner minimises: the candidate :class:`Option` of a site and the objective registry.

An objective turns one site's measured statistics (a
:class:`~stamp_fx.tuning.sensitivity.SiteSensitivity`) and an option into the error the budget
solver minimises. The registry :data:`OBJECTIVES` is filled by the ``_objective`` decorator;
:func:`check_objective` raises ``ValueError`` listing the known names for any other name. The
objectives themselves are described in :mod:`stamp_fx.tuning`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # only for annotations: sensitivity imports Option from here
    from .sensitivity import SiteSensitivity

__all__ = ["DEFAULT_OBJECTIVE", "OBJECTIVES", "Objective", "Option", "check_objective"]


class Option(NamedTuple):
    """One candidate policy for a site: ``high_tokens`` at the site's ``high_bits``, the rest at
    ``low_bits``."""

    high_tokens: int
    low_bits: int


@dataclass(frozen=True)
class Objective:
    """How a site's measured statistics become the error the budget solver minimises."""

    name: str
    needs_gradients: bool
    error: Callable[[SiteSensitivity, Option], float]
    description: str


OBJECTIVES: dict[str, Objective] = {}


def _objective(name: str, *, needs_gradients: bool, description: str):
    def register(fn: Callable[[SiteSensitivity, Option], float]):
        OBJECTIVES[name] = Objective(name, needs_gradients, fn, description)
        return fn

    return register


@_objective(
    "fisher",
    needs_gradients=True,
    description="predicted loss increase 0.5 * sum g^2 (x_hat - x)^2 (diagonal empirical Fisher)",
)
def _fisher(s: SiteSensitivity, o: Option) -> float:
    return s.fisher[o]


@_objective(
    "output_nsr",
    needs_gradients=False,
    description="output noise-to-signal ratio ||(x_hat - x) W^T||^2 / ||x W^T||^2",
)
def _output_nsr(s: SiteSensitivity, o: Option) -> float:
    return s.error[o] / max(s.signal, 1e-30)


DEFAULT_OBJECTIVE = "fisher"


def check_objective(objective: object) -> Objective:
    """The registered objective called ``objective``; any other value raises ``ValueError``
    listing the known names."""
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[objective]
