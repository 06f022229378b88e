"""Shape arithmetic that works on plain ints and on Inductor's symbolic ints (``SymInt``) alike.

Decompositions run while Inductor traces the graph, where a dynamic sequence length is a
``SymInt``. Arithmetic on it (``+``, ``//``, ``*``) stays symbolic for free; a Python comparison
(``if n > 64``) is answered from the example input's size and records a *guard*: the compiled
graph is reused only for lengths that answer the same way, and a length that does not triggers
a recompile. The helpers below are the only places where the lowering asks such questions, so
every guard it installs is listed here:

* :func:`haar_levels`: ``levels=-1`` (auto) needs a concrete level count. It is found by
  comparing the length against the thresholds where :func:`stamp_fx.transforms.auto_haar_levels`
  steps up, so the guard is the whole bracket of lengths with that level count (e.g. lengths
  1449..2896 all give 5 levels for the default target of 64), not the single length.
* :func:`next_pow2_bracket`: the Walsh-Hadamard transform pads to the next power of two, which
  must be concrete (it sizes the butterfly); the guard is ``2**(m-1) < n <= 2**m``.
* :func:`clamp_sinks` (defined once, in :mod:`stamp_fx.reference`): ``min(sink_tokens, S)``
  guards on ``S <= sink_tokens`` only.
"""

from __future__ import annotations

import functools

from stamp_fx.reference import clamp_sinks
from stamp_fx.transforms import auto_haar_levels

__all__ = [
    "IntLike",
    "haar_levels",
    "auto_level_thresholds",
    "next_pow2_bracket",
    "clamp_sinks",
    "symbolic_length",
]

IntLike = int  # or torch.SymInt; annotated as int because SymInt quacks like one

MAX_AUTO_LEVELS = 30


@functools.lru_cache(maxsize=256)
def auto_level_thresholds(target: int) -> tuple[int, ...]:
    """``t[j-1]`` is the smallest length with ``auto_haar_levels(length, target) >= j``.

    Found by bisection on the function itself (it is non-decreasing in the length), so the
    guards agree with the reference exactly, float rounding included.
    """
    out = []
    for j in range(1, MAX_AUTO_LEVELS + 1):
        lo, hi = 1, target << (j + 1)  # auto_haar_levels(target * 2**(j+1)) >= j + 1 > j
        while lo < hi:
            mid = (lo + hi) // 2
            if auto_haar_levels(mid, target) >= j:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return tuple(out)


def haar_levels(length: IntLike, levels: int, target: int) -> int:
    """Concrete Haar level count for ``length`` tokens: ``levels`` when it is ``>= 0``, else
    :func:`auto_haar_levels` (guarding on the bracket of lengths that share the answer)."""
    if levels >= 0:
        return levels
    j = 0
    for threshold in auto_level_thresholds(target):
        if length >= threshold:  # a guard when `length` is symbolic
            j += 1
        else:
            break
    return j


def next_pow2_bracket(length: IntLike) -> int:
    """The smallest power of two ``>= max(length, 1)`` as a concrete int (guarding on the bracket)."""
    m = 0
    while length > (1 << m):  # a guard per step when `length` is symbolic
        m += 1
    return 1 << m


def ceil_to(n: IntLike, multiple: int) -> IntLike:
    """``n`` rounded up to a multiple of ``multiple`` (symbolic-safe)."""
    return (n + multiple - 1) // multiple * multiple


def symbolic_length(x, seq_dim: int) -> bool:
    """Whether ``x``'s length along ``seq_dim`` is symbolic (asking installs no guard)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return not is_concrete_int(x.shape[seq_dim])
