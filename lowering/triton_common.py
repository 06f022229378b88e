"""Device functions shared by the hand-written Haar kernels (:mod:`.triton_haar`,
:mod:`.haar_rows`): multiplies and divisions that round exactly like the reference's separate
torch ops, round-half-even, min/max combine functions and the per-row quantizer parameters.

Reductions take this module's own combine functions rather than tl.max / tl.min (and no
kernel calls tl.cdiv or any other triton.language.standard helper): those are @triton.jit
functions decorated when triton is first imported, so they would not run in the interpreter
if triton had been imported before TRITON_INTERPRET=1 was set (as in a pytest session that
imports Inductor first). Every device function the kernels call is defined in this package
and decorated when the kernels are; tests/unit/test_triton_haar.py checks it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))  # the double the reference multiplies by
TINY = tl.constexpr(torch.finfo(torch.float32).tiny)
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
# What one launch of a kernel does (both kernels, see triton_haar's schedules).
_MODE_LOCAL, _MODE_FUSED, _MODE_STATS, _MODE_APPLY = (tl.constexpr(m) for m in range(4))
CHUNK_BLOCK = tl.constexpr(32)  # partial ranges folded per step (see _fold_ranges)


@triton.jit
def _mul(a, b, EXACT: tl.constexpr):
    """``a * b`` rounded on its own. With ``EXACT`` (compiled GPU code) it is PTX ``mul.rn``,
    which the compiler never contracts with a neighbouring add into an FMA, so the butterflies
    and the dequantization round exactly like the reference's separate torch ops; the
    interpreter (NumPy) never fuses, so it multiplies plainly."""
    if EXACT:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a * b


@triton.jit
def _by_inv_sqrt2(a, EXACT: tl.constexpr):
    return _mul(a, tl.full(a.shape, INV_SQRT2, tl.float32), EXACT)


@triton.jit
def _rint(v):
    """Round half to even (``torch.round``) for ``|v| < 2**22``: adding 1.5 * 2**23 leaves no
    fraction bits, so the adder's own round-to-nearest-even does it. Larger ``|v|`` do not
    occur: every quotient lies within the code range (see :func:`_fake_quant`)."""
    return (v + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def _quantizer_params(hi, lo, pos, high_tokens, qmax_high, qmax_low, SYMMETRIC: tl.constexpr):
    """Offset, scale and reciprocal scale of coefficient rows with range ``[lo, hi]`` (``hi`` =
    ``max |z|`` when symmetric) at quantized positions ``pos``, rounded as the reference rounds
    them (IEEE divisions)."""
    # Largest codes arrive as ints (exact at any width) and become float32 here: Inductor
    # passes Python floats to user kernels as float64.
    qmax = tl.where(pos < high_tokens, qmax_high, qmax_low).to(tl.float32)
    if SYMMETRIC:
        scale = tl.maximum(tl.math.div_rn(hi, qmax), TINY)
        offset = hi * 0.0
    else:
        scale = tl.maximum(tl.math.div_rn(hi - lo, qmax), TINY)
        offset = lo
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    return offset, scale, inv


@triton.jit
def _divide(d, scale, inv, EXACT: tl.constexpr):
    """``d / scale`` rounded like IEEE division, from the reciprocal ``inv = RN(1 / scale)``.

    ``q = RN(d * inv)`` is within 1.5 ulps of the quotient; one correction ``q + r * inv``
    with the exact residual ``r = d - scale * q`` (an FMA) brings it within one ulp, and a
    second is then the correctly rounded quotient (Markstein's theorem: ``inv`` correctly
    rounded, ``q`` within one ulp). One correction alone is measurably not enough (a few
    quotients in 10**7 adversarial ones stay one ulp off). Five instructions, no branch. The
    interpreter divides directly (NumPy's float32 division is IEEE)."""
    if EXACT:
        q = _mul(d, inv, EXACT)
        q = tl.fma(tl.fma(-scale, q, d), inv, q)
        return tl.fma(tl.fma(-scale, q, d), inv, q)
    else:
        return tl.math.div_rn(d, scale)


@triton.jit
def _fold_ranges(part_ptr, slot, chunks, coeffs, SYMMETRIC: tl.constexpr):
    """The ranges ``(max, min)`` of canonical rows ``slot`` (1-D, ``R`` rows) folded over the
    ``chunks`` partial ranges in ``part[2, chunks, coeffs]``.

    ``[R, CHUNK_BLOCK]`` partials per step: the loads of a step are independent, so a tile
    with many chunks costs a few memory round trips, not one per chunk (ncu on an H200: 7.1 us
    of a 44 us node at 2048 x 4096 with one load per chunk). ``.cg``: read through to L2,
    where the other programs' stores landed. Elementwise accumulation and one reduction after
    the loop: a reduction inside it crashed Triton 3.6's OptimizeThreadLocality pass."""
    R: tl.constexpr = slot.shape[0]
    chunk = tl.arange(0, CHUNK_BLOCK)
    hi_acc = tl.full([R, CHUNK_BLOCK], -float("inf"), tl.float32)
    lo_acc = tl.full([R, CHUNK_BLOCK], float("inf"), tl.float32)
    for first in range(0, chunks, CHUNK_BLOCK):
        ok = (first + chunk < chunks)[None, :]
        at = part_ptr + (first + chunk)[None, :] * coeffs + slot[:, None]
        hi_acc = tl.maximum(hi_acc, tl.load(at, mask=ok, other=-float("inf"), cache_modifier=".cg"))
        if not SYMMETRIC:
            lo_acc = tl.minimum(
                lo_acc,
                tl.load(at + chunks * coeffs, mask=ok, other=float("inf"), cache_modifier=".cg"),
            )
    return tl.reduce(hi_acc, 1, _maximum), tl.reduce(lo_acc, 1, _minimum)


@triton.jit
def _bit_reverse(i, BITS: tl.constexpr):
    """``i`` with its low ``BITS`` bits in reverse order."""
    r = i * 0
    for b in tl.static_range(BITS):
        r = r | (((i >> b) & 1) << (BITS - 1 - b))
    return r


@triton.jit
def _tile_positions(t, sinks, n, sink_tiles, LEVELS: tl.constexpr, BIT_REVERSED: tl.constexpr):
    """Position in the quantized sequence ``[sinks, a_J, d_J, ..., d_1]`` (``n`` coefficients
    after the sinks) of each canonical coefficient row of tile ``t``, and whether the row is
    real (a sink tile's rows past the last sink are not). Rows come as the kernels' forward
    transforms leave them: ``[a_J, d_J, d_{J-1}, ..., d_1]``, row ``i`` of band ``j`` (rows
    ``w .. 2w - 1``, ``w = R / 2**j``) being detail ``i - w`` of the group's ``w``, or
    ``bitrev(i - w)`` when ``BIT_REVERSED`` (the slab kernel)."""
    R: tl.constexpr = 1 << LEVELS
    i = tl.arange(0, R)
    if t < sink_tiles:
        pos = t * R + i
        valid = pos < sinks
    else:
        group = t - sink_tiles
        pos = sinks + group + i * 0  # a_J
        for j in tl.static_range(1, LEVELS + 1):
            width = R >> j
            in_band = (i >= width) & (i < 2 * width)
            offset = _bit_reverse(i - width, LEVELS - j) if BIT_REVERSED else i - width
            pos = tl.where(in_band, sinks + (n >> j) + group * width + offset, pos)
        valid = pos < sinks + n
    return pos, valid


@triton.jit
def _fake_quant(z, offset, scale, inv, SYMMETRIC: tl.constexpr, EXACT: tl.constexpr):
    """Integer codes ``round((z - offset) / scale)`` and ``codes * scale + offset`` of
    ``[R, C]`` coefficients with per-row parameters, rounded exactly as the reference rounds
    them (IEEE division, round half to even).

    No clamp to the code grid: every row's range is its exact min/max (max |z|), so the
    correctly rounded quotients lie in [0, qmax] (or [-qmax, qmax])."""
    d = z if SYMMETRIC else z - offset[:, None]
    codes = _rint(_divide(d, scale[:, None], inv[:, None], EXACT))
    z_hat = _mul(codes, scale[:, None], EXACT)
    if not SYMMETRIC:
        z_hat = z_hat + offset[:, None]
    return codes, z_hat
