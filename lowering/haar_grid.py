"""haar2d's square tiles in the rows kernel (:mod:`.haar_rows`): the 2-D butterflies and where
each coefficient goes.

A J-level 2-D Haar (``transform="haar2d"``, :class:`stamp_fx.transforms.Haar2D`) is block-local:
each ``2**J x 2**J`` square of the zero-padded grid gives exactly its own ``4**J``
coefficients. So the rows kernel takes the square as one tile of ``R = 4**J`` rows (its tokens
at constexpr offsets ``(i * W + j) * D``); :func:`_forward2d` / :func:`_inverse2d` are the
reference's butterflies in its order, leaving the tile as ``[LL, LH, HL, HH]`` with the head
recursively the same; :func:`_grid_positions` maps each row to its place in the reference's
quantized sequence, which sets its bit width.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import _by_inv_sqrt2, _tile_positions

__all__ = ["_forward2d", "_grid_positions", "_grid_tile", "_inverse2d"]


@triton.jit
def _grid_tile(t, S, sinks, sink_tiles, SIDE: tl.constexpr, GRID_W: tl.constexpr):
    """Where grid tile ``t`` (after the sink tiles) starts, ``tok0``, and how many of its
    ``SIDE`` rows and columns lie inside the ``(S - sinks) / GRID_W``-row grid (the rest is
    the zero padding to a multiple of ``SIDE``)."""
    tiles_w: tl.constexpr = (GRID_W + SIDE - 1) // SIDE
    ty = (t - sink_tiles) // tiles_w
    tx = (t - sink_tiles) % tiles_w
    tok0 = sinks + ty * SIDE * GRID_W + tx * SIDE
    rows_here = (S - sinks) // GRID_W - ty * SIDE
    cols_here = GRID_W - tx * SIDE
    return tok0, rows_here, cols_here


@triton.jit
def _forward2d(x, A: tl.constexpr, C: tl.constexpr, EXACT: tl.constexpr):
    """A row-major ``A x A`` grid tile (``[A * A, C]`` rows ``i * A + j``) -> its 2-D Haar
    coefficients ``[LL, LH, HL, HH]`` (each band row-major, the head recursively the same
    layout): the reference's ``Haar2D`` butterflies, in its order (rows paired first, then
    the columns of each half)."""
    if A == 1:
        return x
    else:
        H: tl.constexpr = A // 2
        even, odd = tl.split(tl.permute(tl.reshape(x, [H, 2, A, C]), (0, 2, 3, 1)))
        low = _by_inv_sqrt2(even + odd, EXACT)
        high = _by_inv_sqrt2(even - odd, EXACT)
        le, lo = tl.split(tl.permute(tl.reshape(low, [H, H, 2, C]), (0, 1, 3, 2)))
        he, ho = tl.split(tl.permute(tl.reshape(high, [H, H, 2, C]), (0, 1, 3, 2)))
        ll = _by_inv_sqrt2(le + lo, EXACT)
        lh = _by_inv_sqrt2(le - lo, EXACT)
        hl = _by_inv_sqrt2(he + ho, EXACT)
        hh = _by_inv_sqrt2(he - ho, EXACT)
        N: tl.constexpr = H * H
        head = _forward2d(tl.reshape(ll, [N, C]), H, C, EXACT)
        bands = tl.join(
            tl.join(head, tl.reshape(lh, [N, C])),
            tl.join(tl.reshape(hl, [N, C]), tl.reshape(hh, [N, C])),
        )  # [N, C, band % 2, band // 2]
        return tl.reshape(tl.permute(bands, (3, 2, 0, 1)), [A * A, C])


@triton.jit
def _inverse2d(z, A: tl.constexpr, C: tl.constexpr, EXACT: tl.constexpr):
    """Inverse of :func:`_forward2d` (the reference's merges: columns, then rows)."""
    if A == 1:
        return z
    else:
        H: tl.constexpr = A // 2
        N: tl.constexpr = H * H
        first, second = tl.split(tl.permute(tl.reshape(z, [2, 2, N, C]), (2, 3, 1, 0)))
        head, lh = tl.split(first)
        hl, hh = tl.split(second)
        ll = tl.reshape(_inverse2d(head, H, C, EXACT), [H, H, C])
        lh = tl.reshape(lh, [H, H, C])
        hl = tl.reshape(hl, [H, H, C])
        hh = tl.reshape(hh, [H, H, C])
        low = tl.join(_by_inv_sqrt2(ll + lh, EXACT), _by_inv_sqrt2(ll - lh, EXACT))
        high = tl.join(_by_inv_sqrt2(hl + hh, EXACT), _by_inv_sqrt2(hl - hh, EXACT))
        low = tl.reshape(tl.permute(low, (0, 1, 3, 2)), [H, A, C])
        high = tl.reshape(tl.permute(high, (0, 1, 3, 2)), [H, A, C])
        rows = tl.join(_by_inv_sqrt2(low + high, EXACT), _by_inv_sqrt2(low - high, EXACT))
        return tl.reshape(tl.permute(rows, (0, 3, 1, 2)), [A * A, C])


@triton.jit
def _grid_positions(t, sinks, n, sink_tiles, LEVELS: tl.constexpr, GRID_W: tl.constexpr):
    """:func:`~.triton_common._tile_positions` for a 2-D tile (``GRID_W > 0``): row ``p`` of
    the ``[LL, LH, HL, HH]`` layout of :func:`_forward2d` is, for ``4**l <= p < 4**(l+1)``,
    entry ``(a, b)`` of band ``(p - 4**l) // 4**l`` of the level ``l`` steps below the
    coarsest; the reference's sequence is ``[sinks, LL_J, (LH, HL, HH)_J, ..., (..)_1]``,
    each band row-major over the padded grid (``bh x bw`` tiles, ``bh * 2**l`` rows)."""
    R: tl.constexpr = 1 << LEVELS
    i = tl.arange(0, R)
    # (a constexpr test, then a runtime one: the grid branch must not be traced for 1-D)
    if GRID_W == 0:  # noqa: SIM114 (see the comment above)
        pos, valid = _tile_positions(t, sinks, n, sink_tiles, LEVELS, False)
    elif t < sink_tiles:  # R consecutive sink tokens, as in 1-D
        pos, valid = _tile_positions(t, sinks, n, sink_tiles, LEVELS, False)
    else:
        T: tl.constexpr = 1 << (LEVELS // 2)
        bw: tl.constexpr = (GRID_W + T - 1) // T
        bh = n // (R * bw)
        g = t - sink_tiles
        ty = g // bw
        tx = g % bw
        pos = sinks + ty * bw + tx + i * 0  # LL
        for lv in tl.static_range(0, LEVELS // 2):
            size = 1 << (2 * lv)  # rows of one band of this level in the tile
            side = 1 << lv
            q = i - size
            in_level = (i >= size) & (i < 4 * size)
            band = q // size
            a = (q % size) // side
            b = q % side
            at = bh * bw * size * (1 + band) + (ty * side + a) * (bw * side) + tx * side + b
            pos = tl.where(in_level, sinks + at, pos)
        valid = pos < sinks + n
    return pos, valid
