"""THE SPEC: pure-PyTorch STaMP fake quantization. Every faster path is tested against it.

``stamp_fake_quant_ref(x)`` with ``s = sink_tokens`` and transform ``T`` along ``seq_dim``:

1. split the sequence into the first ``s`` raw positions (attention sinks) and the rest;
2. ``z = concat(x[:s], T(x[s:]))``: the "quantized token sequence" of ``s + T.coefficient_length(S - s)``
   tokens (sinks first, then the transformed tokens, low frequencies first);
3. fake-quantize ``z`` per token (per group) with the bit vector ``bits`` laid over that sequence,
   so ``TokenBits(64, 8, 4)`` puts the sinks and the first ``64 - s`` coefficients at 8 bits;
4. return ``concat(z_hat[:s], T^-1(z_hat[s:]))`` cropped to ``S`` tokens, in ``x``'s dtype.

float16/bfloat16 inputs are computed in float32 throughout and rounded once at the end.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import StampConfig
from .quantizer import (
    BitsSpec,
    ClipSpec,
    RangeReducer,
    TokenBits,
    fake_quant,
    token_bit_vector,
    working_dtype,
)
from .site_hooks import hook_sites
from .transforms import SequenceTransform, make_transform

PAPER_BITS = TokenBits(64, 8, 4)
"""The paper's rule: the first 64 transformed tokens at 8 bits, the rest at 4."""

__all__ = [
    "PAPER_BITS",
    "clamp_sinks",
    "stamp_fake_quant_ref",
    "stamp_fake_quant_config_ref",
    "transformed_tokens",
    "transformed_token_energies",
    "theorem1_bound",
    "sqnr_db",
]


def _as_transform(transform: str | SequenceTransform) -> SequenceTransform:
    return make_transform(transform) if isinstance(transform, str) else transform


def clamp_sinks(sink_tokens: int, length: int) -> int:
    """Step 1's split point, ``min(sink_tokens, length)``: a sequence shorter than the sinks is
    all sinks. Asks a symbolic ``length`` only whether the sequence is all sinks (one guard);
    ``lowering/symbolic`` re-exports it among the lowering's guards."""
    if sink_tokens == 0:
        return 0
    if length <= sink_tokens:  # a guard when `length` is symbolic
        return length
    return sink_tokens


def _check_sinks(sink_tokens: int) -> None:
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be a non-negative int, got {sink_tokens!r}")


def transformed_tokens(
    x: Tensor,
    transform: str | SequenceTransform = "haar",
    *,
    sink_tokens: int = 0,
    seq_dim: int = -2,
) -> Tensor:
    """Step 2 of the spec: ``concat(x[:s], T(x[s:]))`` along ``seq_dim`` in the working dtype."""
    _check_sinks(sink_tokens)
    t = _as_transform(transform)
    xw = x.to(working_dtype(x.dtype))
    s = clamp_sinks(sink_tokens, x.shape[seq_dim])
    sinks, rest = xw.split([s, x.shape[seq_dim] - s], seq_dim)
    if rest.shape[seq_dim] == 0:
        return sinks
    return torch.cat([sinks, t.forward(rest, seq_dim)], seq_dim)


def _untransform(z: Tensor, t: SequenceTransform, sinks: int, length: int, seq_dim: int) -> Tensor:
    if length == sinks:
        return z
    head, coeffs = z.split([sinks, z.shape[seq_dim] - sinks], seq_dim)
    return torch.cat([head, t.inverse(coeffs, seq_dim, length=length - sinks)], seq_dim)


def stamp_fake_quant_ref(
    x: Tensor,
    *,
    transform: str | SequenceTransform = "haar",
    bits: BitsSpec = PAPER_BITS,
    sink_tokens: int = 0,
    symmetric: bool = False,
    group_size: int | None = None,
    seq_dim: int = -2,
    clip: ClipSpec = None,
    reduce_range: RangeReducer | None = None,
) -> Tensor:
    """STaMP fake quantization of ``x`` (features in the last dim); see the module docstring.

    ``bits`` is an int, a :class:`TokenBits` or one width per token of the quantized sequence
    (``sink_tokens + transform.coefficient_length(S - sink_tokens)`` entries); ``clip`` one
    ratio for all of them or one per token (:mod:`stamp_fx.quantizer`).
    ``reduce_range`` (tensor parallelism: ``x`` is one rank's feature shard) combines step 3's
    per-token ranges across the shards (:mod:`stamp_fx.quantizer`); steps 2 and 4 act on each
    feature column alone, so they need no communication.
    """
    seq_dim = seq_dim % x.ndim
    if seq_dim == x.ndim - 1:
        raise ValueError("seq_dim must not be the feature (last) dim")
    t = _as_transform(transform)
    length = x.shape[seq_dim]
    s = clamp_sinks(sink_tokens, length)
    z = transformed_tokens(x, t, sink_tokens=s, seq_dim=seq_dim)
    z_hat = fake_quant(
        z, bits, token_dim=seq_dim, symmetric=symmetric, group_size=group_size, clip=clip,
        reduce_range=reduce_range,
    )  # fmt: skip
    return _untransform(z_hat, t, s, length, seq_dim).to(x.dtype)


def stamp_fake_quant_config_ref(
    x: Tensor,
    config: StampConfig,
    *,
    seq_dim: int = -2,
    causal: bool = False,
    grid: tuple[int, int] | None = None,
    bits: BitsSpec | None = None,
    **transform_params,
) -> Tensor:
    """:func:`stamp_fake_quant_ref` with every choice taken from a :class:`StampConfig`.

    ``bits`` defaults to the config's first-``high_tokens`` rule. A config with ``avg_bits``
    (solver budget) needs its allocation passed in as ``bits``, since energies come from
    calibration (``stamp_fx.solve_token_bits``), not from the input being quantized.
    """
    if bits is None:
        if config.avg_bits is not None:
            raise ValueError(
                "config.avg_bits asks for solver-allocated bits: pass bits= (for example "
                "stamp_fx.solve_token_bits(energies, config.avg_bits, config.allowed_bits))"
            )
        bits = config.token_bits()
    return stamp_fake_quant_ref(
        x,
        transform=config.make_transform(grid=grid, **transform_params),
        bits=bits,
        sink_tokens=config.resolved_sink_tokens(causal=causal),
        symmetric=config.symmetric,
        group_size=config.group_size,
        seq_dim=seq_dim,
    )


def transformed_token_energies(
    x: Tensor,
    transform: str | SequenceTransform = "haar",
    *,
    sink_tokens: int = 0,
    seq_dim: int = -2,
) -> Tensor:
    """``e_i = ||z_i||^2`` summed over every dim but ``seq_dim`` (float64), for the solver."""
    z = transformed_tokens(x, transform, sink_tokens=sink_tokens, seq_dim=seq_dim).to(torch.float64)
    seq_dim = seq_dim % x.ndim
    dims = [d for d in range(z.ndim) if d != seq_dim]
    return z.square().sum(dims) if dims else z.square()


def theorem1_bound(
    x: Tensor,
    *,
    transform: str | SequenceTransform = "haar",
    bits: BitsSpec = PAPER_BITS,
    sink_tokens: int = 0,
    symmetric: bool = False,
    group_size: int | None = None,
    seq_dim: int = -2,
) -> float:
    """Upper bound on ``||stamp_fake_quant_ref(x) - x||^2`` (summed over the batch).

    Asymmetric (Theorem 1): ``(d/2) * sum_i e_i / (2**b_i - 1)**2`` with ``d`` the features per
    range (``group_size`` or the feature dim). Per range the error is at most ``d`` half-steps
    squared and ``(max - min)**2 <= 2 * ||range||**2``; an orthonormal inverse (and cropping)
    never increases the error norm. Symmetric: ``(d/4) * sum_i e_i / (2**(b_i-1) - 1)**2``.
    """
    t = _as_transform(transform)
    energies = transformed_token_energies(x, t, sink_tokens=sink_tokens, seq_dim=seq_dim)
    vec = token_bit_vector(bits, energies.numel())
    d = group_size or x.shape[-1]
    total = 0.0
    for e, b in zip(energies.tolist(), vec, strict=True):
        total += e / ((2 ** (b - 1) - 1) ** 2 * 4) if symmetric else e / (2 * (2**b - 1) ** 2)
    return d * total


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - approx||^2)`` in dB
    (float64; ``inf`` when they are equal)."""
    ref = reference.to(torch.float64)
    noise = (ref - approx.to(torch.float64)).square().sum().item()
    signal = ref.square().sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# -- eager, hook-based application of a plan (no FX) -----------------------------------------


def _unhookable(key: str, slot: str) -> ValueError:
    if "#" in slot:
        return ValueError(f"site {key!r}: a module called several times cannot be hooked per call")
    return ValueError(f"site {key!r}: unknown slot {slot!r} (expected in, k or v)")


def apply_plan_eager(model: torch.nn.Module, plan) -> list:
    """Apply an ``AllocationPlan`` to ``model`` with forward pre-hooks built on this module's
    reference; returns the hook handles (call ``.remove()`` on each to undo).

    ``fqn:in`` sites quantize the first positional input of module ``fqn`` (``[B, S, D]``,
    sequence axis 1); ``fqn:k`` / ``fqn:v`` sites quantize key/value of every
    ``scaled_dot_product_attention`` call made inside module ``fqn`` (sequence axis 2).
    This is the independent oracle the compiled backend is tested against.
    """

    policies = dict(plan.sites)  # as planned now, like a hook that captured its policy

    def quantize(key: str, x: Tensor) -> Tensor:
        if key.endswith(":in"):
            if x.ndim != 3:
                raise ValueError(
                    f"site {key!r}: expected a [batch, seq, features] input, got {tuple(x.shape)}"
                )
            return policies[key].apply(x, 1, plan.tensors)
        return policies[key].apply(x, 2, plan.tensors)

    return hook_sites(model, policies, quantize, unhookable=_unhookable)
