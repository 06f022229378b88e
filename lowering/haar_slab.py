"""The ``slab`` Haar kernel: an ``R x BLOCK_D`` slab of a tile per program (any depth up to
:data:`.triton_haar.MAX_LEVELS`).

Tokens on dim 0, features contiguous on dim 1 (vectorised loads); the tile's tokens are loaded
in bit-reversed order, so each Haar level is a halving of the rows (``tl.split`` / ``tl.join``),
and the coarse levels move rows between warps through shared memory. :mod:`.triton_haar` holds
what both Haar kernels compute, the schedules and the launcher; :mod:`.haar_rows` the ``rows``
kernel, which takes tiles of up to 32 tokens (and the 2-D tiles of haar2d).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    _MODE_APPLY,
    _MODE_FUSED,
    _MODE_LOCAL,
    _MODE_STATS,
    _bit_reverse,
    _by_inv_sqrt2,
    _fake_quant,
    _fold_ranges,
    _maximum,
    _minimum,
    _quantizer_params,
    _tile_positions,
)

__all__ = ["slab_kernel"]


@triton.jit
def _haar_forward(t, DEPTH: tl.constexpr, EXACT: tl.constexpr):
    """``[M, BLOCK_D]`` slab of ``M = 2**DEPTH`` consecutive tokens *in bit-reversed order*
    (row ``p`` holds token ``bitrev(p)``) -> its Haar coefficients ``[a, d_DEPTH, ...,
    d_1]`` along the rows, each detail band in bit-reversed order.

    Why bit-reversed: then the even tokens are the first half of the rows and the odd tokens
    the second half, and the approximations come out bit-reversed again, so every level is a
    halving of the row axis. With Triton's load layout (a thread holds rows ``r, r + M/4, ...``)
    the finest levels, which carry most of the work, stay inside a thread; adjacent-token
    pairs would cross lanes at every level."""
    if DEPTH == 0:
        return t
    else:
        halves = tl.permute(tl.reshape(t, [2, t.shape[0] // 2, t.shape[1]]), (1, 2, 0))
        even, odd = tl.split(halves)
        approx = _by_inv_sqrt2(even + odd, EXACT)
        detail = _by_inv_sqrt2(even - odd, EXACT)
        head = _haar_forward(approx, DEPTH - 1, EXACT)
        # concat(head, detail) along the rows.
        both = tl.permute(tl.join(head, detail), (2, 0, 1))
        return tl.reshape(both, [t.shape[0], t.shape[1]])


@triton.jit
def _haar_inverse(t, DEPTH: tl.constexpr, EXACT: tl.constexpr):
    """Inverse of :func:`_haar_forward`: coefficients -> tokens in bit-reversed order."""
    if DEPTH == 0:
        return t
    else:
        halves = tl.permute(tl.reshape(t, [2, t.shape[0] // 2, t.shape[1]]), (1, 2, 0))
        head, detail = tl.split(halves)
        approx = _haar_inverse(head, DEPTH - 1, EXACT)
        even = _by_inv_sqrt2(approx + detail, EXACT)
        odd = _by_inv_sqrt2(approx - detail, EXACT)
        # concat(even, odd) along the rows: the even tokens first, as they were loaded.
        both = tl.permute(tl.join(even, odd), (2, 0, 1))
        return tl.reshape(both, [t.shape[0], t.shape[1]])


@triton.jit
def _tile_params(
    part_ptr, param_ptr, tile, t, chunks, coeffs, sinks, n, sink_tiles,
    high_tokens, qmax_high, qmax_low, LEVELS: tl.constexpr, SYMMETRIC: tl.constexpr,
):  # fmt: skip
    """Fold the ``chunks`` partial ranges of one tile's ``R`` coefficient rows and write their
    quantizer parameters (offset, scale, reciprocal scale). The vectors here are fresh 1-D
    tensors, spread over the lanes, so the per-row divisions run once per row rather than once
    per thread holding the row."""
    R: tl.constexpr = 1 << LEVELS
    slot = tile * R + tl.arange(0, R)
    hi, lo = _fold_ranges(part_ptr, slot, chunks, coeffs, SYMMETRIC)
    pos, _ = _tile_positions(t, sinks, n, sink_tiles, LEVELS, True)
    offset, scale, inv = _quantizer_params(hi, lo, pos, high_tokens, qmax_high, qmax_low, SYMMETRIC)
    tl.store(param_ptr + slot, offset)
    tl.store(param_ptr + coeffs + slot, scale)
    tl.store(param_ptr + 2 * coeffs + slot, inv)


@triton.jit(do_not_specialize=["rows", "sinks", "n", "tiles_per_row", "sink_tiles", "chunks"])
def slab_kernel(
    x_ptr,
    out_ptr,
    part_ptr,
    param_ptr,
    sync_ptr,
    probe_ptr,
    rows,
    S,
    D,
    sinks,
    n,
    tiles_per_row,
    sink_tiles,
    chunks,
    stride_xb,
    stride_xs,
    stride_ob,
    stride_os,
    high_tokens,
    qmax_high,
    qmax_low,
    LEVELS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    MODE: tl.constexpr,
    PROBE: tl.constexpr,
    EXACT: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """One program = one ``R x BLOCK_D`` slab of one tile (modes ``LOCAL``, ``FUSED``,
    ``STATS``, ``APPLY``); see the module docstring.

    Buffers (float32 unless said): ``part[2, chunks, coeffs]`` partial max (or ``max |z|``) and
    min per chunk and canonical coefficient ``tile * R + i``; ``param[3, coeffs]`` offset,
    scale and reciprocal scale per canonical coefficient, written by the tile's last program
    to finish its statistics; ``sync`` (int64, zeroed): ``[ticket, arrivals[tiles],
    ready[tiles]]``. ``EVEN_D``: ``D`` is a multiple of ``BLOCK_D``, so no feature masks.
    """
    R: tl.constexpr = 1 << LEVELS
    tiles = rows * tiles_per_row
    coeffs = tiles * R
    if MODE == _MODE_FUSED:  # noqa: SIM108  (take tiles in the order programs start: docstring)
        pid = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    else:
        pid = tl.program_id(0).to(tl.int64)
    tile = pid // chunks
    chunk = (pid % chunks).to(tl.int32)
    row = tile // tiles_per_row
    t = (tile % tiles_per_row).to(tl.int32)

    is_sink = t < sink_tiles
    cols = tl.arange(0, R)
    if is_sink:
        tokens = t * R + cols
        tok_ok = tokens < sinks
    else:  # bit-reversed token order (see _haar_forward)
        tokens = sinks + (t - sink_tiles) * R + _bit_reverse(cols, LEVELS)
        tok_ok = tokens < S
    # One 64-bit base per program, 32-bit offsets per element (the host checks they fit).
    feats = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    feat_ok = feats < D
    if EVEN_D:
        io_mask = tl.broadcast_to(tok_ok[:, None], [R, BLOCK_D])
    else:
        io_mask = tok_ok[:, None] & feat_ok[None, :]
    x = tl.load(
        x_ptr + row * stride_xb + (tokens * stride_xs)[:, None] + feats[None, :],
        mask=io_mask,
        other=0.0,
    ).to(tl.float32)
    if is_sink:  # noqa: SIM108  (a runtime branch: sink tiles skip the transform)
        z = x
    else:
        z = _haar_forward(x, LEVELS, EXACT)  # padding tokens are zeros, as in the reference

    slot = tile * R + cols  # canonical coefficient index
    if MODE != _MODE_APPLY:
        # Partial (for LOCAL, complete) range of every coefficient row of the slab.
        if SYMMETRIC:
            za = tl.abs(z) if EVEN_D else tl.where(feat_ok[None, :], tl.abs(z), 0.0)
            hi = tl.reduce(za, 1, _maximum)
            lo = hi
        elif EVEN_D:
            hi = tl.reduce(z, 1, _maximum)
            lo = tl.reduce(z, 1, _minimum)
        else:
            hi = tl.reduce(tl.where(feat_ok[None, :], z, -float("inf")), 1, _maximum)
            lo = tl.reduce(tl.where(feat_ok[None, :], z, float("inf")), 1, _minimum)
        if MODE != _MODE_LOCAL:
            tl.store(part_ptr + chunk * coeffs + slot, hi)
            if not SYMMETRIC:
                tl.store(part_ptr + (chunks + chunk) * coeffs + slot, lo)
            # The program that completes the tile computes its parameters for everybody (no
            # separate parameter pass; the other programs never wait). Every thread's stores
            # are ordered before the release by the CTA barrier, and the acquire makes the
            # other programs' partials visible to this one.
            tl.debug_barrier()
            arrived = tl.atomic_add(sync_ptr + 1 + tile, 1, sem="acq_rel")
            if arrived == chunks - 1:
                _tile_params(
                    part_ptr, param_ptr, tile, t, chunks, coeffs, sinks, n, sink_tiles,
                    high_tokens, qmax_high, qmax_low, LEVELS, SYMMETRIC,
                )  # fmt: skip
                if MODE == _MODE_FUSED:
                    tl.debug_barrier()
                    tl.atomic_xchg(sync_ptr + 1 + tiles + tile, 1, sem="release")
    if MODE == _MODE_STATS:
        return

    if MODE == _MODE_LOCAL:
        pos, valid = _tile_positions(t, sinks, n, sink_tiles, LEVELS, True)
        offset, scale, inv = _quantizer_params(
            hi, lo, pos, high_tokens, qmax_high, qmax_low, SYMMETRIC
        )
    else:
        if MODE == _MODE_FUSED:  # wait for the tile's parameters
            ready = sync_ptr + 1 + tiles + tile
            seen = tl.atomic_add(ready, 0, sem="acquire")
            while seen == 0:
                seen = tl.atomic_add(ready, 0, sem="acquire")
        offset = tl.load(param_ptr + slot, cache_modifier=".cg")
        scale = tl.load(param_ptr + coeffs + slot, cache_modifier=".cg")
        inv = tl.load(param_ptr + 2 * coeffs + slot, cache_modifier=".cg")
        if PROBE:
            pos, valid = _tile_positions(t, sinks, n, sink_tiles, LEVELS, True)

    codes, z_hat = _fake_quant(z, offset, scale, inv, SYMMETRIC, EXACT)
    if PROBE:
        # Test hook: codes and q/dq values at [2, rows, quantized, D].
        quantized = sinks + n
        at = probe_ptr + (row * quantized + pos)[:, None] * D + feats[None, :]
        probe_mask = valid[:, None] & feat_ok[None, :]
        tl.store(at, codes, mask=probe_mask)
        tl.store(at + rows * quantized * D, z_hat, mask=probe_mask)
    if is_sink:  # noqa: SIM108
        y = z_hat
    else:
        y = _haar_inverse(z_hat, LEVELS, EXACT)
    tl.store(
        out_ptr + row * stride_ob + (tokens * stride_os)[:, None] + feats[None, :],
        y.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )
