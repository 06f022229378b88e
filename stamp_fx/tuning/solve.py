"""The tuner's driver and budget step: :func:`tune` measures, :func:`solve` allocates.

:class:`TuneResult` holds both (and can be solved again for another budget).

:func:`tune` runs the calibration batches in observer mode through a
:class:`~stamp_fx.tuning.sensitivity.SensitivityObserver` (with
:class:`~stamp_fx.tuning.loss_gradients.LossGradients` when the objective needs them), then
:func:`solve` turns every site into a :class:`~stamp_fx.allocation.LayerCurve` and solves the
global budget with :func:`~stamp_fx.allocation.allocate_layer_budgets`, writing the tuned plan
and its ``plan.meta["tune"]`` record (schema in :mod:`stamp_fx.tuning`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..allocation import LayerCurve, allocate_layer_budgets
from ..api import merged_config, run_observed
from ..bitwidths import is_finite_number, validate_bits
from ..config import StampConfig
from ..plan import AllocationPlan
from ..tune_report import format_report, keys_by_depth, plot
from .loss_gradients import LossFn, LossGradients
from .objectives import DEFAULT_OBJECTIVE, Option, check_objective
from .sensitivity import SensitivityObserver, SiteSensitivity

__all__ = ["DEFAULT_HIGH_TOKEN_GRID", "TUNE_META_SCHEMA", "TuneResult", "solve", "tune"]

DEFAULT_HIGH_TOKEN_GRID = (0, 16, 32, 64, 96, 128, 192, 256, 384, 512)
TUNE_META_SCHEMA = 2


@dataclass
class TuneResult:
    plan: AllocationPlan
    sites: dict[str, SiteSensitivity]
    choice: dict[str, Option]  # site key -> chosen option
    avg_bits: float  # achieved, activation-size weighted, at the calibration length
    budget: float
    objective: str = DEFAULT_OBJECTIVE
    base: AllocationPlan | None = None  # the untuned plan the sites came from

    def resolve(
        self,
        avg_bits: float | None = None,
        *,
        objective: str | None = None,
        options: Iterable[Option] | None = None,
    ) -> TuneResult:
        """The same measurements solved again for another budget, objective or option subset."""
        if self.base is None:
            raise ValueError("resolve needs the untuned plan (TuneResult.base)")
        return solve(
            self.sites,
            self.base,
            self.budget if avg_bits is None else avg_bits,
            objective=objective or self.objective,
            calibration_length=self.plan.meta.get("tune", {}).get("calibration_length", 0),
            options=options,
        )

    def report(self) -> str:
        """The table ``stamp-fx tune`` prints (:func:`stamp_fx.tune_report.format_report`)."""
        return format_report(self)

    def keys_by_depth(self) -> list[str]:
        """Site keys block by block (``layers.2`` before ``layers.10``), in graph order within
        a block, sites outside the blocks last."""
        return keys_by_depth(self)

    def plot(self, path_prefix: str) -> list[str]:
        """Two PNGs: the chosen bits as a layer x role map and output SQNR per site in depth
        order (:func:`stamp_fx.tune_report.plot`); returns their paths."""
        return plot(self, path_prefix)


def _check_grid(values: object, name: str, check: Callable[[Any], Any]) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}")
    out = tuple(values)
    if not out:
        raise ValueError(f"{name} must not be empty")
    for v in out:
        try:
            check(v)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name}: {err}") from None
    return out


def _check_high_tokens(v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"entries must be non-negative ints, got {v!r}")


def tune(
    model: torch.nn.Module,
    batches: Iterable[Any],
    avg_bits: float,
    config: StampConfig | None = None,
    *,
    objective: str = DEFAULT_OBJECTIVE,
    high_token_grid: Sequence[int] = DEFAULT_HIGH_TOKEN_GRID,
    low_bits_grid: Sequence[int] | None = None,
    loss_fn: LossFn | None = None,
    show_progress: bool = True,
    causal: bool | None = None,
    **options: Any,
) -> TuneResult:
    """Per-site ``high_tokens`` (and ``low_bits``) for a global average of ``avg_bits``.

    Contract: the achieved activation-size-weighted average at the calibration length never
    exceeds ``avg_bits`` (every site can always fall back to its cheapest option; a budget below
    that raises ``ValueError``); options are ``high_token_grid x low_bits_grid`` (default
    ``low_bits_grid``: the config's ``low_bits`` alone), plus ``high_tokens=1`` so a sink-only
    option exists; options below a site's sinks or with ``low_bits`` above its ``high_bits``
    are skipped for that site. ``objective`` picks the error the solver minimises (see the
    module docstring); ``loss_fn(model, batch) -> scalar`` is the loss of ``"fisher"`` (default
    :func:`next_token_loss`). ``options`` are the backend's policy options and ``debug_dir``;
    ``plan``, ``lowering`` (``kernel``), ``mode`` and ``inductor`` raise (tuning builds the plan, eagerly).
    """
    obj = check_objective(objective)
    if not is_finite_number(avg_bits):
        raise ValueError(f"avg_bits must be a finite number, got {avg_bits!r}")
    config, debug_dir = merged_config(config, options, what="tune")
    highs = _check_grid(high_token_grid, "high_token_grid", _check_high_tokens)
    lows = _check_grid(
        (config.low_bits,) if low_bits_grid is None else low_bits_grid,
        "low_bits_grid",
        lambda b: validate_bits(b, "entries"),
    )
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(
            f"loss_fn must be callable (model, batch) -> scalar tensor, got {loss_fn!r}"
        )
    high_grid = sorted(set(highs) | {1})
    grid = [Option(h, low) for low in sorted(set(lows)) for h in high_grid]
    observer = SensitivityObserver(model, grid)
    gradients = LossGradients(model, loss_fn) if obj.needs_gradients else None

    def after_batch(batch: Any) -> None:
        grads = gradients(observer.pending_keys, batch) if gradients is not None else None
        observer.finish_batch(grads)

    compiler = run_observed(
        model,
        batches,
        config,
        observer,
        causal=causal,
        desc=f"stamp tune: sensitivity ({obj.name})",
        show_progress=show_progress,
        after_batch=after_batch,
        debug_dir=debug_dir,
    )
    return solve(
        observer.sites,
        compiler.merged_plan(),
        avg_bits,
        objective=obj.name,
        calibration_length=observer.length,
    )


def solve(
    sites: Mapping[str, SiteSensitivity],
    base: AllocationPlan,
    avg_bits: float,
    *,
    objective: str = DEFAULT_OBJECTIVE,
    calibration_length: int = 0,
    options: Iterable[Option] | None = None,
) -> TuneResult:
    """The budget step of :func:`tune` on measured sensitivities: per site the option of least
    ``objective`` error at each bit level, then the global allocation at ``avg_bits``.

    ``options`` restricts the candidates (default: every measured option). Re-solving for another
    budget or objective needs no new measurement: ``result.resolve(4.5)``.
    """
    obj = check_objective(objective)
    allowed = None if options is None else set(options)
    curves, by_bits = [], {}
    for key, s in sites.items():
        best: dict[float, tuple[float, Option]] = {}  # avg bits -> (error, option), lowest error
        for o in s.bits:
            if allowed is not None and o not in allowed:
                continue
            if obj.needs_gradients and o not in s.fisher:
                raise ValueError(
                    f"objective {obj.name!r} needs loss gradients, which were not measured "
                    f"(site {key!r}); tune with objective={obj.name!r}"
                )
            err = obj.error(s, o)
            if s.bits[o] not in best or (err, o) < best[s.bits[o]]:
                best[s.bits[o]] = (err, o)
        if not best:
            raise ValueError(f"options: none of them was measured at site {key!r}")
        by_bits[key] = best
        curves.append(
            LayerCurve(
                key, float(s.tokens * s.features), tuple((b, e) for b, (e, _) in best.items())
            )
        )
    chosen_bits = allocate_layer_budgets(curves, avg_bits)
    choice = {c.name: by_bits[c.name][chosen_bits[c.name]][1] for c in curves}
    total = sum(c.size for c in curves)
    achieved = sum(c.size * chosen_bits[c.name] for c in curves) / total if total else float("nan")
    policies = {
        k: replace(p, high_tokens=choice[k].high_tokens, low_bits=choice[k].low_bits, bands=None)
        if k in choice
        else p
        for k, p in base.sites.items()
    }
    measured = sorted({o for s in sites.values() for o in s.bits})
    meta = {
        **{k: v for k, v in base.meta.items() if k != "tune"},
        "tune": {
            "schema": TUNE_META_SCHEMA,
            "objective": obj.name,
            "budget": avg_bits,
            "achieved": achieved,
            "calibration_length": calibration_length,
            "high_token_grid": sorted({o.high_tokens for o in measured}),
            "low_bits_grid": sorted({o.low_bits for o in measured}),
            "curves": {
                key: [
                    [o.high_tokens, o.low_bits, s.bits[o], obj.error(s, o)]
                    for o in sorted(s.bits)
                    if allowed is None or o in allowed
                ]
                for key, s in sites.items()
            },
            "chosen": {k: list(o) for k, o in sorted(choice.items())},
        },
    }
    plan = AllocationPlan(sites=policies, skipped=base.skipped, tensors=base.tensors, meta=meta)
    return TuneResult(plan, dict(sites), choice, achieved, avg_bits, obj.name, base)
