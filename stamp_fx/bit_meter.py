"""Counting activation bits: what one call of a compiled graph quantizes (:func:`graph_bits`),
and the running average over the calls of a generation (:class:`BitMeter`, prefill and decode
apart), which ``StampCompiler.bit_meter()`` and ``stamp_fx.generation_bits`` fill in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .analysis import Site
from .plan import AllocationPlan

if TYPE_CHECKING:
    from .backend import CompileRecord

__all__ = ["BitMeter", "graph_bits"]


def graph_bits(sites: Sequence[Site], plan: AllocationPlan) -> tuple[float, int] | None:
    """``(sum of bits, elements)`` over the tensors one call of a graph quantizes (each
    quantized tensor once, however many linears read it; a Haar transform's zero padding
    counted, since its coefficients are stored too), or None when a quantized tensor has a
    symbolic size. Unquantized sites (LM head, skipped) are not activations at low bits and
    are left out: the average is over what STaMP quantizes."""
    bit_sum, elements, seen = 0.0, 0, set()
    for site in sites:
        policy = plan.sites.get(site.key)
        if policy is None or site.origin is None or site.seq_dim is None:
            continue
        ident = (site.origin, site.seq_dim)
        if ident in seen:
            continue
        seen.add(ident)
        if not site.shape or not all(d.isdigit() for d in site.shape):
            return None
        shape = [int(d) for d in site.shape]
        length = shape[site.seq_dim]
        numel = 1
        for d in shape:
            numel *= d
        if length == 0 or numel == 0:
            continue
        try:
            transform = policy.make_transform(plan.tensors)
        except ValueError:  # klt before calibration has filled in its basis
            return None
        vector = policy.bit_vector(transform, length)
        bit_sum += sum(vector) * (numel // length)
        elements += numel
    return bit_sum, elements


@dataclass
class BitMeter:
    """Average activation bits over the calls it saw, prefill (every graph that is not a
    decode step) and decode apart. ``unmeasured`` counts calls of graphs with symbolic sizes."""

    bits: dict = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    elements: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    calls: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    unmeasured: int = 0

    def add(self, record: CompileRecord) -> None:
        kind = "decode" if record.extra.get("decode") else "prefill"
        self.calls[kind] += 1
        counted = record.extra.get("bits")
        if counted is None:
            self.unmeasured += 1
            return
        self.bits[kind] += counted[0]
        self.elements[kind] += counted[1]

    def average(self, kind: str | None = None) -> float:
        """Bits per quantized activation element (``kind``: "prefill", "decode", None = all)."""
        kinds = ("prefill", "decode") if kind is None else (kind,)
        n = sum(self.elements[k] for k in kinds)
        return sum(self.bits[k] for k in kinds) / n if n else float("nan")

    def summary(self) -> str:
        return (
            f"average activation bits {self.average():.3f} (prefill {self.average('prefill'):.3f}"
            f" over {self.calls['prefill']} call(s), decode {self.average('decode'):.3f} over "
            f"{self.calls['decode']} call(s)"
            + (
                f"; {self.unmeasured} call(s) with symbolic sizes not counted"
                if self.unmeasured
                else ""
            )
            + ")"
        )
