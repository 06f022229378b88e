"""The traceable twins of the sequence transforms: each registered transform written with torch
ops Inductor can trace and fuse, with a symbolic length where the transform allows it.

:mod:`.decompositions` builds ``stamp::fake_quant``'s decomposition on these (transform, then
quantize, then the inverse); :meth:`stamp_fx.transforms.SequenceTransform.traceable` finds a
transform's twin here (:func:`traceable_transform`), so a transform and its twin are looked up
by one name and a new transform registers its twin once (:func:`register_transform_decomposition`).
What each twin does, and which have none (``klt``), is in :mod:`.decompositions`' docstring.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from stamp_fx.plan import SitePolicy
from stamp_fx.transforms import TRANSFORMS, _fwht0, _sequency_order, transform_class

from .symbolic import IntLike, ceil_to, haar_levels, next_pow2_bracket

__all__ = [
    "TransformDecomposition",
    "decomposable_transforms",
    "register_transform_decomposition",
    "traceable_transform",
]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)  # the same double the reference multiplies by


def register_transform_decomposition(
    name: str,
) -> Callable[[type[TransformDecomposition]], type[TransformDecomposition]]:
    """Class decorator making a traceable transform the ``traceable`` twin of the registered
    :class:`stamp_fx.transforms.SequenceTransform` ``name`` (one registry entry for both)."""

    def deco(cls: type[TransformDecomposition]) -> type[TransformDecomposition]:
        transform = transform_class(name)
        if transform.__dict__.get("traceable") is not None:
            raise ValueError(f"transform decomposition {name!r} is already registered")
        cls.name = name
        transform.traceable = cls
        return cls

    return deco


def traceable_transform(name: str) -> type[TransformDecomposition] | None:
    """The decomposition of the transform ``name``, or None (unknown, or none registered)."""
    transform = TRANSFORMS.get(name)
    return None if transform is None else transform.__dict__.get("traceable")


def decomposable_transforms() -> tuple[str, ...]:
    return tuple(sorted(n for n in TRANSFORMS if traceable_transform(n) is not None))


class TransformDecomposition(ABC):
    """One site's sequence transform along dim 0, for a (possibly symbolic) ``length``.

    ``forward`` maps ``[length, ...]`` to ``[coefficient_length, ...]`` (zero-padding where the
    transform needs it); ``inverse`` maps back and crops to ``[length, ...]``. Inputs are already
    in the working dtype. The arithmetic must match the reference transform's op for op, since
    the quantization codes are compared exactly.
    """

    name = "?"

    def __init__(self, policy: SitePolicy, length: IntLike):
        self.policy = policy
        self.length = length

    @classmethod
    def shape_depends_on_length(cls, policy: SitePolicy) -> bool:
        """Whether the coefficient layout changes with the length (so a symbolic length would
        need a guard per bracket of lengths, i.e. a recompile when the bracket changes)."""
        return False

    @property
    def coefficient_length(self) -> IntLike:
        return self.length

    @abstractmethod
    def forward(self, x0: Tensor) -> Tensor: ...

    def forward_parts(self, x0: Tensor) -> list[Tensor]:
        """``forward(x0)`` as consecutive row blocks (the caller concatenates them once, with
        the sink rows in front, so Inductor writes every block straight into one buffer)."""
        return [self.forward(x0)]

    @abstractmethod
    def inverse(self, y0: Tensor) -> Tensor: ...


def _pad0(x0: Tensor, total: IntLike, length: IntLike) -> Tensor:
    """Zero-pad dim 0 from ``length`` to ``total`` rows (the pad may be symbolic)."""
    pad = total - length
    if isinstance(pad, int) and pad == 0:
        return x0
    # constant_pad_nd lists (before, after) pairs from the last dim backwards.
    return torch.constant_pad_nd(x0, [0, 0] * (x0.ndim - 1) + [0, pad])


@register_transform_decomposition("identity")
class IdentityDecomposition(TransformDecomposition):
    def forward(self, x0: Tensor) -> Tensor:
        return x0

    def inverse(self, y0: Tensor) -> Tensor:
        return y0


def _haar_merge0(approx: Tensor, detail: Tensor) -> Tensor:
    """Inverse Haar step along dim 0: row ``2i + b`` is ``(approx[i] +/- detail[i]) / sqrt 2``.

    The reference stacks the even and odd rows and flattens; here each output row picks its
    sign by parity from row-repeated (expanded, not copied) inputs, which Inductor turns into
    index arithmetic inside one pointwise kernel instead of a materialised stack per level.
    Same two roundings per element as the reference, so the result is bit-identical.
    """
    rows, rest = approx.shape[0], approx.shape[1:]
    up = lambda t: t.unsqueeze(1).expand(rows, 2, *rest).flatten(0, 1)  # noqa: E731
    # +1 on even rows, -1 on odd ones: ``a + (-1) * d`` is exactly ``a - d`` (and stays exact
    # if a backend fuses it into an FMA); one read of each input keeps Inductor from
    # realising every level (a where() over both branches would read each twice per level).
    parity = torch.arange(2 * rows, device=approx.device) % 2
    sign = (1 - 2 * parity).to(approx.dtype).view(-1, *([1] * len(rest)))
    return (up(approx) + sign * up(detail)) * _INV_SQRT2


@register_transform_decomposition("haar")
class HaarDecomposition(TransformDecomposition):
    """J-level Haar; ``levels=-1`` resolves per length (a guard on the length bracket)."""

    @classmethod
    def shape_depends_on_length(cls, policy: SitePolicy) -> bool:
        return policy.levels is None  # auto levels grow with the length

    def __init__(self, policy: SitePolicy, length: IntLike):
        super().__init__(policy, length)
        requested = -1 if policy.levels is None else policy.levels
        self.levels = haar_levels(length, requested, policy.haar_target)
        self.block = 1 << self.levels
        self.padded = ceil_to(length, self.block) if self.levels else length

    @property
    def coefficient_length(self) -> IntLike:
        return self.padded

    def forward_parts(self, x0: Tensor) -> list[Tensor]:
        """The bands ``[a_J, d_J, ..., d_1]``."""
        approx, details = _pad0(x0, self.padded, self.length), []
        for _ in range(self.levels):
            pairs = approx.unflatten(0, (-1, 2))
            even, odd = pairs.select(1, 0), pairs.select(1, 1)
            approx, detail = (even + odd) * _INV_SQRT2, (even - odd) * _INV_SQRT2
            details.append(detail)
        return [approx, *reversed(details)]

    def forward(self, x0: Tensor) -> Tensor:
        parts = self.forward_parts(x0)
        return torch.cat(parts, 0) if len(parts) > 1 else parts[0]

    def inverse(self, y0: Tensor) -> Tensor:
        if not self.levels:
            return y0
        base = self.padded // self.block
        sizes = [base] + [base * (1 << j) for j in range(self.levels)]
        bands = torch.split(y0, sizes, 0)
        approx = bands[0]
        for detail in bands[1:]:
            approx = _haar_merge0(approx, detail)
        return approx[: self.length]


@register_transform_decomposition("haar2d")
class Haar2DDecomposition(TransformDecomposition):
    """The reference :class:`~stamp_fx.transforms.Haar2D` is already plain torch code on a
    concrete grid; the length is guarded to ``H * W`` (a mismatch is the user error the
    reference raises too)."""

    def __init__(self, policy: SitePolicy, length: IntLike):
        super().__init__(policy, length)
        self.transform = policy.make_transform()
        grid = self.transform.grid
        if length != grid[0] * grid[1]:
            raise ValueError(
                f"haar2d grid {grid} holds {grid[0] * grid[1]} tokens, but the sequence "
                f"(after {policy.sink_tokens} sink tokens) has {length}"
            )
        self.length = grid[0] * grid[1]

    @property
    def coefficient_length(self) -> IntLike:
        return self.transform.coefficient_length(self.length)

    def forward(self, x0: Tensor) -> Tensor:
        return self.transform.forward(x0, 0)

    def inverse(self, y0: Tensor) -> Tensor:
        return self.transform.inverse(y0, 0, length=self.length)


def f64_scalar(value: IntLike | float, like: Tensor) -> Tensor:
    return torch.full((), value, dtype=torch.float64, device=like.device)


def _matmul0(m: Tensor, x0: Tensor) -> Tensor:
    """``m @ x0`` along dim 0, reshaped exactly as the reference does (same GEMM shape)."""
    return (m @ x0.reshape(x0.shape[0], -1)).reshape(m.shape[0], *x0.shape[1:])


@register_transform_decomposition("dct")
class DCTDecomposition(TransformDecomposition):
    """DCT-II as a matmul with the orthonormal matrix, built in the graph (symbolic length)."""

    def _matrix(self, like: Tensor) -> Tensor:
        n = self.length
        k = torch.arange(n, dtype=torch.float64, device=like.device).unsqueeze(1)
        t = torch.arange(n, dtype=torch.float64, device=like.device).unsqueeze(0)
        # Same expression order as stamp_fx.transforms.dct_matrix (float64, then cast).
        norm = math.sqrt(2.0 / n) if isinstance(n, int) else torch.sqrt(2.0 / f64_scalar(n, like))
        c = torch.cos(math.pi * (2 * t + 1) * k / (2 * n)) * norm
        c = torch.where(k == 0, c * _INV_SQRT2, c)
        return c.to(like.dtype)

    def forward(self, x0: Tensor) -> Tensor:
        return _matmul0(self._matrix(x0), x0)

    def inverse(self, y0: Tensor) -> Tensor:
        return _matmul0(self._matrix(y0).T, y0)


@register_transform_decomposition("wht")
class WHTDecomposition(TransformDecomposition):
    """Sequency-ordered Walsh-Hadamard: the butterflies need a concrete power-of-two size, so the
    length is guarded to its bracket ``2**(m-1) < L <= 2**m`` (the padded size, the butterflies
    and the sequency permutation are then constants of the graph)."""

    @classmethod
    def shape_depends_on_length(cls, policy: SitePolicy) -> bool:
        return True

    def __init__(self, policy: SitePolicy, length: IntLike):
        super().__init__(policy, length)
        self.size = next_pow2_bracket(length)

    @property
    def coefficient_length(self) -> IntLike:
        return self.size

    def _sequency_order(self, like: Tensor) -> Tensor:
        """Natural-order Hadamard row of the Walsh function with ``k`` sign changes: a constant
        of the (concrete) padded size. Computing it in the graph with shifts and masks is
        possible but makes Inductor's index analysis crawl (tens of seconds at 512 tokens)."""
        return torch.tensor(_sequency_order(self.size), device=like.device)

    def _natural_to_sequency(self, like: Tensor) -> Tensor:
        """The inverse permutation (sequency index of natural row ``r``)."""
        inverse = [0] * self.size
        for k, r in enumerate(_sequency_order(self.size)):
            inverse[r] = k
        return torch.tensor(inverse, device=like.device)

    def _fwht0(self, x0: Tensor) -> Tensor:
        """The reference's butterflies, op for op, on the padded power-of-two size. (Writing each
        stage as ``a + sign * b`` on expanded views, as the Haar inverse does, makes every stage
        index arithmetic; over ``log2 n`` stages that slows Inductor's C++ code generation
        twofold for no gain.)"""
        return _fwht0(x0, self.size)

    def forward(self, x0: Tensor) -> Tensor:
        padded = _pad0(x0, self.size, self.length)
        return self._fwht0(padded).index_select(0, self._sequency_order(x0)) / math.sqrt(self.size)

    def inverse(self, y0: Tensor) -> Tensor:
        natural = y0.index_select(0, self._natural_to_sequency(y0))
        return (self._fwht0(natural) / math.sqrt(self.size))[: self.length]
