"""Bit widths and bit budgets: their valid range and their validation, defined once.

Torch-free (like :mod:`stamp_fx.allocation`, which uses it). :mod:`stamp_fx.quantizer`
re-exports :data:`MIN_BITS`, :data:`MAX_BITS` and :func:`validate_bits`, where they were first
defined; the Triton kernels' launcher validates with :func:`validate_bits` too.
"""

from __future__ import annotations

import math

__all__ = ["MAX_BITS", "MIN_BITS", "is_bit_width", "is_finite_number", "validate_bits"]

MIN_BITS, MAX_BITS = 2, 16


def is_bit_width(bits: object) -> bool:
    """Whether ``bits`` is an int (not a bool) in ``MIN_BITS..MAX_BITS``."""
    return not isinstance(bits, bool) and isinstance(bits, int) and MIN_BITS <= bits <= MAX_BITS


def validate_bits(bits: object, what: str = "bits") -> int:
    """Return ``bits`` as an int, or raise ValueError unless it is an integer in 2..16."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        if isinstance(bits, float) and bits.is_integer():
            raise ValueError(f"{what} must be an int in {MIN_BITS}..{MAX_BITS}, got float {bits!r}")
        raise ValueError(f"{what} must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return bits


def is_finite_number(value: object) -> bool:
    """Whether ``value`` can be an average-bit budget (``avg_bits``): a finite int or float,
    not a bool. Callers word the error for their own context."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
