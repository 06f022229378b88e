"""The weight quantizer: pure functions on one ``[rows, cols]`` weight (no modules, no plans).

The grid (asymmetric with an integer zero point, or symmetric), the MSE clip search and
round-to-nearest are specified in :mod:`stamp_fx.weights`, which applies them to a model and
records the result; GPTQ (:mod:`stamp_fx.gptq`) uses :func:`weight_qparams` for its grid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .quantizer import code_max, working_dtype

if TYPE_CHECKING:  # only for annotations: weights imports this module
    from .weights import WeightQuantConfig

__all__ = ["clip_ratios", "code_range", "fake_quant_weight", "rtn_quantize", "weight_qparams"]


def clip_ratios(min_ratio: float = 0.5, steps: int = 20) -> list[float]:
    """Shrink ratios searched by the clip search: 1.0 first, then evenly down to ``min_ratio``."""
    if steps == 1:
        return [1.0]
    return [1.0 - (1.0 - min_ratio) * i / (steps - 1) for i in range(steps)]


def _groups(w: Tensor, group_size: int | None) -> Tensor:
    """[rows, cols] -> [rows, n_groups, G] (one group per row when ``group_size`` is None)."""
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [out, in], got shape {tuple(w.shape)}")
    cols = w.shape[1]
    if group_size is None:
        return w.unsqueeze(1)
    if cols % group_size:
        raise ValueError(
            f"weight_group_size {group_size} does not divide the {cols} input columns "
            f"(pick a divisor of {cols}, or None for per output channel)"
        )
    return w.unflatten(1, (cols // group_size, group_size))


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer codes."""
    top = code_max(bits, symmetric)
    return (-top, top) if symmetric else (0, top)


def _grid(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, int, int]:
    """(scale, zero, qmin, qmax) of ranges [lo, hi] (symmetric: amax = max(|lo|, |hi|))."""
    tiny = torch.finfo(lo.dtype).tiny
    if symmetric:
        qmax = code_max(bits, True)
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(tiny)
        return scale, torch.zeros_like(scale), -qmax, qmax
    qmax = code_max(bits, False)
    scale = ((hi - lo) / qmax).clamp_min(tiny)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero, 0, qmax


def _qdq(g: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
    codes = (torch.round(g / scale) + zero).clamp(qmin, qmax)
    return (codes - zero) * scale


def _shrink(lo: Tensor, hi: Tensor, ratio: float | Tensor) -> tuple[Tensor, Tensor]:
    """Shrink [lo, hi] (which holds zero) by ``ratio`` in (0, 1] toward zero: never widens."""
    return ratio * lo, ratio * hi


def weight_qparams(
    w: Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = False,
    clip_search: bool = True,
    min_ratio: float = 0.5,
    clip_steps: int = 20,
) -> tuple[Tensor, Tensor, int, int, Tensor]:
    """(scale, zero, qmin, qmax, ratio) per (row, group), each shaped [rows, n_groups, 1].

    ``ratio`` is the chosen clip ratio (1 without the search); the clipped range is
    ``_shrink(lo, hi, ratio)`` of the group's min-max range."""
    g = _groups(w, group_size).to(working_dtype(w.dtype))
    lo = g.amin(-1, keepdim=True).clamp_max(0)  # the range holds zero: an exact integer zero point
    hi = g.amax(-1, keepdim=True).clamp_min(0)
    ratios = clip_ratios(min_ratio, clip_steps) if clip_search else [1.0]
    best_err = best = None
    for r in ratios:
        params = _grid(*_shrink(lo, hi, r), bits, symmetric)
        err = (_qdq(g, *params) - g).square().sum(-1, keepdim=True)
        if best is None:
            best_err, best = err, (*params[:2], torch.full_like(err, r))
            continue
        better = err < best_err  # strict: ties keep the wider (earlier) range
        best_err = torch.where(better, err, best_err)
        best = tuple(
            torch.where(better, new, old) for new, old in zip((*params[:2], r), best, strict=True)
        )
    scale, zero, ratio = best
    return scale, zero, *code_range(bits, symmetric), ratio


def fake_quant_weight(w: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize-dequantize ``w`` [rows, cols] on the grid of :func:`weight_qparams`."""
    n_groups = scale.shape[1]
    g = _groups(w, None if n_groups == 1 else w.shape[1] // n_groups).to(scale.dtype)
    return _qdq(g, scale, zero, qmin, qmax).flatten(1).to(w.dtype)


def rtn_quantize(w: Tensor, config: WeightQuantConfig) -> tuple[Tensor, dict[str, Any]]:
    """Round-to-nearest (with the clip search when enabled): (quantized weight, stats)."""
    scale, zero, qmin, qmax, ratio = weight_qparams(
        w,
        config.bits,
        group_size=config.group_size,
        symmetric=config.symmetric,
        clip_search=config.clip_search,
        min_ratio=config.min_ratio,
        clip_steps=config.clip_steps,
    )
    return fake_quant_weight(w, scale, zero, qmin, qmax), {"mean_clip_ratio": float(ratio.mean())}
