"""Weight quantization that composes with STaMP: round-to-nearest with an MSE clip search, or
GPTQ (``gptq.py``), applied *once* to every in-block linear, recorded in a :class:`WeightPlan`.

``stamp_fx.quantize_weights(model, method="rtn" | "gptq", bits=4, group_size=128, batches=...)``
replaces each in-block ``nn.Linear``'s weight data by its fake-quantized (dequantized) version,
in place and once (never per forward), and returns a :class:`WeightPlan` saying per module what
was done. The plan saves as JSON plus a ``.weights.safetensors`` side file holding the quantized
weights as plain tensors (never pickle); :meth:`WeightPlan.apply` loads them into a fresh model.

The weight grid (per output row, per group of ``group_size`` input columns, or the whole row):

* asymmetric (default): the group's min-max range widened to hold zero (``lo <= 0 <= hi``, as
  GPTQ's quantizer does), ``scale = (hi - lo) / (2**b - 1)``, integer zero point
  ``z = round(-lo / scale)`` clamped to the grid, ``w_hat = (clamp(round(w / scale) + z, 0,
  2**b - 1) - z) * scale``: the integer form a W4 kernel stores;
* symmetric: ``scale = max|w| / (2**(b-1) - 1)``, codes in ``-(2**(b-1)-1) .. 2**(b-1)-1``.

Scales are computed in float32 (float64 for float64 weights), like the activation quantizer.
The MSE clip search shrinks each group's range by the ratios of :func:`clip_ratios` (1 down to
``min_ratio``) toward zero (the range is never widened) and keeps, per group, the ratio of
least squared error (ties keep the wider range, so ratio 1 wins unless another is strictly better).

Rotations: stamp-fx's feature transform (``feature_transform="hadamard"``) runs online around the
activation quantizer and hands the linear its input back in the model's own basis, so no rotation
is folded into any weight; the weights are quantized in the model's basis (recorded in
``WeightPlan.meta["rotation"]``).

Layout: this module holds the config, the choice of linears and the driver; the record of what
was done is :mod:`stamp_fx.weight_plan`, the quantizer itself (pure functions on one weight) is
:mod:`stamp_fx.weight_quantizer`; the names of both are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .options import WEIGHT_OPTION_NAMES  # the backend rejects these as compile options
from .weight_plan import WeightPlan, WeightSite, load_weight_plan

# The pure quantizer lives in weight_quantizer; its names stay importable from here.
from .weight_quantizer import (
    clip_ratios,
    code_range,
    fake_quant_weight,
    rtn_quantize,
    weight_qparams,
)

__all__ = [
    "WEIGHT_BITS",
    "WEIGHT_METHODS",
    "WEIGHT_OPTION_NAMES",
    "WeightQuantConfig",
    "WeightSite",
    "WeightPlan",
    "block_linears",
    "clip_ratios",
    "code_range",
    "weight_qparams",
    "fake_quant_weight",
    "rtn_quantize",
    "quantize_weights",
    "load_weight_plan",
]

WEIGHT_BITS = (4, 8)
WEIGHT_METHODS = ("rtn", "gptq")

ROTATION_NOTE = (
    "none folded: stamp-fx's feature transform runs online around the activation quantizer, "
    "so weights are quantized in the model's own basis"
)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class WeightQuantConfig:
    """How weights are quantized (validated on construction; mistakes raise ``ValueError``)."""

    method: str = "rtn"
    """``"rtn"`` (round to nearest) or ``"gptq"`` (needs calibration batches)."""
    bits: int = 4
    group_size: int | None = 128
    """Input columns per range; None = one range per output channel."""
    symmetric: bool = False
    clip_search: bool = True
    """MSE search over shrink ratios of each group's range (RTN, and GPTQ's group ranges)."""
    min_ratio: float = 0.5
    clip_steps: int = 20
    block_size: int = 128
    """GPTQ: columns per lazy batch update."""
    damp: float = 0.01
    """GPTQ: ``damp * mean(diag H)`` is added to the Hessian's diagonal."""
    act_order: bool = False
    """GPTQ: quantize columns in order of decreasing Hessian diagonal (group ranges stay the
    static groups of the original column order, computed before any update)."""

    def __post_init__(self) -> None:
        if self.method not in WEIGHT_METHODS:
            raise ValueError(
                f"method: unknown weight quantization method {self.method!r}; valid: {', '.join(WEIGHT_METHODS)}"
            )
        if not _is_int(self.bits) or self.bits not in WEIGHT_BITS:
            raise ValueError(
                f"weight_bits: must be one of {', '.join(map(str, WEIGHT_BITS))}, got {self.bits!r}"
            )
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size <= 0):
            raise ValueError(
                f"weight_group_size: must be None (per output channel) or a positive int, got {self.group_size!r}"
            )
        for name in ("symmetric", "clip_search", "act_order"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.min_ratio, (int, float)) or not 0.0 < self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio: must be in (0, 1], got {self.min_ratio!r}")
        if not _is_int(self.clip_steps) or self.clip_steps < 1:
            raise ValueError(f"clip_steps: must be a positive int, got {self.clip_steps!r}")
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size: must be a positive int, got {self.block_size!r}")
        if (
            isinstance(self.damp, bool)
            or not isinstance(self.damp, (int, float))
            or not (self.damp > 0 and math.isfinite(self.damp))
        ):
            raise ValueError(f"damp: must be a positive number, got {self.damp!r}")

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        extra = " sym" if self.symmetric else " asym"
        extra += " clip-mse" if self.clip_search else ""
        extra += " act-order" if self.method == "gptq" and self.act_order else ""
        return f"{self.method} w{self.bits} {g}{extra}"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# -- which linears, and the record ----------------------------------------------------------


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` (subclasses included) inside the repeated blocks: a module whose FQN
    has a ModuleList index (``model.layers.3.mlp.down_proj``). The LM head and embeddings stay
    float, like the activation sites (STAMP.md section 5)."""
    return {
        fqn: m
        for fqn, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(part.isdigit() for part in fqn.split("."))
    }


# -- the driver -----------------------------------------------------------------------------


@torch.no_grad()
def quantize_weights(
    model: torch.nn.Module,
    method: str = "rtn",
    bits: int = 4,
    group_size: int | None = 128,
    *,
    batches: Iterable[Any] | None = None,
    symmetric: bool = False,
    clip_search: bool = True,
    act_order: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    show_progress: bool = True,
    causal: bool | None = None,
) -> WeightPlan:
    """Quantize every in-block linear's weight of ``model`` in place, once; return the record.

    ``method="gptq"`` needs ``batches`` (calibration inputs, as for ``stamp_fx.calibrate``): the
    model runs once through the backend in observer mode and each linear's Hessian
    ``H = 2 X^T X`` is accumulated from its float inputs (one pass over the unquantized model,
    not layer-sequential). ``method="rtn"`` takes no batches. Then compile the model as usual:
    ``torch.compile(model, backend="stamp", ...)`` adds STaMP activations on top.
    """
    config = WeightQuantConfig(
        method=method,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        clip_search=clip_search,
        act_order=act_order,
        block_size=block_size,
        damp=damp,
    )
    linears = block_linears(model)
    if not linears:
        raise ValueError(
            "quantize_weights: the model has no nn.Linear inside repeated blocks (ModuleList)"
        )
    if method == "rtn" and batches is not None:
        raise ValueError("batches: method='rtn' uses no calibration data (pass method='gptq')")
    hessians: dict[str, tuple[Tensor, int]] = {}
    if method == "gptq":
        if batches is None:
            raise ValueError("batches: method='gptq' needs calibration batches")
        from .gptq import collect_hessians

        hessians = collect_hessians(model, batches, causal=causal, show_progress=show_progress)
    from .progress import progress

    sites, tensors, skipped = {}, {}, {}
    for fqn, module in progress(
        list(linears.items()), desc=f"stamp weights ({method})", enabled=show_progress
    ):
        w = module.weight.data
        if method == "gptq":
            if fqn not in hessians:
                skipped[fqn] = (
                    "not observed: no calibration input reached it, or the analysis left its "
                    "site unquantizable (left float)"
                )
                continue
            from .gptq import gptq_quantize

            h, n = hessians[fqn]
            w_hat, detail = gptq_quantize(w, h, config)
            detail = {
                **detail,
                "calibration_tokens": n,
                "act_order": act_order,
                "damp": damp,
                "block_size": block_size,
            }
        else:
            w_hat, detail = rtn_quantize(w, config)
        detail = {**detail, "clip_search": clip_search}
        w_hat = w_hat.to(w.dtype)
        rel = float((w_hat.double() - w.double()).norm() / w.double().norm().clamp_min(1e-300))
        module.weight.data.copy_(w_hat)
        tensors[fqn] = w_hat.detach().cpu().clone()
        sites[fqn] = WeightSite(
            method=method,
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            shape=tuple(w.shape),
            rel_error=rel,
            detail=detail,
        )
    meta = {"config": config.to_dict(), "rotation": ROTATION_NOTE}
    return WeightPlan(sites=sites, tensors=tensors, skipped=skipped, meta=meta)
