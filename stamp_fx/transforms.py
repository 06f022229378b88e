"""Orthonormal sequence transforms, one name registry.

Contract of every transform ``T`` (an instance of :class:`SequenceTransform`):

* ``T.forward(x, dim)`` maps the ``S`` tokens of ``x`` along ``dim`` to ``T.coefficient_length(S)``
  transformed tokens (``>= S``: transforms that need a power-of-two or dyadic length zero-pad
  first). Any leading/trailing dims are batch dims. Low-"frequency" coefficients come first.
* ``T.inverse(y, dim, length)`` undoes it and crops back to exactly ``length`` tokens.
* The map is orthonormal on the zero-padded sequence: ``||forward(x)|| == ||x||`` and
  ``inverse(forward(x), length=S) == x`` up to rounding.
* float16/bfloat16 inputs are computed in float32 and returned in their own dtype; float32 and
  float64 are computed in their own precision.

Costs: ``haar``/``haar2d`` O(S*D), ``wht`` O(S*D*log S) (butterflies, no dense matrix), ``dct`` and
``klt`` one cached dense S x S matrix.

Size (about 530 lines, one job): every sequence transform of the registry is here (30 to 80
lines each), with the feature-axis rotation at the end; splitting them would scatter one
registry over files. Each transform's traceable twin (``lowering/traceable_transforms.py``) is
registered on its class (``traceable``), so one registry entry holds both forms.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from .quantizer import working_dtype

__all__ = [
    "SequenceTransform",
    "TRANSFORMS",
    "register_transform",
    "make_transform",
    "transform_class",
    "transform_for",
    "available_transforms",
    "auto_haar_levels",
    "auto_haar2d_levels",
    "resolve_depth_target",
    "dct_matrix",
    "token_autocorrelation",
    "FEATURE_TRANSFORMS",
    "block_hadamard",
    "feature_block_size",
]

FEATURE_TRANSFORMS = ("none", "hadamard")
"""Optional rotations of the feature (channel) axis applied around the quantizer."""

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
HIGH_PRECISION_TARGET = 64
"""Default size of the approximation band: the paper keeps 64 transformed tokens at 8 bits."""

TRANSFORMS: dict[str, type[SequenceTransform]] = {}


def register_transform(name: str) -> Callable[[type[SequenceTransform]], type[SequenceTransform]]:
    """Class decorator adding a transform class to :data:`TRANSFORMS` under ``name``."""

    def deco(cls: type[SequenceTransform]) -> type[SequenceTransform]:
        if name in TRANSFORMS:
            raise ValueError(f"transform {name!r} is already registered")
        cls.name = name
        TRANSFORMS[name] = cls
        return cls

    return deco


def available_transforms() -> tuple[str, ...]:
    return tuple(sorted(TRANSFORMS))


def transform_class(name: str) -> type[SequenceTransform]:
    """The registered transform class ``name`` (ValueError listing the valid names)."""
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ValueError(
            f"unknown transform {name!r}; valid transforms: {', '.join(available_transforms())}"
        ) from None


def make_transform(name: str, **params) -> SequenceTransform:
    """Build a registered transform by name, e.g. ``make_transform("haar", levels=5)``."""
    return transform_class(name)(**params)


def transform_for(
    name: str,
    *,
    levels: int | None = None,
    grid: tuple[int, int] | None = None,
    target: int = HIGH_PRECISION_TARGET,
    autocorr: Tensor | None = None,
) -> SequenceTransform:
    """The transform ``name`` for a site's settings (a config's or a policy's fields): the
    one place they are decoded, by each class's :meth:`SequenceTransform.from_settings`."""
    return transform_class(name).from_settings(
        levels=levels, grid=grid, target=target, autocorr=autocorr
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return working_dtype(dtype)
    raise TypeError(f"sequence transforms take floating-point tensors, got dtype {dtype}")


def _check_levels(levels: int | None) -> None:
    if levels is not None and (
        isinstance(levels, bool) or not isinstance(levels, int) or levels < 0
    ):
        raise ValueError(f"levels must be a non-negative int or None (auto), got {levels!r}")


class SequenceTransform(ABC):
    """An orthonormal transform along one (sequence) axis; see the module docstring."""

    name: ClassVar[str] = "?"
    traceable: ClassVar[type | None] = None
    """Its traceable twin for Inductor (a
    ``lowering.traceable_transforms.TransformDecomposition``), set when the lowering registers
    one; None: Inductor calls the reference (an extern call). Kept on the class so that a
    transform and its decomposition are one registry entry."""

    @classmethod
    def from_settings(
        cls,
        *,
        levels: int | None = None,
        grid: tuple[int, int] | None = None,
        target: int = HIGH_PRECISION_TARGET,
        autocorr: Tensor | None = None,
    ) -> SequenceTransform:
        """Build from a site's settings (see :func:`transform_for`); a transform ignores the
        settings it has no use for."""
        return cls()

    def coefficient_length(self, length: int) -> int:
        """Number of transformed tokens produced for ``length`` input tokens."""
        return length

    def forward(self, x: Tensor, dim: int = -2) -> Tensor:
        length = x.shape[dim]
        x0 = x.movedim(dim, 0).to(_compute_dtype(x.dtype))
        n = self.coefficient_length(length)
        if n != length:
            x0 = torch.cat([x0, x0.new_zeros((n - length, *x0.shape[1:]))], 0)
        y0 = self._forward0(x0, length)
        return y0.to(x.dtype).movedim(0, dim)

    def inverse(self, y: Tensor, dim: int = -2, *, length: int | None = None) -> Tensor:
        """Inverse transform; ``length`` is the original token count (default: no cropping)."""
        n = y.shape[dim]
        length = n if length is None else length
        if self.coefficient_length(length) != n:
            raise ValueError(
                f"{self.describe()}: {n} coefficients along dim {dim} do not come from "
                f"{length} tokens (expected {self.coefficient_length(length)})"
            )
        y0 = y.movedim(dim, 0).to(_compute_dtype(y.dtype))
        x0 = self._inverse0(y0, length)[:length]
        return x0.to(y.dtype).movedim(0, dim)

    @abstractmethod
    def _forward0(self, x0: Tensor, length: int) -> Tensor:
        """Transform along dim 0 of an already padded tensor (compute dtype)."""

    @abstractmethod
    def _inverse0(self, y0: Tensor, length: int) -> Tensor:
        """Inverse along dim 0; may return the padded length (the caller crops)."""

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<SequenceTransform {self.describe()}>"


@register_transform("identity")
class Identity(SequenceTransform):
    """Plain per-token quantization: no transform."""

    def _forward0(self, x0: Tensor, length: int) -> Tensor:
        return x0

    def _inverse0(self, y0: Tensor, length: int) -> Tensor:
        return y0


def resolve_depth_target(depth_target: int | None, high_tokens: int) -> int:
    """The approximation-band size the automatic Haar depth aims for: ``depth_target`` when
    given (an op argument spells None as -1), else ``high_tokens`` (the paper's rule: the
    high-precision tokens are the approximation band); at least 1. The one place the two
    settings meet."""
    if depth_target is None or depth_target < 0:
        return max(1, high_tokens)
    return max(1, depth_target)


def auto_haar_levels(length: int, target: int = HIGH_PRECISION_TARGET) -> int:
    """Levels J for which the approximation band ``length / 2**J`` is closest to ``target``.

    2048 tokens -> 5 levels (a 64-token band), 4096 -> 6; lengths up to ~1.4*target -> 0.
    """
    if length <= target:
        return 0
    return max(0, math.floor(math.log2(length / target) + 0.5))


def auto_haar2d_levels(height: int, width: int, target: int = HIGH_PRECISION_TARGET) -> int:
    """Levels J whose LL band ``H*W / 4**J`` is closest to ``target`` (64x64 grid -> 3)."""
    if height * width <= target:
        return 0
    levels = max(0, math.floor(math.log(height * width / target, 4) + 0.5))
    # Never decompose below a 1-token side.
    return min(levels, max(0, math.floor(math.log2(max(1, min(height, width))))))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _haar_split(a: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """One orthonormal Haar step along ``axis``: (sum band, difference band)."""
    pairs = a.unflatten(axis, (-1, 2))
    even, odd = pairs.select(axis + 1, 0), pairs.select(axis + 1, 1)
    return (even + odd) * _INV_SQRT2, (even - odd) * _INV_SQRT2


def _haar_merge(low: Tensor, high: Tensor, axis: int) -> Tensor:
    """Inverse of :func:`_haar_split`: interleave the reconstructed even/odd samples."""
    even = (low + high) * _INV_SQRT2
    odd = (low - high) * _INV_SQRT2
    return torch.stack((even, odd), axis + 1).flatten(axis, axis + 1)


@register_transform("haar")
class Haar(SequenceTransform):
    """J-level 1D Haar DWT; output [a_J, d_J, ..., d_1]. ``levels=None`` picks J per length
    so the approximation band is about ``target`` tokens (:func:`auto_haar_levels`)."""

    @classmethod
    def from_settings(cls, *, levels=None, grid=None, target=HIGH_PRECISION_TARGET, autocorr=None):
        return cls(levels=levels, target=target)

    def __init__(self, levels: int | None = None, target: int = HIGH_PRECISION_TARGET):
        _check_levels(levels)
        self.levels = levels
        self.target = target

    def levels_for(self, length: int) -> int:
        return auto_haar_levels(length, self.target) if self.levels is None else self.levels

    def coefficient_length(self, length: int) -> int:
        return _round_up(max(length, 1), 2 ** self.levels_for(length))

    def band_sizes(self, length: int) -> tuple[int, ...]:
        """Sizes of [a_J, d_J, ..., d_1] for ``length`` input tokens."""
        levels = self.levels_for(length)
        base = self.coefficient_length(length) >> levels
        return (base,) + tuple(base << j for j in range(levels))

    def _forward0(self, x0: Tensor, length: int) -> Tensor:
        approx, details = x0, []
        for _ in range(self.levels_for(length)):
            approx, detail = _haar_split(approx, 0)
            details.append(detail)
        return torch.cat([approx, *reversed(details)], 0)

    def _inverse0(self, y0: Tensor, length: int) -> Tensor:
        sizes = self.band_sizes(length)
        bands = torch.split(y0, list(sizes), 0)
        approx = bands[0]
        for detail in bands[1:]:
            approx = _haar_merge(approx, detail, 0)
        return approx

    def describe(self) -> str:
        return "haar(J=auto)" if self.levels is None else f"haar(J={self.levels})"


@register_transform("haar2d")
class Haar2D(SequenceTransform):
    """J-level 2D Haar DWT over a row-major ``grid=(H, W)`` of tokens (``S == H*W``).

    Output: the LL_J band first (row-major), then (LH, HL, HH) of level J, ..., of level 1.
    H and W are zero-padded to multiples of 2**J. ``levels=None`` makes LL_J about 64 tokens.
    """

    @classmethod
    def from_settings(cls, *, levels=None, grid=None, target=HIGH_PRECISION_TARGET, autocorr=None):
        if grid is None:
            raise ValueError(
                "transform 'haar2d' needs grid=(height, width) of the token grid: pass "
                "options={'grid': (height, width)}"
            )
        return cls(grid=grid, levels=levels, target=target)

    def __init__(
        self,
        grid: tuple[int, int] | None = None,
        levels: int | None = None,
        target: int = HIGH_PRECISION_TARGET,
    ):
        if grid is None:
            raise ValueError("transform 'haar2d' needs grid=(height, width) of the token grid")
        if (
            not isinstance(grid, (tuple, list))
            or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
        ):
            raise ValueError(f"haar2d grid must be two positive ints (height, width), got {grid!r}")
        _check_levels(levels)
        self.grid = (int(grid[0]), int(grid[1]))
        self.levels = auto_haar2d_levels(*self.grid, target) if levels is None else levels

    def _padded_grid(self) -> tuple[int, int]:
        m = 2**self.levels
        return _round_up(self.grid[0], m), _round_up(self.grid[1], m)

    def coefficient_length(self, length: int) -> int:
        if length != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"haar2d grid {self.grid} holds {self.grid[0] * self.grid[1]} tokens, "
                f"but the sequence has {length}"
            )
        hp, wp = self._padded_grid()
        return hp * wp

    def _forward0(self, x0: Tensor, length: int) -> Tensor:
        (h, w), (hp, wp) = self.grid, self._padded_grid()
        rest = x0.shape[1:]
        # x0 is padded as a flat sequence; rebuild the 2D grid and pad each side instead.
        grid = x0[:length].reshape(h, w, *rest)
        grid = torch.nn.functional.pad(grid.movedim((0, 1), (-2, -1)), (0, wp - w, 0, hp - h))
        ll = grid.movedim((-2, -1), (0, 1))
        details = []
        for _ in range(self.levels):
            low, high = _haar_split(ll, 0)
            ll, lh = _haar_split(low, 1)
            hl, hh = _haar_split(high, 1)
            details.append(torch.cat([b.flatten(0, 1) for b in (lh, hl, hh)], 0))
        return torch.cat([ll.flatten(0, 1), *reversed(details)], 0)

    def _inverse0(self, y0: Tensor, length: int) -> Tensor:
        (h, w), (hp, wp) = self.grid, self._padded_grid()
        rest = y0.shape[1:]
        bh, bw = hp >> self.levels, wp >> self.levels
        ll = y0[: bh * bw].reshape(bh, bw, *rest)
        offset = bh * bw
        for _ in range(self.levels):
            n = bh * bw
            lh, hl, hh = (
                y0[offset + i * n : offset + (i + 1) * n].reshape(bh, bw, *rest) for i in range(3)
            )
            offset += 3 * n
            low = _haar_merge(ll, lh, 1)
            high = _haar_merge(hl, hh, 1)
            ll = _haar_merge(low, high, 0)
            bh, bw = 2 * bh, 2 * bw
        return ll[:h, :w].reshape(h * w, *rest)

    def describe(self) -> str:
        return f"haar2d(J={self.levels},grid={self.grid[0]}x{self.grid[1]})"


@functools.lru_cache(maxsize=64)
def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
    """Orthonormal DCT-II matrix C (rows = frequencies): y = C @ x, x = C.T @ y."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    t = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * (2 * t + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] *= _INV_SQRT2
    return c.to(dtype=dtype, device=device)


def _matmul0(m: Tensor, x0: Tensor) -> Tensor:
    """``m @ x0`` along dim 0 of an arbitrary-rank ``x0``."""
    return (m @ x0.reshape(x0.shape[0], -1)).reshape(m.shape[0], *x0.shape[1:])


@register_transform("dct")
class DCT(SequenceTransform):
    """Orthonormal DCT-II along the sequence, natural frequency order, any length."""

    def _forward0(self, x0: Tensor, length: int) -> Tensor:
        return _matmul0(dct_matrix(length, x0.dtype, str(x0.device)), x0)

    def _inverse0(self, y0: Tensor, length: int) -> Tensor:
        return _matmul0(dct_matrix(length, y0.dtype, str(y0.device)).T, y0)


@functools.lru_cache(maxsize=64)
def _sequency_order(n: int) -> tuple[int, ...]:
    """Natural-order Hadamard row index of the Walsh function with ``k`` sign changes."""
    bits = n.bit_length() - 1

    def bitrev(v: int) -> int:
        return int(f"{v:0{bits}b}"[::-1], 2) if bits else 0

    return tuple(bitrev(k ^ (k >> 1)) for k in range(n))


def _fwht0(x0: Tensor, n: int | None = None) -> Tensor:
    """Unnormalised fast Walsh-Hadamard transform along dim 0 (natural order), n = 2**m
    (``n``: dim 0's size as a plain int, for a traced tensor whose size is symbolic)."""
    n = x0.shape[0] if n is None else n
    flat = x0.reshape(n, -1)
    h = 1
    while h < n:
        pairs = flat.view(n // (2 * h), 2, h, flat.shape[1])
        a, b = pairs[:, 0], pairs[:, 1]
        flat = torch.stack((a + b, a - b), 1).view(n, -1)
        h *= 2
    return flat.view(x0.shape)


@register_transform("wht")
class WalshHadamard(SequenceTransform):
    """Orthonormal Walsh-Hadamard transform in sequency order, zero-padded to a power of two."""

    def coefficient_length(self, length: int) -> int:
        return 1 << max(0, (max(length, 1) - 1).bit_length())

    def _forward0(self, x0: Tensor, length: int) -> Tensor:
        n = x0.shape[0]
        order = torch.tensor(_sequency_order(n), device=x0.device)
        return _fwht0(x0).index_select(0, order) / math.sqrt(n)

    def _inverse0(self, y0: Tensor, length: int) -> Tensor:
        n = y0.shape[0]
        order = torch.tensor(_sequency_order(n), device=y0.device)
        natural = torch.empty_like(y0).index_copy_(0, order, y0)
        return _fwht0(natural) / math.sqrt(n)


def token_autocorrelation(x: Tensor, dim: int = -2) -> Tensor:
    """Token autocorrelation ``E[x_s . x_t]`` (float64, S x S) averaged over every other dim.

    Average it over calibration batches and pass it to ``make_transform("klt", autocorr=...)``.
    """
    x0 = x.movedim(dim, 0).reshape(x.shape[dim], -1).to(torch.float64)
    return (x0 @ x0.T) / max(1, x0.shape[1])


@register_transform("klt")
class KLT(SequenceTransform):
    """Karhunen-Loeve transform: eigenvectors of a calibrated token autocorrelation, by
    decreasing eigenvalue. A sequence shorter than the calibration length uses the leading
    block of the autocorrelation (its own KLT); a longer one is an error."""

    @classmethod
    def from_settings(cls, *, levels=None, grid=None, target=HIGH_PRECISION_TARGET, autocorr=None):
        if autocorr is None:
            raise ValueError(
                "transform 'klt' needs a calibrated plan: plan = stamp_fx.calibrate(model, "
                "batches, transform='klt'), then options={'plan': plan}"
            )
        return cls(autocorr=autocorr)

    def __init__(self, autocorr: Tensor | None = None):
        if autocorr is None:
            raise ValueError(
                "transform 'klt' needs autocorr=<S x S token autocorrelation> "
                "(see stamp_fx.token_autocorrelation or stamp_fx.calibrate)"
            )
        autocorr = torch.as_tensor(autocorr, dtype=torch.float64)
        if autocorr.ndim != 2 or autocorr.shape[0] != autocorr.shape[1]:
            raise ValueError(
                f"klt autocorr must be a square matrix, got shape {tuple(autocorr.shape)}"
            )
        if not torch.isfinite(autocorr).all():
            raise ValueError("klt autocorr holds NaN or Inf")
        self.autocorr = (autocorr + autocorr.T) / 2
        self._bases: dict[int, Tensor] = {}

    @property
    def max_length(self) -> int:
        return self.autocorr.shape[0]

    def basis(self, length: int) -> Tensor:
        """Orthonormal KLT matrix (rows = basis vectors, strongest first), float64."""
        if length > self.max_length:
            raise ValueError(
                f"klt was calibrated on {self.max_length} tokens and cannot transform {length}; "
                "calibrate on sequences at least as long as those you run"
            )
        if length not in self._bases:
            evals, evecs = torch.linalg.eigh(self.autocorr[:length, :length])
            basis = evecs.flip(1).T.contiguous()  # descending eigenvalue
            # Deterministic signs: largest-magnitude entry of each row positive.
            idx = basis.abs().argmax(1, keepdim=True)
            basis = basis * torch.sign(basis.gather(1, idx))
            self._bases[length] = basis
        return self._bases[length]

    def _forward0(self, x0: Tensor, length: int) -> Tensor:
        return _matmul0(self.basis(length).to(x0), x0)

    def _inverse0(self, y0: Tensor, length: int) -> Tensor:
        return _matmul0(self.basis(length).to(y0).T, y0)

    def describe(self) -> str:
        return f"klt(S<={self.max_length})"


# -- feature-axis (channel) transform ------------------------------------------------------------


def feature_block_size(features: int, max_block: int = 1 << 14) -> int:
    """Largest power of two dividing ``features`` (capped): the block of a block-Hadamard
    rotation when ``features`` is not itself a power of two (576 -> 64, 1536 -> 512)."""
    if features <= 0:
        raise ValueError(f"features must be positive, got {features}")
    return min(features & -features, max_block)


def block_hadamard(x: Tensor, block: int) -> Tensor:
    """Orthonormal block Walsh-Hadamard rotation of the last (feature) dim, natural order:
    ``x @ (I ⊗ H_block) / sqrt(block)``. Symmetric and orthonormal, hence its own inverse
    (QuaRot-style online rotation). Computed in float32 for half inputs, returned in x's dtype."""
    d = x.shape[-1]
    if block <= 0 or block & (block - 1) or d % block:
        raise ValueError(
            f"hadamard block must be a power of two dividing the feature dim {d}, got {block}"
        )
    work = x.to(_compute_dtype(x.dtype))
    blocks = work.reshape(-1, block).T  # [block, rows*groups]: butterflies run along dim 0
    out = (_fwht0(blocks) / math.sqrt(block)).T.reshape(x.shape)
    return out.to(x.dtype)
