"""Orthonormal feature-axis rotations of any order: the online rotation around the quantizer.

Contract: :func:`feature_rotation` ``(x, block, inverse)`` returns ``x @ (I ⊗ R_block)`` over the
last (feature) dim, or ``x @ (I ⊗ R_block)^T`` with ``inverse``, where ``R_block`` is the
orthonormal matrix :func:`rotation_plan` picks for ``block`` (which must divide the features):

* ``block`` a power of two: the Sylvester (Walsh-Hadamard) matrix, computed by exactly
  :func:`stamp_fx.transforms.block_hadamard` (so the historical block rotation is bit-identical);
* else ``block = m * 2**k`` with a known Hadamard matrix of order ``m`` (a Paley construction
  from :data:`HADAMARD_CONSTRUCTIONS`, the smallest such ``m``): ``R = (H_m ⊗ H_{2^k}) / sqrt(block)``,
  entries ``±1/sqrt(block)`` (576 = 36 x 16, 1536 = 12 x 128, 14336 = 28 x 512);
* else (no Hadamard of any ``m = odd * 2**j`` is known here): a seeded random orthogonal core of
  the odd order ``m``, ``R = Q_m ⊗ H_{2^k} / sqrt(2**k)``, a dense matmul only when ``k = 0``.

Cost per element: ``log2(2**k)`` butterflies plus one length-``m`` dot product (a matmul of the
features reshaped ``[rows, 2**k, m]`` by the small ``m x m`` core). Everything is plain torch code,
so the same function is the reference (``stamp::rotate``) and its own Inductor decomposition.
Half inputs are computed in float32 and returned in their own dtype, like every transform here.

Determinism: the random core is generated on the CPU in float64 from :data:`ROTATION_SEED` (QR of a
Gaussian, signs fixed so ``diag(R) > 0``), then cast and moved, so every run and device uses the
same matrix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._guards import detect_fake_mode

from .transforms import _compute_dtype, _fwht0, block_hadamard, feature_block_size

__all__ = [
    "FEATURE_BLOCKS",
    "HADAMARD_CONSTRUCTIONS",
    "HadamardConstruction",
    "ROTATION_SEED",
    "FeatureRotation",
    "register_hadamard",
    "hadamard_matrix",
    "random_orthogonal",
    "rotation_plan",
    "resolve_block",
    "validate_feature_block",
    "feature_rotation",
]

FEATURE_BLOCKS = ("pow2", "full")
"""Named rotation blocks: ``"pow2"`` the largest power of two dividing the features (the
historical default), ``"full"`` one rotation over all features. A positive int is a fixed block."""

ROTATION_SEED = 20251026
"""Seed of the random orthogonal cores (fixed: a plan must mean the same rotation everywhere)."""


@dataclass(frozen=True, slots=True)
class HadamardConstruction:
    """``applies(n)``: whether ``build(n)`` makes a ±1 Hadamard matrix of order ``n`` (cheap, so
    the search over cores never builds a matrix it does not use)."""

    applies: Callable[[int], bool]
    build: Callable[[int], list[list[int]]]


HADAMARD_CONSTRUCTIONS: dict[str, HadamardConstruction] = {}
"""Hadamard constructions by name; :func:`hadamard_matrix` tries them in registration order."""


def register_hadamard(name: str, applies: Callable[[int], bool]) -> Callable:
    def deco(build: Callable[[int], list[list[int]]]) -> Callable:
        if name in HADAMARD_CONSTRUCTIONS:
            raise ValueError(f"hadamard construction {name!r} is already registered")
        HADAMARD_CONSTRUCTIONS[name] = HadamardConstruction(applies, build)
        return build

    return deco


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> list[list[int]]:
    """``Q[i][j] = chi(j - i)`` with chi the quadratic character of the prime field GF(q)."""
    squares = {k * k % q for k in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    return [[chi[(j - i) % q] for j in range(q)] for i in range(q)]


@register_hadamard("sylvester", lambda n: n >= 1 and n & (n - 1) == 0)
def _sylvester(n: int) -> list[list[int]]:
    h = [[1]]
    while len(h) < n:
        h = [row + row for row in h] + [row + [-v for v in row] for row in h]
    return h


@register_hadamard("paley1", lambda n: (n - 1) % 4 == 3 and _is_prime(n - 1))
def _paley1(n: int) -> list[list[int]]:
    """Order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``: ``I + S``, S the skew bordered Jacobsthal
    matrix ``[[0, 1ᵀ], [-1, Q]]`` (Q is skew because chi(-1) = -1)."""
    q = n - 1
    jac = _jacobsthal(q)
    s = [[0] + [1] * q] + [[-1] + jac[i] for i in range(q)]
    return [[s[i][j] + (i == j) for j in range(n)] for i in range(n)]


@register_hadamard(
    "paley2", lambda n: n % 2 == 0 and (n // 2 - 1) % 4 == 1 and _is_prime(n // 2 - 1)
)
def _paley2(n: int) -> list[list[int]]:
    """Order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)``: the symmetric conference matrix
    ``C = [[0, 1ᵀ], [1, Q]]`` with each 0 replaced by ``[[1, -1], [-1, -1]]`` and each ±1 by
    ``±[[1, 1], [1, -1]]``."""
    q = n // 2 - 1
    jac = _jacobsthal(q)
    c = [[0] + [1] * q] + [[1] + jac[i] for i in range(q)]
    zero, one = ((1, -1), (-1, -1)), ((1, 1), (1, -1))
    h = []
    for row in c:
        for r in range(2):
            h.append([e * one[r][t] if e else zero[r][t] for e in row for t in range(2)])
    return h


@functools.lru_cache(maxsize=64)
def hadamard_matrix(n: int) -> Tensor | None:
    """A ±1 Hadamard matrix of order ``n`` (float64, CPU, ``H Hᵀ = n I``: checked for every
    construction by the tests), or None when no registered construction builds that order."""
    for construction in HADAMARD_CONSTRUCTIONS.values():
        if construction.applies(n):
            return torch.tensor(construction.build(n), dtype=torch.float64)
    return None


@functools.lru_cache(maxsize=64)
def random_orthogonal(n: int, seed: int = ROTATION_SEED) -> Tensor:
    """Seeded random orthogonal ``n x n`` matrix (float64, CPU): QR of a Gaussian with the signs
    fixed so R's diagonal is positive (what makes it Haar-distributed and reproducible)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return (q * signs).contiguous()


@dataclass(frozen=True, slots=True)
class FeatureRotation:
    """``R_block = core ⊗ H_{block/core} / norm``: ``kind`` names the core (a Hadamard
    construction or ``"random"``), ``core`` its order (1 for a pure Sylvester block)."""

    block: int
    core: int
    kind: str

    @property
    def is_hadamard(self) -> bool:
        return self.kind != "random"

    def core_matrix(self) -> Tensor:
        """The core, float64 on the CPU, scaled so the whole rotation is orthonormal."""
        if self.kind == "random":
            return random_orthogonal(self.core) / math.sqrt(self.block // self.core)
        return hadamard_matrix(self.core) / math.sqrt(self.block)

    def matrix(self) -> Tensor:
        """The dense ``block x block`` rotation (float64), for tests and reports."""
        return feature_rotation(torch.eye(self.block, dtype=torch.float64), self.block)

    def describe(self) -> str:
        pow2 = self.block // self.core
        if self.core == 1:
            return f"hadamard({self.block})"
        return f"{self.kind}({self.core})x{pow2}"


@functools.lru_cache(maxsize=256)
def rotation_plan(block: int) -> FeatureRotation:
    """The rotation used for ``block``: Sylvester for a power of two, else the smallest Hadamard
    core ``m = odd * 2**j`` a construction builds (the cheapest dense part), else a random core
    of the odd part."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"rotation block must be a positive int, got {block!r}")
    pow2 = block & -block
    odd = block // pow2
    if odd == 1:
        return FeatureRotation(block, 1, "sylvester")
    core = odd
    while block % core == 0:
        for name, construction in HADAMARD_CONSTRUCTIONS.items():
            if construction.applies(core):
                return FeatureRotation(block, core, name)
        core *= 2
    return FeatureRotation(block, odd, "random")


def validate_feature_block(value: object, option: str = "feature_block") -> str | int:
    """``"pow2"``, ``"full"`` or a positive int; anything else raises naming ``option``."""
    if value in FEATURE_BLOCKS:
        return value  # type: ignore[return-value]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(
        f"{option}: must be one of {', '.join(repr(b) for b in FEATURE_BLOCKS)} or a positive "
        f"int (a fixed rotation block dividing the features), got {value!r}"
    )


def resolve_block(spec: str | int, features: int) -> int:
    """The rotation block for ``features`` channels under a ``feature_block`` setting."""
    if spec == "pow2":
        return feature_block_size(features)
    if spec == "full":
        return features
    block = validate_feature_block(spec)
    if features % block:
        raise ValueError(f"feature_block {block} does not divide the {features} features")
    return block


def _oriented(rotation: FeatureRotation, inverse: bool) -> Tensor:
    # The transposed core is stored contiguous: a transposed view would reach BLAS with a
    # transpose flag in eager but as a materialised constant under Inductor, and the two
    # kernels round differently; one layout for both keeps compiled == reference exactly.
    core = rotation.core_matrix()
    return core.T.contiguous() if inverse else core


@functools.lru_cache(maxsize=64)
def _core_on(
    rotation: FeatureRotation, inverse: bool, dtype: torch.dtype, device: torch.device
) -> Tensor:
    # Cached per dtype/device: a host-to-device copy per forward would dominate small sites.
    return _oriented(rotation, inverse).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _core_values(rotation: FeatureRotation, inverse: bool) -> list:
    # Outside the tracer's modes: the construction is plain eager code.
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return _oriented(rotation, inverse).tolist()


def _core_for(rotation: FeatureRotation, inverse: bool, like: Tensor) -> Tensor:
    """The core (transposed for ``inverse``) as a tensor usable with ``like``. Under a tracer
    (Inductor's decomposition, fake tensors) a cached real tensor cannot enter the graph;
    ``torch.tensor`` of plain values is how a trace takes a constant (once per compile)."""
    if detect_fake_mode((like,)) is not None:
        values = _core_values(rotation, inverse)
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    return _core_on(rotation, inverse, like.dtype, like.device)


def feature_rotation(x: Tensor, block: int, inverse: bool = False) -> Tensor:
    """``x @ (I ⊗ R_block)`` over the last dim (``R_blockᵀ`` with ``inverse``); see the module
    docstring. A power-of-two block is :func:`block_hadamard` itself (symmetric: ``inverse`` is
    the same map)."""
    d = x.shape[-1]
    rotation = rotation_plan(int(block))
    if d % rotation.block:
        raise ValueError(f"rotation block {rotation.block} does not divide the feature dim {d}")
    if rotation.core == 1:
        return block_hadamard(x, rotation.block)
    m, pow2 = rotation.core, rotation.block // rotation.core
    work = x.to(_compute_dtype(x.dtype))
    if pow2 > 1:
        # Butterflies along the power-of-two axis (index i = a * pow2 + c, c fastest).
        work = _fwht0(work.reshape(-1, pow2).T).T
    # y[a', c] = sum_a x[a, c] core[a, a']: one 2-d [rows * pow2, m] @ [m, m] matmul (a 3-d
    # matmul may be folded differently by eager and by Inductor, and round differently).
    z = work.reshape(-1, m, pow2).transpose(1, 2).reshape(-1, m)
    z = torch.mm(z, _core_for(rotation, inverse, work))
    return z.reshape(-1, pow2, m).transpose(1, 2).reshape(x.shape).to(x.dtype)
