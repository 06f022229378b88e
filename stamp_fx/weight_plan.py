"""``WeightPlan``: what :func:`stamp_fx.quantize_weights` did to each linear, with the quantized
weights, saved as JSON plus a ``.weights.safetensors`` side file (plain tensors, never pickle)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["WEIGHT_PLAN_VERSION", "WeightSite", "WeightPlan", "load_weight_plan"]

WEIGHT_PLAN_VERSION = 1


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
