"""Inductor decomposition of ``stamp::fake_quant`` into ATen ops (the ``"inductor"`` lowering).

Contract: :func:`stamp_fake_quant_decomposition` computes exactly what the op's reference
implementation (:meth:`stamp_fx.plan.SitePolicy.apply`, i.e. ``reference.py``) computes, written
only with traceable torch ops so Inductor can fuse the sequence transform, the per-token
(per-group) min/max reduction, quantize, dequantize and the inverse transform into a few generated
kernels (C++ on the CPU, Triton on CUDA) with no call back into a ``stamp::`` op. Step by step,
with ``s`` sinks and ``L = S - s`` transformed tokens along ``seq_dim``:

1. move ``seq_dim`` to the front (a view) and cast to the working dtype (float32; float64 stays);
2. ``z = cat(x[:s], T(pad(x[s:])))``: ``T`` is the transform's ``traceable`` twin;
3. the bit width of quantized token ``p`` is a function of ``p`` alone, built from an ``arange``
   and comparisons (first-``high_tokens`` rule, or the ``band_edges``/``band_bits`` plan), so it
   stays symbolic in the length instead of becoming a Python list of ``S`` entries;
4. per-token (per-group) min-max fake quantization in float32, op for op as
   :mod:`stamp_fx.quantizer` does it (so the integer codes are the same);
5. ``cat(z_hat[:s], T^-1(z_hat[s:]))`` cropped to ``S``, moved back, rounded once to ``x.dtype``.

What is decomposed: ``identity``, ``haar`` (J levels, zero-padded to a multiple of ``2**J`` with
a symbolic pad, output order ``[a_J, d_J, ..., d_1]``), ``haar2d`` (through the reference
transform object, which is plain torch code; the grid fixes the length, so the length is
guarded to ``H * W``), ``dct`` (a matmul with the DCT-II matrix, built in the graph from an
``arange`` so the length may stay symbolic; the GEMM is Inductor's extern ``mm``, not a stamp
op) and ``wht`` (the reference's butterflies on the padded power-of-two size, with the
sequency permutation as a constant index). What is not: ``klt`` takes its basis from an
eigendecomposition of the calibrated autocorrelation tensor, a data-dependent LAPACK call that
Inductor cannot fuse; the decomposition returns ``NotImplemented`` for it (and for any transform
registered later without a decomposition), which leaves that op as an extern call to the
reference implementation (:func:`ensure_extern_fallback` keeps that path open).
``stamp::fake_quant_masked`` (padded batches, see :mod:`stamp_fx.ops`) has no decomposition
at all: each row's real tokens are gathered by a data-dependent index, so Inductor calls its
reference implementation as an extern kernel (``kernel_choice`` labels it ``reference``).

Dynamic lengths: the length stays symbolic except where a concrete number is unavoidable, each
case guarded by a helper in :mod:`.symbolic` (``levels=-1`` auto Haar levels and the WHT's
power-of-two size guard on the bracket of lengths sharing the answer; sinks guard on
``S <= sink_tokens``).

Numerics: on the CPU Inductor's C++ divides exactly and does not contract multiply-adds, so the
compiled result is bit-identical to the reference for every transform but ``dct`` (its matrix is
built with Inductor's ``cos``, which may differ from eager's in the last float64 bit). On CUDA,
Inductor's Triton code multiplies by the reciprocal of constant divisors and fuses multiply-adds,
so results agree to float32 rounding before the last cast (a rare token may land on the other
side of a rounding tie, i.e. one quantization step).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from stamp_fx.plan import SitePolicy
from stamp_fx.quantizer import code_max, working_dtype
from stamp_fx.rotations import feature_rotation
from stamp_fx.transforms import block_hadamard

from .symbolic import IntLike, symbolic_length
from .traceable_transforms import (
    TransformDecomposition,
    decomposable_transforms,
    f64_scalar,
    register_transform_decomposition,
    traceable_transform,
)

# The transforms' traceable twins live in .traceable_transforms; re-exported for callers of
# this module's earlier layout.
__all__ = [
    "traceable_transform",
    "TransformDecomposition",
    "register_transform_decomposition",
    "decomposable_transforms",
    "stamp_fake_quant_traceable",
    "stamp_fake_quant_decomposition",
    "hadamard_decomposition",
    "rotate_decomposition",
    "decompositions_active",
    "token_qmax",
]

# -- quantization -----------------------------------------------------------------------------


def _band_bound(edge: float, n: IntLike, like: Tensor) -> IntLike | Tensor:
    """``round(edge * n)`` as :class:`~stamp_fx.allocation.SpectralBitPlan` computes it (Python's
    round half to even on a double); a float64 tensor when ``n`` is symbolic, where
    ``torch.round`` is the same function on the same double."""
    if isinstance(n, int):
        return round(edge * n)
    return torch.round(edge * f64_scalar(n, like))


def token_qmax(
    policy: SitePolicy, sinks: IntLike, coeffs: IntLike, *, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Largest code of every token of the quantized sequence (``sinks + coeffs`` tokens).

    Asymmetric: ``2**b - 1``; symmetric: ``2**(b-1) - 1``; ``b`` per position as
    :meth:`SitePolicy.quantized_bits` assigns it. Built from an ``arange`` so a symbolic length
    stays symbolic.
    """
    pos = torch.arange(sinks + coeffs, device=device)

    def qmax(bits: int) -> Tensor:
        return torch.full((), float(code_max(bits, policy.symmetric)), dtype=dtype, device=device)

    if policy.bands is None:
        return torch.where(pos < policy.high_tokens, qmax(policy.high_bits), qmax(policy.low_bits))
    # Bands over the coefficients; the sinks before them are at high_bits.
    k = pos - sinks
    kf = k.to(torch.float64)
    widths = policy.bands.bits
    out = qmax(widths[-1]).expand(pos.shape)
    for j in range(len(widths) - 2, -1, -1):
        bound = _band_bound(policy.bands.edges[j], coeffs, pos)
        below = (k < bound) if isinstance(bound, int) else (kf < bound)
        out = torch.where(below, qmax(widths[j]), out)
    return torch.where(k < 0, qmax(policy.high_bits), out)


def _fake_quant_rows(z: Tensor, qmax: Tensor, policy: SitePolicy) -> Tensor:
    """Per-token (per-group) min-max fake quant of ``z`` ([Q, ..., D], tokens on dim 0), with
    exactly :mod:`stamp_fx.quantizer`'s operations so the codes agree bit for bit."""
    d = z.shape[-1]
    if policy.group_size is None:
        g = z.unsqueeze(-2)
    else:
        if d % policy.group_size:
            raise ValueError(f"group_size {policy.group_size} does not divide the feature dim {d}")
        g = z.unflatten(-1, (d // policy.group_size, policy.group_size))
    qm = qmax.view([qmax.shape[0]] + [1] * (g.ndim - 1))
    tiny = torch.finfo(z.dtype).tiny
    clip = None
    if policy.clips:
        # Per token by its width, as SitePolicy.clip_vector: qmax grows with the bits.
        high = code_max(policy.high_bits, policy.symmetric)
        ratio = lambda r: torch.full((), r, dtype=z.dtype, device=z.device)  # noqa: E731
        clip = torch.where(qm >= high, ratio(policy.high_clip_ratio), ratio(policy.clip_ratio))
    if policy.symmetric:
        amax = g.abs().amax(-1, keepdim=True)
        if clip is not None:
            amax = amax * clip
        scale = (amax / qm).clamp_min(tiny)
        codes = torch.minimum(torch.maximum(torch.round(g / scale), -qm), qm)
        out = codes * scale
    else:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        scale = ((hi - lo) / qm).clamp_min(tiny)
        codes = torch.minimum(torch.round((g - lo) / scale).clamp_min(0.0), qm)
        out = codes * scale + lo
    return out.flatten(-2)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise TypeError(f"stamp::fake_quant takes a floating-point tensor, got {dtype}")
    return working_dtype(dtype)


def stamp_fake_quant_traceable(x: Tensor, policy: SitePolicy, seq_dim: int) -> Tensor:
    """:meth:`SitePolicy.apply` written for tracing (see the module docstring); also runs eagerly.

    Raises ``ValueError`` for a transform without a decomposition (see
    :func:`traceable_transform`) and for the errors the reference raises.
    """
    transform_cls = traceable_transform(policy.transform)
    if transform_cls is None:
        raise ValueError(
            f"transform {policy.transform!r} has no Inductor decomposition; decomposable: "
            f"{', '.join(decomposable_transforms())}"
        )
    seq_dim = seq_dim % x.ndim
    if seq_dim == x.ndim - 1:
        raise ValueError("seq_dim must not be the feature (last) dim")
    x0 = x.movedim(seq_dim, 0).to(_work_dtype(x.dtype))
    length = x0.shape[0]
    if policy.sink_tokens and length <= policy.sink_tokens:  # a guard when symbolic
        # Every position is a sink: plain per-token quantization, no transform.
        qmax = token_qmax(policy, length, 0, device=x.device, dtype=x0.dtype)
        return _fake_quant_rows(x0, qmax, policy).movedim(0, seq_dim).to(x.dtype).contiguous()
    sinks = policy.sink_tokens
    transform = transform_cls(policy, length - sinks)
    parts = transform.forward_parts(x0[sinks:] if sinks else x0)
    if sinks:
        parts = [x0[:sinks], *parts]
    z = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    qmax = token_qmax(policy, sinks, transform.coefficient_length, device=x.device, dtype=x0.dtype)
    z_hat = _fake_quant_rows(z, qmax, policy)
    # Back to the caller's layout and dtype *before* the final concatenation, so the output
    # buffer is written once in its final layout (no permuting copy, no float32 staging).
    restore = lambda t: t.movedim(0, seq_dim).to(x.dtype)  # noqa: E731
    if not sinks:
        return restore(transform.inverse(z_hat)).contiguous()
    head, coeffs = z_hat[:sinks], z_hat[sinks:]
    return torch.cat([restore(head), restore(transform.inverse(coeffs))], seq_dim)


def policy_of(
    transform: str,
    levels: int,
    depth_target: int,
    grid: list[int],
    sink_tokens: int,
    high_tokens: int,
    high_bits: int,
    low_bits: int,
    band_edges: list[float],
    band_bits: list[int],
    symmetric: bool,
    group_size: int,
    clip: list[float],
    autocorr: Tensor | None,
) -> SitePolicy:
    """The :class:`SitePolicy` spelled out by ``stamp::fake_quant``'s arguments (validated).

    The arguments are configuration, so symbolic ones (Dynamo makes closure ints symbolic under
    ``dynamic=True`` when the op is called from traced Python) are specialised to their value.
    """
    from stamp_fx.ops import policy_from_op_args

    concrete = lambda v: int(v) if isinstance(v, torch.SymInt) else v  # noqa: E731
    return policy_from_op_args(
        transform, concrete(levels), concrete(depth_target), [concrete(g) for g in grid],
        concrete(sink_tokens),
        concrete(high_tokens), concrete(high_bits), concrete(low_bits),
        [float(e) for e in band_edges], [concrete(b) for b in band_bits],
        bool(symmetric), concrete(group_size), [float(c) for c in clip], autocorr is not None,
    )  # fmt: skip


def stamp_fake_quant_decomposition(
    x: Tensor,
    seq_dim: int,
    transform: str,
    levels: int,
    depth_target: int,
    grid: list[int],
    sink_tokens: int,
    high_tokens: int,
    high_bits: int,
    low_bits: int,
    band_edges: list[float],
    band_bits: list[int],
    symmetric: bool,
    group_size: int,
    clip: list[float],
    autocorr: Tensor | None = None,
):
    """Decomposition of ``stamp::fake_quant.default`` (same signature as the op).

    Returns ``NotImplemented`` (Inductor then keeps the op as an extern call to the reference)
    for a transform without a traceable twin, i.e. ``klt``.
    """
    traceable = traceable_transform(transform)
    if traceable is None or autocorr is not None:
        return NotImplemented
    policy = policy_of(
        transform, levels, depth_target, grid, sink_tokens, high_tokens, high_bits,
        low_bits, band_edges, band_bits, symmetric, group_size, clip, autocorr,
    )  # fmt: skip
    if symbolic_length(x, seq_dim) and traceable.shape_depends_on_length(policy):
        # A dynamic length whose coefficient layout changes by bracket (auto Haar levels, the
        # WHT's power-of-two size): decomposing would guard on the bracket, and a length in
        # another bracket would recompile. The extern call decides per call instead (no guard).
        return NotImplemented
    return stamp_fake_quant_traceable(x, policy, seq_dim)


def hadamard_decomposition(x: Tensor, block: int) -> Tensor:
    """Decomposition of ``stamp::hadamard.default``: the reference rotation is plain torch code
    (reshape, butterflies, one division), so it is its own traceable twin."""
    return block_hadamard(x, int(block)).contiguous()


def rotate_decomposition(x: Tensor, block: int, inverse: bool) -> Tensor:
    """Decomposition of ``stamp::rotate.default``: butterflies, one small matmul by the
    rotation's core (a constant of the graph), one scale; the reference is plain torch code, so
    it is its own traceable twin, as for ``stamp::hadamard``."""
    return feature_rotation(x, int(block), bool(inverse)).contiguous()


def ensure_extern_fallback(op: torch._ops.OpOverload) -> None:
    """Give ``op`` Inductor's extern-kernel fallback up front.

    Inductor creates that fallback itself the first time it meets an op without a lowering, but
    refuses to when the op also has an entry in the decomposition table, which is the case for
    a ``stamp::fake_quant`` whose decomposition declined (``NotImplemented``, e.g. ``klt``).
    Registering the same fallback (same layout constraint as Inductor's implicit one) first
    keeps that path open; it is the lowering the ``reference`` lowering gets anyway.
    """
    from torch._inductor import lowering as inductor_lowering

    if op in inductor_lowering.lowerings:
        return
    from torch._library.utils import get_layout_constraint_tag

    tag = get_layout_constraint_tag(op, with_default=True)
    inductor_lowering.make_fallback(
        op,
        layout_constraint=inductor_lowering.tag_to_layout_constraint(tag),
        warn=False,
        override_decomp=True,
    )


_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("stamp_decompose", default=False)


def _when_active(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def gated(*args, **kwargs):
        return fn(*args, **kwargs) if _ACTIVE.get() else NotImplemented

    return gated


@functools.cache
def _install() -> None:
    """Add both decompositions to Inductor's own table, gated by :func:`decompositions_active`.

    Why not ``compile_fx(decompositions=...)``: torch 2.13 puts a custom table into the FX
    graph cache key, and Inductor's default table holds C++ functions it cannot hash, so every
    compile would bypass the cache. Outside :func:`decompositions_active` (another backend,
    the ``reference`` lowering) the entries decline and the ops stay extern calls.
    """
    from torch._inductor.decomposition import decompositions

    import stamp_fx.ops  # noqa: F401  (registers the stamp:: ops)

    for op, fn in _decomposed_ops():
        ensure_extern_fallback(op)
        decompositions[op] = _when_active(fn)


def _decomposed_ops() -> tuple:
    return (
        (torch.ops.stamp.fake_quant.default, stamp_fake_quant_decomposition),
        (torch.ops.stamp.hadamard.default, hadamard_decomposition),
        (torch.ops.stamp.rotate.default, rotate_decomposition),
    )


def _refresh_inductor_table() -> None:
    """Make Inductor's table in use hold our entries.

    Inductor hands AOTAutograd ``select_decomp_table()``, which (without ``fallback_random``)
    is ``fast_random_decomps()``: a *copy* of ``decompositions`` memoised by
    ``functools.cache`` on its first call. A process that compiled anything with Inductor
    before our first compile (``backend="inductor"`` as a baseline, another model) kept a copy
    without our entries, and every stamp op then ran as an extern call to the reference
    (measured on an H200: PixArt-Sigma, 28 blocks, haar2d + Hadamard, 25x the inductor
    latency). Dropping the memoised copy makes the next call rebuild it from the full table;
    the copy holds only decompositions, so rebuilding it changes nothing else."""
    from torch._inductor import decomposition

    memoised = getattr(decomposition, "fast_random_decomps", None)
    if hasattr(memoised, "cache_clear"):
        memoised.cache_clear()


def _check_inductor_table() -> None:
    """Our entries are in the table Inductor will use: the memoised copy is rebuilt when it
    lacks them (one made before :func:`_install`, see :func:`_refresh_inductor_table`), or a
    warning says that the stamp ops will run as extern reference calls. Run at every
    activation, so a copy memoised at any time is caught."""
    from torch._inductor.decomposition import select_decomp_table

    ops = [op for op, _ in _decomposed_ops()]
    if all(op in select_decomp_table() for op in ops):
        return
    _refresh_inductor_table()
    if not all(op in select_decomp_table() for op in ops):
        import warnings

        warnings.warn(
            "stamp: Inductor's decomposition table lacks the stamp ops' decompositions; "
            "stamp::fake_quant, stamp::hadamard and stamp::rotate will run as extern calls to "
            "the reference",
            stacklevel=3,
        )


@contextlib.contextmanager
def decompositions_active(active: bool = True) -> Iterator[None]:
    """Within the block, Inductor decomposes ``stamp::fake_quant``, ``stamp::hadamard`` and
    ``stamp::rotate`` (a compile of the ``inductor`` / ``auto`` lowerings runs inside it)."""
    _install()
    if active:
        _check_inductor_table()
    token = _ACTIVE.set(active)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
