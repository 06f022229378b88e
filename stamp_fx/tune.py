"""Per-layer bit-budget tuning: measure each site's sensitivity, solve a global budget, write a plan.

``tune(model, batches, avg_bits=4.25)``:

1. compiles ``model`` in observer mode (no Inductor) and runs the calibration batches; at every
   planned site it quantizes the float input with each candidate number of high-precision tokens
   (``high_token_grid``) and measures the error *at the output of every linear reading it*,
   ``||(x_hat - x) W^T||^2``, next to the Theorem-1 prediction for the same option;
2. turns each site into a :class:`~stamp_fx.allocation.LayerCurve` (average bits of each option
   at the calibration length and its measured output noise-to-signal ratio
   ``||(x_hat - x) W^T||^2 / ||x W^T||^2``: relative, because RMSNorm/LayerNorm downstream
   rescales every layer's output, so absolute errors of layers with large outputs would
   otherwise dominate; weighted by the activation size ``tokens x features``) and solves the
   global budget with
   :func:`~stamp_fx.allocation.allocate_layer_budgets`;
3. returns a :class:`TuneResult` whose ``plan`` gives every site its chosen ``high_tokens``
   (``plan.meta["tune"]`` records the budget, the achieved average and each site's curve).

The paper's uniform rule is the special case where every site takes the same option.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .allocation import LayerCurve, allocate_layer_budgets
from .api import merged_config, run_observed
from .config import StampConfig
from .plan import AllocationPlan, SitePolicy
from .reference import theorem1_bound

__all__ = ["DEFAULT_HIGH_TOKEN_GRID", "SiteSensitivity", "TuneResult", "tune"]

DEFAULT_HIGH_TOKEN_GRID = (0, 16, 32, 64, 96, 128, 192, 256, 384, 512)


@dataclass
class SiteSensitivity:
    """Accumulated over the calibration batches for one site."""

    key: str
    features: int
    tokens: int = 0
    signal: float = 0.0  # sum ||x W^T||^2 over the consumers
    error: dict[int, float] = field(
        default_factory=dict
    )  # high_tokens -> sum ||(x_hat - x) W^T||^2
    bound: dict[int, float] = field(
        default_factory=dict
    )  # high_tokens -> Theorem-1 bound on ||x_hat - x||^2
    bits: dict[int, float] = field(
        default_factory=dict
    )  # high_tokens -> average bits at the last length

    def sqnr_db(self, high_tokens: int) -> float:
        import math

        err = self.error[high_tokens]
        return math.inf if err == 0 else 10 * math.log10(self.signal / err)


class SensitivityObserver:
    """Observer-mode callback measuring output error per site and option (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, grid: Sequence[int]):
        self.model = model
        self.grid = tuple(grid)
        self.policies: dict[str, SitePolicy] = {}
        self.sites: dict[str, SiteSensitivity] = {}

    def watch(self, plan: AllocationPlan) -> None:
        self.policies.update(plan.sites)

    def _projection(self, key: str, features: int) -> Tensor | None:
        """``M`` with ``linear(x) = x @ M + b`` for a linear-input site (None for K/V sites,
        whose error is measured on the activation itself)."""
        fqn, _, slot = key.rpartition(":")
        if slot != "in":
            return None
        weight = getattr(self.model.get_submodule(fqn), "weight", None)
        if weight is None or weight.ndim != 2:
            return None
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
        return weight.T if weight.shape[1] == features else weight

    @torch.no_grad()
    def observe(self, x: Tensor, keys: tuple[str, ...], seq_dim: int) -> Tensor:
        length, xd = x.shape[seq_dim], x.detach()
        for key in keys:
            self._measure(key, xd, seq_dim, length)
        return x

    def _measure(self, key: str, x: Tensor, seq_dim: int, length: int) -> None:
        s = self.sites.setdefault(key, SiteSensitivity(key, x.shape[-1]))
        proj = self._projection(key, x.shape[-1])

        def energy(t: Tensor) -> float:
            return float(
                (t @ proj.to(t.dtype)).square().sum() if proj is not None else t.square().sum()
            )

        s.tokens += x.numel() // x.shape[-1]
        s.signal += energy(x)
        base = self.policies[key]
        for h in self.grid:
            if h < base.sink_tokens:
                continue
            policy = replace(base, high_tokens=h, bands=None)
            t = policy.make_transform()
            bits = policy.bit_vector(t, length)
            s.error[h] = s.error.get(h, 0.0) + energy(policy.apply(x, seq_dim) - x)
            s.bound[h] = s.bound.get(h, 0.0) + theorem1_bound(
                x, transform=t, bits=bits, sink_tokens=min(policy.sink_tokens, length),
                symmetric=policy.symmetric, group_size=policy.group_size, seq_dim=seq_dim,
            )  # fmt: skip
            s.bits[h] = sum(bits) / len(bits)


@dataclass
class TuneResult:
    plan: AllocationPlan
    sites: dict[str, SiteSensitivity]
    choice: dict[str, int]  # site key -> high_tokens
    avg_bits: float  # achieved, activation-size weighted, at the calibration length
    budget: float

    def report(self) -> str:
        rows = [("site", "bits", "high tokens", "bound (pred.)", "output err", "output SQNR dB")]
        for key, h in sorted(self.choice.items()):
            s = self.sites[key]
            rows.append(
                (
                    key,
                    f"{s.bits[h]:.3f}",
                    str(h),
                    f"{s.bound[h]:.3g}",
                    f"{s.error[h]:.3g}",
                    f"{s.sqnr_db(h):.1f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.append(
            f"budget {self.budget:.4f} bits, achieved {self.avg_bits:.4f} (activation-size weighted)"
        )
        return "\n".join(lines)

    def plot(self, path_prefix: str) -> list[str]:
        """Two PNGs: chosen bits per site and output SQNR per site."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = sorted(self.choice)
        paths = []
        for name, values, ylabel in (
            ("bits", [self.sites[k].bits[self.choice[k]] for k in keys], "average bits"),
            ("sqnr", [self.sites[k].sqnr_db(self.choice[k]) for k in keys], "output SQNR (dB)"),
        ):
            fig, ax = plt.subplots(figsize=(max(6, len(keys) * 0.06), 3.5))
            ax.bar(range(len(keys)), values)
            ax.set_xlabel("site (sorted by name)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"tuned plan at {self.budget:.3f} bits: {ylabel} per site", fontsize=9)
            fig.tight_layout()
            path = f"{path_prefix}_{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
        return paths


def tune(
    model: torch.nn.Module,
    batches: Iterable[Any],
    avg_bits: float,
    config: StampConfig | None = None,
    *,
    high_token_grid: Sequence[int] = DEFAULT_HIGH_TOKEN_GRID,
    show_progress: bool = True,
    causal: bool | None = None,
    **options: Any,
) -> TuneResult:
    """Tune per-site high-precision token counts for a global average of ``avg_bits``."""
    config = merged_config(config, options)
    # Options below a site's sinks are skipped per site; include 1 so a sink-only option exists.
    grid = sorted(set(high_token_grid) | {1})
    observer = SensitivityObserver(model, grid)
    compiler = run_observed(
        model,
        batches,
        config,
        observer,
        causal=causal,
        desc="stamp tune: sensitivity",
        show_progress=show_progress,
    )
    base = compiler.merged_plan()
    curves = []
    for key, s in observer.sites.items():
        curves.append(
            LayerCurve(
                key,
                float(s.tokens * s.features),
                tuple((s.bits[h], s.error[h] / max(s.signal, 1e-30)) for h in s.error),
            )
        )
    chosen_bits = allocate_layer_budgets(curves, avg_bits)
    choice = {}
    for curve in curves:
        s = observer.sites[curve.name]
        options_at = {
            s.bits[h]: h for h in sorted(s.bits, reverse=True)
        }  # fewest tokens per bit level
        choice[curve.name] = options_at[chosen_bits[curve.name]]
    total = sum(c.size for c in curves)
    achieved = sum(c.size * chosen_bits[c.name] for c in curves) / total if total else float("nan")
    sites = {k: replace(p, high_tokens=choice.get(k, p.high_tokens)) for k, p in base.sites.items()}
    meta = {
        **base.meta,
        "tune": {
            "budget": avg_bits,
            "achieved": achieved,
            "grid": list(grid),
            "curves": {c.name: [list(o) for o in c.options] for c in curves},
        },
    }
    plan = AllocationPlan(sites=sites, skipped=base.skipped, tensors=base.tensors, meta=meta)
    return TuneResult(plan, observer.sites, choice, achieved, avg_bits)
