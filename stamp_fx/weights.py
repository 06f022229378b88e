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

Layout: this module holds the config, the choice of linears, the :class:`WeightPlan` record and
the driver; the quantizer itself (pure functions on one weight) is :mod:`stamp_fx.weight_quantizer`,
its names re-exported here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .options import WEIGHT_OPTION_NAMES  # the backend rejects these as compile options

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
WEIGHT_PLAN_VERSION = 1

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


@dataclass(frozen=True, slots=True)
class WeightSite:
    """What was done to one linear's weight."""

    method: str
    bits: int
    group_size: int | None
    symmetric: bool
    shape: tuple[int, int]
    rel_error: float
    """``||W_hat - W|| / ||W||`` (Frobenius)."""
    detail: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"{self.method} w{self.bits} {g} {'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["shape"] = list(self.shape)
        out["detail"] = dict(self.detail)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str) -> WeightSite:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; valid: {', '.join(names)}")
        kwargs = dict(data)
        kwargs["shape"] = tuple(kwargs.get("shape", ()))
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"{where}: {err}") from None


@dataclass(frozen=True)
class WeightPlan:
    """Module FQN -> :class:`WeightSite`, the quantized weights (``tensors``, FQN -> float
    tensor), the modules left float with their reasons, and ``meta`` (config, rotation note)."""

    sites: Mapping[str, WeightSite]
    tensors: Mapping[str, Tensor]
    skipped: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    version: int = WEIGHT_PLAN_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", dict(sorted(self.sites.items())))
        object.__setattr__(self, "skipped", dict(sorted(self.skipped.items())))
        missing = sorted(set(self.sites) - set(self.tensors))
        if missing:
            raise ValueError(f"weight plan: site(s) without a quantized tensor: {missing[:5]}")

    def site_summary(self) -> dict[str, str]:
        """Activation-site key (``fqn:in``) -> one-line description, for ``AllocationPlan.meta``."""
        return {f"{fqn}:in": s.describe() for fqn, s in self.sites.items()}

    def attach(self, plan):
        """A copy of an ``AllocationPlan`` whose ``meta["weights"]`` records, per linear-input
        site, the method/bits/group of the weight behind it (the tensors stay in this plan)."""
        from .plan import AllocationPlan

        meta = {**plan.meta, "weights": self.site_summary()}
        return AllocationPlan(
            sites=plan.sites, skipped=plan.skipped, tensors=plan.tensors, meta=meta
        )

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> list[str]:
        """Copy the quantized weights into ``model`` (a fresh copy of the model they came from);
        returns the FQNs written. Shapes must match; dtype and device follow the model's."""
        done = []
        for fqn in self.sites:
            try:
                module = model.get_submodule(fqn)
            except AttributeError:
                raise ValueError(f"weight plan: model has no module {fqn!r}") from None
            w = self.tensors[fqn]
            if tuple(module.weight.shape) != tuple(w.shape):
                raise ValueError(
                    f"weight plan: {fqn}.weight is {tuple(module.weight.shape)}, the plan's is {tuple(w.shape)}"
                )
            module.weight.data.copy_(w.to(module.weight.device, module.weight.dtype))
            done.append(fqn)
        return done

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "meta": dict(self.meta),
            "sites": {k: v.to_dict() for k, v in self.sites.items()},
            "skipped": dict(self.skipped),
        }

    def save(self, path: str | Path) -> Path:
        """JSON at ``path`` and the tensors in ``<stem>.weights.safetensors`` beside it."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()},
            str(weight_tensor_path(path)),
        )
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> WeightPlan:
        if not isinstance(data, Mapping):
            raise ValueError(f"weight plan: must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"version", "meta", "sites", "skipped"})
        if unknown:
            raise ValueError(
                f"weight plan: unknown key(s) {unknown}; valid: version, meta, sites, skipped"
            )
        if data.get("version") != WEIGHT_PLAN_VERSION:
            raise ValueError(
                f"weight plan: field 'version' must be {WEIGHT_PLAN_VERSION}, got {data.get('version')!r}"
            )
        sites = {
            k: WeightSite.from_dict(v, where=f"weight plan site {k!r}")
            for k, v in dict(data.get("sites", {})).items()
        }
        return cls(
            sites=sites,
            tensors=dict(tensors),
            skipped=dict(data.get("skipped", {})),
            meta=dict(data.get("meta", {})),
        )


def weight_tensor_path(path: Path) -> Path:
    return path.with_suffix(".weights.safetensors")


def load_weight_plan(path: str | Path) -> WeightPlan:
    """Load a :class:`WeightPlan` saved by :meth:`WeightPlan.save` (JSON + safetensors; no pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weight plan: no such file {str(path)!r}")
    tensor_file = weight_tensor_path(path)
    if not tensor_file.is_file():
        raise ValueError(f"weight plan: missing tensor file {str(tensor_file)!r}")
    return WeightPlan.from_dict(json.loads(path.read_text()), load_file(str(tensor_file)))


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
