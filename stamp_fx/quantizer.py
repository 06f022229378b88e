"""Per-token (and per-group) min-max fake quantization with a bit width per token.

Pure functions. Layout convention: the *last* dim holds the features that one scale covers (all
of them per token, or groups of ``group_size`` channels); ``token_dim`` is the sequence axis along
which bit widths may vary; every other dim is a batch dim.

* Asymmetric (default): ``lo = min``, ``scale = (max - min) / (2**b - 1)``,
  ``code = round((x - lo) / scale)`` in ``0 .. 2**b - 1``, ``x_hat = code * scale + lo``.
  The zero point is the float offset ``lo`` (an integer kernel applies it as the rank-1
  correction ``lo * colsum(W)``), so every element is within half a step of its input.
* Symmetric: ``scale = max|x| / (2**(b-1) - 1)``, ``code`` in ``-(2**(b-1)-1) .. 2**(b-1)-1``.
* Clipping (``clip``, a ratio ``0 < c <= 1`` per token): the range shrinks toward zero before
  the step is taken (``lo * c``, ``hi * c``; symmetric ``max|x| * c``), and codes are clamped to
  the grid, so the values outside the clipped range saturate. ``c = 1`` is exactly min-max.

Tensor parallelism: ``reduce_range(lo, hi) -> (lo, hi)`` (None on one device) combines the
per-(token, group) range of this rank's feature shard with the other ranks' before the scales are
formed, so every rank quantizes with the range one device would compute over all features
(:mod:`stamp_fx.sharded_ops`). Min and max are exact, so the combined range is bit-identical.

Scales and offsets are float32 whatever the input dtype (float64 input stays float64, for
oracles). A constant token or an all-zero padding token has ``scale == 0``; it is clamped to the
smallest normal float so it never divides by zero and dequantizes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# The range and its check live in bitwidths (torch-free, for allocation); re-exported here.
from .bitwidths import MAX_BITS, MIN_BITS, is_finite_number, validate_bits

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "TokenBits",
    "BitsSpec",
    "ClipSpec",
    "validate_clip_ratio",
    "RangeReducer",
    "validate_bits",
    "working_dtype",
    "code_max",
    "token_bit_vector",
    "QuantParams",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quant",
]


@dataclass(frozen=True, slots=True)
class TokenBits:
    """Compact bit vector: the first ``high_tokens`` tokens at ``high_bits``, the rest at
    ``low_bits`` (the paper's rule is ``TokenBits(64, 8, 4)``)."""

    high_tokens: int
    high_bits: int = 8
    low_bits: int = 4

    def __post_init__(self) -> None:
        if (
            isinstance(self.high_tokens, bool)
            or not isinstance(self.high_tokens, int)
            or self.high_tokens < 0
        ):
            raise ValueError(f"high_tokens must be a non-negative int, got {self.high_tokens!r}")
        validate_bits(self.high_bits, "high_bits")
        validate_bits(self.low_bits, "low_bits")

    def vector(self, length: int) -> list[int]:
        k = min(self.high_tokens, length)
        return [self.high_bits] * k + [self.low_bits] * (length - k)

    def average(self, length: int) -> float:
        return sum(self.vector(length)) / max(1, length)


BitsSpec = int | TokenBits | Sequence[int] | Tensor
"""One width for every token, the compact first-k form, or one width per token."""

RangeReducer = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(lo, hi) -> (lo, hi)``: the range over every rank's feature shard (see the module docstring)."""


def token_bit_vector(bits: BitsSpec, length: int) -> list[int]:
    """Expand any :data:`BitsSpec` to a validated list of ``length`` ints."""
    if isinstance(bits, TokenBits):
        return bits.vector(length)
    if isinstance(bits, Tensor):
        if bits.is_floating_point() or bits.ndim != 1:
            raise ValueError("a bits tensor must be a 1-D integer tensor (one width per token)")
        bits = bits.tolist()
    if not isinstance(bits, Sequence) or isinstance(bits, str):
        return [validate_bits(bits)] * length  # a scalar (or a wrong type: the error says so)
    vec = [validate_bits(b, "bits[i]") for b in bits]
    if len(vec) != length:
        raise ValueError(f"bits has {len(vec)} entries but the sequence has {length} tokens")
    return vec


@dataclass(frozen=True, slots=True)
class QuantParams:
    """Per-(token, group) scale and offset, float32, shaped like the input with the feature
    dim split into ``[n_groups, 1]``; ``qmin``/``qmax`` broadcast against them."""

    scale: Tensor
    offset: Tensor
    qmin: Tensor
    qmax: Tensor
    symmetric: bool


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype STaMP computes in for inputs of ``dtype``: float64 stays float64 (oracles),
    everything else (float32, bfloat16, float16) is computed in float32 and rounded once at the
    end. The one definition for the reference, the transforms, the quantizer and weights
    (``lowering/decompositions.py`` adds its floating-point check in front of it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x: Tensor, group_size: int | None) -> Tensor:
    """View ``x`` as [..., n_groups, group] (one group of all features when ``group_size`` is None)."""
    d = x.shape[-1]
    if group_size is None:
        return x.unsqueeze(-2)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(
            f"group_size must be a positive int or None (per token), got {group_size!r}"
        )
    if d % group_size:
        raise ValueError(f"group_size {group_size} does not divide the feature dim {d}")
    return x.unflatten(-1, (d // group_size, group_size))


def _bits_tensor(bits: BitsSpec, x: Tensor, token_dim: int) -> Tensor:
    """Bits as a float tensor broadcastable against the grouped view [..., n_groups, 1]."""
    token_dim = token_dim % x.ndim
    if token_dim == x.ndim - 1:
        raise ValueError("token_dim must not be the feature (last) dim")
    vec = token_bit_vector(bits, x.shape[token_dim])
    shape = [1] * (x.ndim + 1)
    shape[token_dim] = len(vec)
    return torch.tensor(vec, dtype=working_dtype(x.dtype), device=x.device).view(shape)


ClipSpec = float | Sequence[float] | None
"""Clip ratio of every token, one per token, or None (min-max, no clipping)."""


def code_max(bits: int, symmetric: bool) -> int:
    """Largest integer code of a ``bits``-wide grid: ``2**(b-1) - 1`` symmetric, ``2**b - 1``
    asymmetric (the grid :func:`compute_qparams` forms; kernels and decompositions take it
    from here)."""
    return 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1


def validate_clip_ratio(value: object, name: str = "clip_ratio") -> float:
    """A clip ratio: a number in (0, 1] (1 = the min-max range); raises ``ValueError`` naming
    ``name`` otherwise. The one check for every clip ratio (configs, policies, the search)."""
    if not is_finite_number(value) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name}: must be a number in (0, 1] (1 = no clipping), got {value!r}")
    return float(value)


def _clip_tensor(clip: ClipSpec, x: Tensor, token_dim: int) -> Tensor | None:
    """Clip ratios broadcastable like :func:`_bits_tensor`'s bits, or None when nothing clips."""
    token_dim = token_dim % x.ndim
    if clip is None:
        return None
    if not isinstance(clip, Sequence):
        ratio = validate_clip_ratio(clip, "clip")
        if ratio == 1.0:
            return None
        return torch.tensor(ratio, dtype=working_dtype(x.dtype), device=x.device)
    vec = [validate_clip_ratio(c, "clip[i]") for c in clip]
    if len(vec) != x.shape[token_dim]:
        raise ValueError(f"clip has {len(vec)} entries but the sequence has {x.shape[token_dim]}")
    if all(c == 1.0 for c in vec):
        return None
    shape = [1] * (x.ndim + 1)
    shape[token_dim] = len(vec)
    return torch.tensor(vec, dtype=working_dtype(x.dtype), device=x.device).view(shape)


def compute_qparams(
    x: Tensor,
    bits: BitsSpec,
    *,
    token_dim: int = -2,
    symmetric: bool = False,
    group_size: int | None = None,
    clip: ClipSpec = None,
    reduce_range: RangeReducer | None = None,
) -> QuantParams:
    """Min-max scales/offsets for ``x`` (see the module docstring for the layout and
    ``reduce_range``), the range shrunk by ``clip`` where given (after any reduction, so a
    sharded token is clipped like the whole one)."""
    pdt = working_dtype(x.dtype)
    g = _grouped(x, group_size).to(pdt)
    b = _bits_tensor(bits, x, token_dim)
    c = _clip_tensor(clip, x, token_dim)
    tiny = torch.finfo(pdt).tiny
    if symmetric:
        qmax = torch.exp2(b - 1) - 1
        amax = g.abs().amax(-1, keepdim=True)
        if reduce_range is not None:
            amax = reduce_range(-amax, amax)[1]
        if c is not None:
            amax = amax * c
        scale = (amax / qmax).clamp_min(tiny)
        return QuantParams(scale, torch.zeros_like(scale), -qmax, qmax, True)
    qmax = torch.exp2(b) - 1
    lo = g.amin(-1, keepdim=True)
    hi = g.amax(-1, keepdim=True)
    if reduce_range is not None:
        lo, hi = reduce_range(lo, hi)
    if c is not None:
        lo, hi = lo * c, hi * c
    scale = ((hi - lo) / qmax).clamp_min(tiny)
    return QuantParams(scale, lo, torch.zeros_like(qmax), qmax, False)


def quantize(x: Tensor, params: QuantParams, *, group_size: int | None = None) -> Tensor:
    """Integer codes (as float values in the parameter dtype), grouped layout [..., n_groups, G]."""
    g = _grouped(x, group_size).to(params.scale.dtype)
    codes = torch.round((g - params.offset) / params.scale)
    return torch.minimum(torch.maximum(codes, params.qmin), params.qmax)


def dequantize(codes: Tensor, params: QuantParams, dtype: torch.dtype) -> Tensor:
    """``codes * scale + offset`` back in the ungrouped layout and ``dtype``."""
    return (codes * params.scale + params.offset).flatten(-2).to(dtype)


def fake_quant(
    x: Tensor,
    bits: BitsSpec,
    *,
    token_dim: int = -2,
    symmetric: bool = False,
    group_size: int | None = None,
    clip: ClipSpec = None,
    reduce_range: RangeReducer | None = None,
) -> Tensor:
    """Quantize then dequantize ``x`` with per-token (per-group) min-max ranges (shrunk by
    ``clip``)."""
    params = compute_qparams(
        x, bits, token_dim=token_dim, symmetric=symmetric, group_size=group_size, clip=clip,
        reduce_range=reduce_range,
    )  # fmt: skip
    return dequantize(quantize(x, params, group_size=group_size), params, x.dtype)
