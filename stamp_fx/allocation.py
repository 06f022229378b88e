"""Theorem-1 bit allocation on plain records (floats and ints; no torch, no torch.fx).

Theorem 1 bounds the STaMP error by ``(d/2) * sum_i e_i / (2**b_i - 1)**2`` where ``e_i`` is the
energy of transformed token ``i``. This module minimises that bound:

* :func:`solve_token_bits`: integer widths from an allowed set under an average-bit budget
  (greedy marginal gain; exact whenever the allowed widths are equally spaced, e.g. {4, 8},
  {4, 6, 8} or {2, ..., 8}, see the function's docstring);
* :func:`paper_preset`: the paper's rule (first k transformed tokens high, the rest low);
* :func:`continuous_bits`: the closed form ``b_i = 1/2 log2 e_i - C`` (real-valued, reference only);
* :class:`SpectralBitPlan`, :func:`haar_band_plan`, :func:`solve_band_bits`: a length-independent
  form (bits per fraction of the spectrum / per Haar band) so one plan serves every length;
* :func:`allocate_layer_budgets`: per-layer budgets under a global average weighted by each
  layer's activation size, given each layer's error-versus-bits curve.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .bitwidths import MAX_BITS, MIN_BITS, is_bit_width, is_finite_number

__all__ = [
    "DEFAULT_ALLOWED_BITS",
    "error_weight",
    "bound_objective",
    "solve_token_bits",
    "paper_preset",
    "continuous_bits",
    "SpectralBitPlan",
    "haar_band_fractions",
    "haar_band_plan",
    "solve_band_bits",
    "LayerCurve",
    "allocate_layer_budgets",
]

DEFAULT_ALLOWED_BITS: tuple[int, ...] = (4, 8)
_BUDGET_EPS = 1e-9


def error_weight(bits: int) -> float:
    """Theorem-1 weight of one token at ``bits``: ``1 / (2**bits - 1)**2``."""
    return 1.0 / float((2**bits - 1) ** 2)


def bound_objective(energies: Sequence[float], bits: Sequence[int]) -> float:
    """``sum_i e_i / (2**b_i - 1)**2`` (the Theorem-1 bound without its ``d/2`` factor)."""
    return sum(e * error_weight(b) for e, b in zip(energies, bits, strict=True))


def _checked_allowed(allowed: Sequence[int]) -> tuple[int, ...]:
    if not allowed:
        raise ValueError("allowed bit widths must not be empty")
    out = tuple(sorted(set(allowed)))
    for b in out:
        if not is_bit_width(b):
            raise ValueError(
                f"allowed bit widths must be ints in {MIN_BITS}..{MAX_BITS}, got {list(allowed)}"
            )
    return out


def _checked_energies(energies: Sequence[float]) -> list[float]:
    out = [float(e) for e in energies]
    for e in out:
        if not math.isfinite(e) or e < 0:
            raise ValueError(f"energies must be finite and non-negative, got {e}")
    return out


def _check_budget(avg_bits: float, allowed: tuple[int, ...]) -> None:
    if not is_finite_number(avg_bits):
        raise ValueError(f"avg_bits must be a finite number, got {avg_bits!r}")
    if avg_bits < allowed[0] - _BUDGET_EPS:
        raise ValueError(
            f"avg_bits {avg_bits} is below the smallest allowed width {allowed[0]} (allowed: {list(allowed)})"
        )


def solve_token_bits(
    energies: Sequence[float],
    avg_bits: float,
    allowed: Sequence[int] = DEFAULT_ALLOWED_BITS,
) -> list[int]:
    """Integer widths minimising ``sum_i e_i / (2**b_i - 1)**2`` with ``mean(b) <= avg_bits``.

    Every token starts at the smallest allowed width; an *upgrade* moves one token to its next
    allowed width at a gain of ``e_i * (w(b) - w(b'))`` per ``b' - b`` bits. The weight is convex
    in ``b``, so each token's gains per bit decrease along its chain, and sorting all upgrades by
    gain per bit (ties: lower token index first) gives a precedence-respecting order. The solver
    takes the longest prefix of that order that fits the budget. When the allowed widths are
    equally spaced every upgrade costs the same, the prefix is the set of largest gains, and the
    result is exactly optimal. For unequally spaced sets it is optimal for the budget it uses
    and may leave less than one upgrade unspent. Raising the budget only extends the prefix, so
    no token ever loses bits.
    """
    allowed = _checked_allowed(allowed)
    es = _checked_energies(energies)
    _check_budget(avg_bits, allowed)
    n = len(es)
    bits = [allowed[0]] * n
    spare = math.floor(avg_bits * n + _BUDGET_EPS) - allowed[0] * n
    steps = list(itertools.pairwise(allowed))
    upgrades = sorted(
        (
            (-(e * (error_weight(lo) - error_weight(hi))) / (hi - lo), level, i)
            for i, e in enumerate(es)
            for level, (lo, hi) in enumerate(steps)
        ),
    )
    for _, level, i in upgrades:
        lo, hi = steps[level]
        if hi - lo > spare:
            break
        bits[i] = hi
        spare -= hi - lo
    return bits


def paper_preset(
    length: int, high_tokens: int = 64, high_bits: int = 8, low_bits: int = 4
) -> list[int]:
    """The paper's rule: the first ``high_tokens`` transformed tokens at ``high_bits``."""
    k = max(0, min(high_tokens, length))
    return [high_bits] * k + [low_bits] * (length - k)


def continuous_bits(energies: Sequence[float], avg_bits: float) -> list[float]:
    """Real-valued optimum of ``sum e_i 4**-b_i`` with ``mean(b) == avg_bits``:
    ``b_i = 1/2 log2(e_i) - C`` (zero energies are floored at the smallest positive float)."""
    es = _checked_energies(energies)
    if not es:
        return []
    half_logs = [0.5 * math.log2(max(e, 2.0**-1074)) for e in es]
    c = sum(half_logs) / len(es) - avg_bits
    return [h - c for h in half_logs]


@dataclass(frozen=True, slots=True)
class SpectralBitPlan:
    """Bits by position fraction along the transformed sequence, independent of its length.

    Token ``k`` of ``n`` belongs to band ``j`` when ``round(edges[j-1] * n) <= k < round(edges[j] * n)``
    (``edges[-1] == 1``); band ``j`` is quantized at ``bits[j]``. For a J-level Haar, the edges
    ``2**-J, 2**-(J-1), ..., 1/2, 1`` are exactly the bands [a_J, d_J, ..., d_1] at every padded length.
    """

    edges: tuple[float, ...]
    bits: tuple[int, ...]

    def __post_init__(self) -> None:
        edges, bits = tuple(float(e) for e in self.edges), tuple(self.bits)
        if not edges or len(edges) != len(bits):
            raise ValueError("SpectralBitPlan needs as many bits as edges (at least one)")
        if any(b <= a for a, b in itertools.pairwise(edges)) or edges[0] <= 0 or edges[-1] != 1.0:
            raise ValueError(f"edges must increase within (0, 1] and end at 1.0, got {list(edges)}")
        _checked_allowed(bits)
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "bits", bits)

    def band_sizes(self, length: int) -> list[int]:
        bounds = [0] + [round(e * length) for e in self.edges]
        return [b - a for a, b in itertools.pairwise(bounds)]

    def token_bits(self, length: int) -> list[int]:
        out: list[int] = []
        for size, b in zip(self.band_sizes(length), self.bits, strict=True):
            out += [b] * size
        return out

    def average(self, length: int) -> float:
        return sum(self.token_bits(length)) / max(1, length)

    def to_dict(self) -> dict[str, list]:
        return {"edges": list(self.edges), "bits": list(self.bits)}

    @classmethod
    def from_token_bits(cls, bits: Sequence[int]) -> SpectralBitPlan:
        """The plan whose ``token_bits(len(bits))`` is exactly ``bits`` (one band per run)."""
        if not bits:
            raise ValueError("from_token_bits needs at least one token")
        n = len(bits)
        edges, widths = [], []
        for i, b in enumerate(bits):
            if widths and widths[-1] == b:
                edges[-1] = (i + 1) / n
            else:
                edges.append((i + 1) / n)
                widths.append(b)
        edges[-1] = 1.0
        return cls(tuple(edges), tuple(widths))

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence]) -> SpectralBitPlan:
        return cls(tuple(data["edges"]), tuple(data["bits"]))


def haar_band_fractions(levels: int) -> list[float]:
    """Fractions of the sequence in each band [a_J, d_J, ..., d_1] of a ``levels``-level Haar."""
    return [2.0**-levels] + [2.0 ** -(levels - j) for j in range(levels)]


def haar_band_plan(levels: int, band_bits: Sequence[int]) -> SpectralBitPlan:
    """A :class:`SpectralBitPlan` with one width per Haar band [a_J, d_J, ..., d_1]."""
    if len(band_bits) != levels + 1:
        raise ValueError(
            f"a {levels}-level Haar has {levels + 1} bands, got {len(band_bits)} widths"
        )
    edges = list(itertools.accumulate(haar_band_fractions(levels)))
    edges[-1] = 1.0
    return SpectralBitPlan(tuple(edges), tuple(band_bits))


def solve_band_bits(
    band_energies: Sequence[float],
    band_fractions: Sequence[float],
    avg_bits: float,
    allowed: Sequence[int] = DEFAULT_ALLOWED_BITS,
    *,
    max_exhaustive: int = 1 << 20,
) -> list[int]:
    """One width per band minimising ``sum_j E_j w(b_j)`` with ``sum_j f_j b_j <= avg_bits``.

    ``band_energies`` are total energies per band, ``band_fractions`` the share of tokens in
    each. Exhaustive (exact) while ``len(allowed) ** n_bands <= max_exhaustive``; otherwise the
    greedy of :func:`solve_token_bits` applied with fractional costs.
    """
    allowed = _checked_allowed(allowed)
    es = _checked_energies(band_energies)
    fr = [float(f) for f in band_fractions]
    if len(fr) != len(es) or any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError("band_fractions must be positive, one per band, and sum to 1")
    _check_budget(avg_bits, allowed)
    if len(allowed) ** len(es) <= max_exhaustive:
        best, best_obj = None, math.inf
        for combo in itertools.product(allowed, repeat=len(es)):
            if sum(f * b for f, b in zip(fr, combo, strict=True)) <= avg_bits + _BUDGET_EPS:
                obj = bound_objective(es, combo)
                if obj < best_obj:
                    best, best_obj = list(combo), obj
        assert best is not None  # the all-minimum combination always fits (budget checked)
        return best
    bits = [allowed[0]] * len(es)
    spare = avg_bits - allowed[0]
    steps = list(itertools.pairwise(allowed))
    upgrades = sorted(
        (-(e * (error_weight(lo) - error_weight(hi))) / ((hi - lo) * f), level, j)
        for j, (e, f) in enumerate(zip(es, fr, strict=True))
        for level, (lo, hi) in enumerate(steps)
    )
    for _, level, j in upgrades:
        lo, hi = steps[level]
        if bits[j] != lo or (hi - lo) * fr[j] > spare + _BUDGET_EPS:
            continue
        bits[j] = hi
        spare -= (hi - lo) * fr[j]
    return bits


@dataclass(frozen=True, slots=True)
class LayerCurve:
    """One layer's options: ``options[m] = (avg_bits, error)``; ``size`` weighs its bits in the
    global average (its activation element count)."""

    name: str
    size: float
    options: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not (self.size > 0 and math.isfinite(self.size)):
            raise ValueError(f"layer {self.name!r}: size must be positive, got {self.size}")
        if not self.options:
            raise ValueError(f"layer {self.name!r}: needs at least one (avg_bits, error) option")
        opts = tuple(sorted((float(b), float(e)) for b, e in self.options))
        for b, e in opts:
            if not (math.isfinite(b) and math.isfinite(e)) or e < 0:
                raise ValueError(
                    f"layer {self.name!r}: option ({b}, {e}) must be finite with error >= 0"
                )
        object.__setattr__(self, "options", opts)


def _lower_hull(options: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Options on the lower-left convex hull of (bits, error): the only ones a Lagrangian can pick."""
    pts: list[tuple[float, float]] = []
    for b, e in options:
        if pts and e >= pts[-1][1]:
            continue  # dominated: more bits, no less error
        while len(pts) >= 2:
            (b1, e1), (b2, e2) = pts[-2], pts[-1]
            if (e1 - e2) * (b - b2) <= (e2 - e) * (b2 - b1):  # middle point not below the chord
                pts.pop()
            else:
                break
        pts.append((b, e))
    return pts


def allocate_layer_budgets(layers: Sequence[LayerCurve], avg_bits: float) -> dict[str, float]:
    """Per-layer average bits minimising the total error with
    ``sum_l size_l * bits_l / sum_l size_l <= avg_bits``.

    Greedy on the convex hull of each curve: every layer starts at its cheapest option and hull
    steps are taken by decreasing error reduction per weighted bit, skipping steps that no
    longer fit (and that layer's later steps). Optimal for the budget it spends when every
    curve is convex; a layer's non-hull options are never chosen.
    """
    if not layers:
        return {}
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    total_size = sum(layer.size for layer in layers)
    choice = {layer.name: layer.options[0][0] for layer in layers}
    spare = avg_bits * total_size - sum(layer.size * layer.options[0][0] for layer in layers)
    if spare < -_BUDGET_EPS * total_size:
        raise ValueError(f"avg_bits {avg_bits} is below every layer's cheapest option")
    steps = []
    for layer in layers:
        hull = _lower_hull(layer.options)  # starts at the cheapest option
        for m, ((b0, e0), (b1, e1)) in enumerate(itertools.pairwise(hull)):
            cost = (b1 - b0) * layer.size
            steps.append((-(e0 - e1) / cost, layer.name, m, b0, b1, cost))
    steps.sort()
    blocked: set[str] = set()
    for _, name, _m, b0, b1, cost in steps:
        if name in blocked or choice[name] != b0:
            blocked.add(name)
            continue
        if cost > spare + _BUDGET_EPS * total_size:
            blocked.add(name)
            continue
        choice[name] = b1
        spare -= cost
    return choice
