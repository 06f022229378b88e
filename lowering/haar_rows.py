"""The Haar kernel for tiles of up to 32 tokens: every token of a feature column in one thread.

Computes exactly what :mod:`.triton_haar` documents (J-level Haar along the sequence, per-token
min/max quantization of the coefficients, inverse Haar), with a different division of work.
A program owns ``R = 2**J`` tokens (one tile) by ``CB`` features (one chunk) and walks its
chunk in sub-blocks of ``SUB = V * 32 * num_warps`` features (``V = 2``); in a sub-block each
thread holds all ``R`` tokens of ``V`` adjacent features. So:

* every Haar butterfly is between two registers of one thread (the slab kernel moves the
  coarse levels' rows between warps through shared memory);
* the per-row minimum and maximum accumulate in registers over the sub-blocks and cross the
  threads once per program;
* the token rows sit at compile-time offsets ``r * D`` from one pointer per thread, so loads
  and stores use immediate offsets instead of a 64-bit address per row (``D`` is a
  ``constexpr``: one compiled kernel per hidden size);
* the quantizer parameters of the ``R`` rows are re-read (one 16-byte load per row, L1) in
  every sub-block instead of staying live in ``3 R`` registers, and the next sub-block is
  loaded while the current one is computed.

The slab is loaded as ``[SUB / V, R, V]``, which makes Triton's coalescing put the lanes and
warps along the features and keep the tokens in registers, then viewed as ``[R, SUB]``.
Registers grow with ``R * V`` (data and two accumulators per row), which is why deeper tiles
stay on the slab kernel (``MAX_ROWS_LEVELS``). Measured on an H200 (``bench_kernels``,
``bench_kernel_tiling``): 50.8 % of copy bandwidth at 2048 x 4096 against the slab kernel's
39.0 %; with one feature per thread (2-byte accesses) it was no faster than the slab kernel.

Schedules are the slab kernel's (``local`` for one chunk per tile, ``split`` = statistics then
apply, with the tile's last statistics program computing the parameters, ``fused`` = one
launch with a spin-wait, the default on a GPU). Coefficient rows are kept in natural order
within each band (tokens are loaded in natural order), so a row's position in the quantized
sequence is ``s + g`` for ``a_J`` and ``s + n/2**j + g*R/2**j + i`` for detail ``i`` of ``d_j``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .haar_grid import _forward2d, _grid_positions, _grid_tile, _inverse2d
from .triton_common import (
    _MODE_APPLY,
    _MODE_FUSED,
    _MODE_LOCAL,
    _MODE_STATS,
    _by_inv_sqrt2,
    _fake_quant,
    _fold_ranges,
    _maximum,
    _minimum,
    _quantizer_params,
)

__all__ = ["MAX_ROWS_LEVELS", "rows_kernel"]

MAX_ROWS_LEVELS = 5
"""Deepest Haar this kernel takes (32 tokens per thread). Deeper tiles use the slab kernel: at
64 tokens (one feature per thread) the rows kernel needed ~250 registers and measured no
faster (H200, 4096 x 4096: 66.6 us fused against 69.3 us)."""


@triton.jit
def _forward(x, M: tl.constexpr, C: tl.constexpr, EXACT: tl.constexpr):
    """``[M, C]`` tokens in natural order -> ``[a_J, d_J, d_{J-1}, ..., d_1]`` along the rows,
    every band in natural order (the reference's butterflies, in its order)."""
    if M == 1:
        return x
    else:
        even, odd = tl.split(tl.permute(tl.reshape(x, [M // 2, 2, C]), (0, 2, 1)))
        approx = _by_inv_sqrt2(even + odd, EXACT)
        detail = _by_inv_sqrt2(even - odd, EXACT)
        head = _forward(approx, M // 2, C, EXACT)
        return tl.reshape(tl.permute(tl.join(head, detail), (2, 0, 1)), [M, C])


@triton.jit
def _inverse(z, M: tl.constexpr, C: tl.constexpr, EXACT: tl.constexpr):
    """Inverse of :func:`_forward`."""
    if M == 1:
        return z
    else:
        head, detail = tl.split(tl.permute(tl.reshape(z, [2, M // 2, C]), (1, 2, 0)))
        approx = _inverse(head, M // 2, C, EXACT)
        even = _by_inv_sqrt2(approx + detail, EXACT)
        odd = _by_inv_sqrt2(approx - detail, EXACT)
        return tl.reshape(tl.permute(tl.join(even, odd), (0, 2, 1)), [M, C])


@triton.jit
def _load_params(at, s, EXACT: tl.constexpr):
    """Offset, scale and reciprocal scale from the float4 records at ``at``, in sub-block
    ``s``. Compiled: one 16-byte load per row, re-issued in every sub-block (from L1) rather
    than hoisted out of the loop into ``3 R`` live registers. It is a *pure* inline-asm load
    that takes the loop index as an unused operand: pure, so that torch's analysis of which
    tensors the kernel writes accepts it; the loop index, so that the compiler cannot treat
    it as loop-invariant. (The loop starts after the records are written.)"""
    if EXACT:
        offset, scale, inv, _ = tl.inline_asm_elementwise(
            "ld.global.v4.f32 {$0, $1, $2, $3}, [$4];",
            "=f,=f,=f,=f,l,r",
            [at, tl.full(at.shape, s, tl.int32)],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
    else:
        offset = tl.load(at)
        scale = tl.load(at + 1)
        inv = tl.load(at + 2)
    return offset, scale, inv


@triton.jit
def _store_params(param_ptr, slot, offset, scale, inv):
    tl.store(param_ptr + slot * 4, offset)
    tl.store(param_ptr + slot * 4 + 1, scale)
    tl.store(param_ptr + slot * 4 + 2, inv)


@triton.jit
def _fold_params(
    part_ptr, param_ptr, tile, t, chunks, coeffs, sinks, n, sink_tiles,
    high_tokens, qmax_high, qmax_low, LEVELS: tl.constexpr, SYMMETRIC: tl.constexpr,
    GRID_W: tl.constexpr,
):  # fmt: skip
    """Fold the ``chunks`` partial ranges of tile ``tile``'s rows and write their parameters
    (in a fresh 1-D layout: the divisions run once per row, not once per thread)."""
    R: tl.constexpr = 1 << LEVELS
    slot = tile * R + tl.arange(0, R)
    hi, lo = _fold_ranges(part_ptr, slot, chunks, coeffs, SYMMETRIC)
    pos, _ = _grid_positions(t, sinks, n, sink_tiles, LEVELS, GRID_W)
    offset, scale, inv = _quantizer_params(hi, lo, pos, high_tokens, qmax_high, qmax_low, SYMMETRIC)
    _store_params(param_ptr, slot, offset, scale, inv)


@triton.jit
def _block_mask(
    s, tokens_here, cols_here, first_col, feats, D: tl.constexpr, R: tl.constexpr,
    SUB: tl.constexpr, COL_MASK: tl.constexpr, SIDE: tl.constexpr,
):  # fmt: skip
    """Which elements of sub-block ``s`` (``[SUB / V, R, V]``) exist: tokens before the end
    (a 2-D tile, ``SIDE > 0``: grid rows ``< tokens_here`` and columns ``< cols_here``),
    features before ``D``. The row bound is recomputed per sub-block on purpose: a
    loop-invariant one makes ptxas keep R predicates live in registers."""
    r = tl.arange(0, R)
    if SIDE > 0:
        inside = ((r // SIDE) < tokens_here) & ((r % SIDE) < tl.minimum(cols_here, SIDE + s))
        ok = inside[None, :, None]
    else:
        ok = (r < tl.minimum(tokens_here, R + s))[None, :, None]
    if COL_MASK:
        ok = ok & (first_col + s * SUB + feats < D)
    return ok


@triton.jit
def _load_block(
    x_base, row_off, s, tokens_here, cols_here, first_col, feats, D: tl.constexpr,
    R: tl.constexpr, SUB: tl.constexpr, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr,
    SIDE: tl.constexpr,
):  # fmt: skip
    """Sub-block ``s`` of the program's slab, ``[SUB / V, R, V]`` in the input dtype; missing
    tokens and features read as zeros."""
    if ROW_MASK or COL_MASK:
        ok = _block_mask(s, tokens_here, cols_here, first_col, feats, D, R, SUB, COL_MASK, SIDE)
        return tl.load(x_base + s * SUB + row_off, mask=ok, other=0.0)
    else:
        return tl.load(x_base + s * SUB + row_off)


@triton.jit
def _coefficients(
    x, R: tl.constexpr, SUB: tl.constexpr, HAAR: tl.constexpr, EXACT: tl.constexpr,
    SIDE: tl.constexpr,
):  # fmt: skip
    """A loaded ``[SUB / V, R, V]`` block as float32 ``[R, SUB]`` rows, transformed when
    ``HAAR`` (2-D when ``SIDE > 0``; missing tokens were read as zeros, as the reference
    pads)."""
    z = tl.reshape(tl.permute(x.to(tl.float32), (1, 0, 2)), [R, SUB])
    if HAAR:
        if SIDE > 0:  # noqa: SIM108 (constexpr branches: each traces one call)
            z = _forward2d(z, SIDE, SUB, EXACT)
        else:
            z = _forward(z, R, SUB, EXACT)
    return z


@triton.jit
def _tile_body(
    x_ptr, out_ptr, part_ptr, param_ptr, sync_ptr, probe_ptr, tile, chunk, t, row,
    rows, S, sinks, n, tiles_per_row, sink_tiles, chunks, stride_xb, stride_ob,
    high_tokens, qmax_high, qmax_low,
    D: tl.constexpr, LEVELS: tl.constexpr, V: tl.constexpr, SUB: tl.constexpr,
    SUBS: tl.constexpr, SYMMETRIC: tl.constexpr, MODE: tl.constexpr, PROBE: tl.constexpr,
    EXACT: tl.constexpr, GRID_W: tl.constexpr, HAAR: tl.constexpr, ROW_MASK: tl.constexpr,
):  # fmt: skip
    """One program's work on one tile (see the module docstring). ``HAAR``: transform (not a
    sink tile); ``ROW_MASK``: the tile has tokens past the end (sink tile, last tile, a grid
    tile over the grid's edge); ``GRID_W > 0``: the tile is a square of the ``GRID_W``-wide
    token grid (haar2d)."""
    R: tl.constexpr = 1 << LEVELS
    CB: tl.constexpr = SUB * SUBS
    EVEN_D: tl.constexpr = D % SUB == 0
    COL_MASK: tl.constexpr = not EVEN_D
    MASKED: tl.constexpr = ROW_MASK or COL_MASK
    coeffs = rows * tiles_per_row * R
    r = tl.arange(0, R)
    # A grid tile is SIDE x SIDE tokens of the grid; SIDE = 0: R consecutive tokens.
    SIDE: tl.constexpr = (1 << (LEVELS // 2)) if (HAAR and GRID_W > 0) else 0
    cols_here = 0
    if SIDE > 0:
        tok0, tokens_here, cols_here = _grid_tile(t, S, sinks, sink_tiles, SIDE, GRID_W)
        row_off = (((r // SIDE) * GRID_W + r % SIDE) * D)[None, :, None]
    elif HAAR:
        tok0 = sinks + (t - sink_tiles) * R
        tokens_here = S - tok0
        row_off = (r * D)[None, :, None]
    else:
        tok0 = t * R
        tokens_here = sinks - tok0
        row_off = (r * D)[None, :, None]
    # With one feature per thread, hide the columns' contiguity (a runtime factor of 1) from
    # the coalescing pass, which would otherwise give a thread 8 adjacent features and spread
    # the tokens over the lanes.
    col = tl.arange(0, SUB // V) * (chunks // chunks if V == 1 else V)
    feats = col[:, None, None] + tl.arange(0, V)[None, None, :]  # [SUB / V, 1, V]
    first_col = chunk * CB
    x_base = x_ptr + row * stride_xb + tok0 * D + first_col + feats
    o_base = out_ptr + row * stride_ob + tok0 * D + first_col + feats
    # (not tl.cdiv: a triton.language.standard helper; see triton_common's docstring)
    subs = tl.minimum(SUBS, (D - first_col + SUB - 1) // SUB)
    slot = tile * R + r
    block = (tokens_here, cols_here, first_col, feats)

    if MODE != _MODE_APPLY:
        hi_acc = tl.full([R, SUB // V], -float("inf"), tl.float32)
        lo_acc = tl.full([R, SUB // V], float("inf"), tl.float32)
        x = _load_block(x_base, row_off, 0, *block, D, R, SUB, ROW_MASK, COL_MASK, SIDE)
        for s in range(subs):
            # Prefetch the next sub-block (the last iteration re-reads its own, from L1) so
            # its loads are in flight while this one is computed.
            ahead = tl.minimum(s + 1, subs - 1)
            x_next = _load_block(
                x_base, row_off, ahead, *block, D, R, SUB, ROW_MASK, COL_MASK, SIDE
            )
            z = tl.reshape(_coefficients(x, R, SUB, HAAR, EXACT, SIDE), [R, SUB // V, V])
            if SYMMETRIC:
                z = tl.abs(z)
            if COL_MASK:
                cok = tl.permute(first_col + s * SUB + feats < D, (1, 0, 2))  # [1, SUB / V, V]
                hi_acc = tl.maximum(hi_acc, tl.reduce(tl.where(cok, z, -float("inf")), 2, _maximum))
                lo_acc = tl.minimum(lo_acc, tl.reduce(tl.where(cok, z, float("inf")), 2, _minimum))
            else:
                hi_acc = tl.maximum(hi_acc, tl.reduce(z, 2, _maximum))
                lo_acc = tl.minimum(lo_acc, tl.reduce(z, 2, _minimum))
            x = x_next
        hi = tl.reduce(hi_acc, 1, _maximum)
        lo = tl.reduce(lo_acc, 1, _minimum)
        if MODE == _MODE_LOCAL:
            pos, _ = _grid_positions(t, sinks, n, sink_tiles, LEVELS, GRID_W)
            offset, scale, inv = _quantizer_params(
                hi, lo, pos, high_tokens, qmax_high, qmax_low, SYMMETRIC
            )
            _store_params(param_ptr, slot, offset, scale, inv)
            tl.debug_barrier()  # the loop below re-reads them
        else:
            tl.store(part_ptr + chunk * coeffs + slot, hi)
            if not SYMMETRIC:
                tl.store(part_ptr + (chunks + chunk) * coeffs + slot, lo)
            # Count in. Every thread's stores are ordered before the release by the CTA
            # barrier; the acquire makes the other programs' partials visible to this one.
            tl.debug_barrier()
            arrived = tl.atomic_add(sync_ptr + 1 + tile, 1, sem="acq_rel") + 1
            if MODE == _MODE_STATS:
                # The tile's last program computes the parameters (nobody waits for it).
                if arrived == chunks:
                    _fold_params(
                        part_ptr, param_ptr, tile, t, chunks, coeffs, sinks, n, sink_tiles,
                        high_tokens, qmax_high, qmax_low, LEVELS, SYMMETRIC, GRID_W,
                    )  # fmt: skip
                return
            else:
                # Wait for the tile's other chunks, then every program folds the partials
                # and writes the (identical) parameters itself: no second handshake.
                while arrived < chunks:
                    arrived = tl.atomic_add(sync_ptr + 1 + tile, 0, sem="acquire")
                _fold_params(
                    part_ptr, param_ptr, tile, t, chunks, coeffs, sinks, n, sink_tiles,
                    high_tokens, qmax_high, qmax_low, LEVELS, SYMMETRIC, GRID_W,
                )  # fmt: skip
                tl.debug_barrier()

    param_at = param_ptr + slot * 4
    if PROBE:
        pos, valid = _grid_positions(t, sinks, n, sink_tiles, LEVELS, GRID_W)
        probe_row = (row * (sinks + n) + pos) * D
    x = _load_block(x_base, row_off, 0, *block, D, R, SUB, ROW_MASK, COL_MASK, SIDE)
    for s in range(subs):
        ahead = tl.minimum(s + 1, subs - 1)
        x_next = _load_block(x_base, row_off, ahead, *block, D, R, SUB, ROW_MASK, COL_MASK, SIDE)
        z = _coefficients(x, R, SUB, HAAR, EXACT, SIDE)
        offset, scale, inv = _load_params(param_at, s, EXACT)
        codes, z_hat = _fake_quant(z, offset, scale, inv, SYMMETRIC, EXACT)
        if PROBE:  # test hook: codes and q/dq values at [2, rows, sinks + n, D]
            at = probe_ptr + probe_row[None, :, None] + first_col + s * SUB + feats
            keep = valid[None, :, None] & (first_col + s * SUB + feats < D)
            plane = rows * (sinks + n) * D
            tl.store(at, tl.permute(tl.reshape(codes, [R, SUB // V, V]), (1, 0, 2)), mask=keep)
            tl.store(
                at + plane, tl.permute(tl.reshape(z_hat, [R, SUB // V, V]), (1, 0, 2)), mask=keep
            )
        if SIDE > 0:
            z_hat = _inverse2d(z_hat, SIDE, SUB, EXACT)
        elif HAAR:
            z_hat = _inverse(z_hat, R, SUB, EXACT)
        y = tl.permute(tl.reshape(z_hat, [R, SUB // V, V]), (1, 0, 2)).to(out_ptr.dtype.element_ty)
        if MASKED:
            ok = _block_mask(s, *block, D, R, SUB, COL_MASK, SIDE)
            tl.store(o_base + s * SUB + row_off, y, mask=ok)
        else:
            tl.store(o_base + s * SUB + row_off, y)
        x = x_next


@triton.jit(do_not_specialize=["rows", "sinks", "n", "tiles_per_row", "sink_tiles", "chunks"])
def rows_kernel(
    x_ptr, out_ptr, part_ptr, param_ptr, sync_ptr, probe_ptr,
    rows, S, sinks, n, tiles_per_row, sink_tiles, chunks, stride_xb, stride_ob,
    high_tokens, qmax_high, qmax_low,
    D: tl.constexpr, LEVELS: tl.constexpr, V: tl.constexpr, SUB: tl.constexpr,
    SUBS: tl.constexpr, SYMMETRIC: tl.constexpr, MODE: tl.constexpr, PROBE: tl.constexpr,
    EXACT: tl.constexpr, GRID_W: tl.constexpr,
):  # fmt: skip
    """One program = tile ``pid // chunks``, feature chunk ``pid % chunks`` (``FUSED`` takes
    ``pid`` from a ticket counter so it only ever waits for programs that started before it).

    ``x`` and ``out`` are ``[rows, S, D]`` with unit feature stride and row stride ``D``.
    Buffers: ``part[2, chunks, coeffs]`` partial max (or ``max |z|``) and min per chunk and
    canonical row ``tile * R + i``; ``param[coeffs, 4]`` offset, scale, reciprocal scale
    (and padding) per canonical row; ``sync`` (int64, zeroed): ``[ticket, arrivals[tiles]]``.
    Full tiles take an unmasked body; sink tiles and the last tile of a row a masked one (a
    runtime branch between constexpr specialisations).
    """
    if MODE == _MODE_FUSED:  # noqa: SIM108
        pid = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    else:
        pid = tl.program_id(0).to(tl.int64)
    tile = pid // chunks
    chunk = (pid % chunks).to(tl.int32)
    row = tile // tiles_per_row
    t = (tile % tiles_per_row).to(tl.int32)
    R: tl.constexpr = 1 << LEVELS
    args = (
        x_ptr, out_ptr, part_ptr, param_ptr, sync_ptr, probe_ptr, tile, chunk, t, row,
        rows, S, sinks, n, tiles_per_row, sink_tiles, chunks, stride_xb, stride_ob,
        high_tokens, qmax_high, qmax_low,
    )  # fmt: skip
    if GRID_W > 0:  # a 2-D tile is full when it ends inside the grid both ways
        SIDE: tl.constexpr = 1 << (LEVELS // 2)
        _, rows_here, cols_here = _grid_tile(t, S, sinks, sink_tiles, SIDE, GRID_W)
        full = (rows_here >= SIDE) & (cols_here >= SIDE)
    else:
        full = sinks + (t - sink_tiles + 1) * R <= S
    # (constexprs spelled out: packed in a tuple they reach _tile_body as runtime values)
    if t < sink_tiles:
        _tile_body(
            *args, D, LEVELS, V, SUB, SUBS, SYMMETRIC, MODE, PROBE, EXACT, GRID_W, False, True
        )
    elif full:
        _tile_body(
            *args, D, LEVELS, V, SUB, SUBS, SYMMETRIC, MODE, PROBE, EXACT, GRID_W, True, False
        )
    else:
        _tile_body(
            *args, D, LEVELS, V, SUB, SUBS, SYMMETRIC, MODE, PROBE, EXACT, GRID_W, True, True
        )
