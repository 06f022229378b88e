"""User-facing drivers that run a model through the backend in observer mode.

* ``stamp_fx.explain(model, *inputs, **options)``: compiles without Inductor, runs the example
  inputs once (float, unquantized) and prints every site with its role, shape, policy, the share
  of activation energy its high-precision tokens hold on these inputs, and the reason for every
  skipped site.
* ``stamp_fx.calibrate(model, batches, config, **options)``: runs calibration batches and
  returns a calibrated :class:`~stamp_fx.plan.AllocationPlan` (see ``calibrate.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .backend import StampCompiler
from .calibrate import EnergyObserver, run_batch
from .config import StampConfig, from_options
from .plan import AllocationPlan
from .progress import progress

__all__ = ["explain", "calibrate", "Explanation"]


class Explanation:
    """What :func:`explain` found: ``records`` (one per compiled graph), ``plan`` and ``table``."""

    def __init__(self, records: list, plan: AllocationPlan, table: str):
        self.records, self.plan, self.table = records, plan, table

    def __str__(self) -> str:
        return self.table


def explain(
    model: torch.nn.Module,
    *example_inputs: Any,
    print_table: bool = True,
    causal: bool | None = None,
    **options: Any,
) -> Explanation:
    """Print (and return) the site table for ``model`` on ``example_inputs``; keyword
    arguments are the backend's options (``transform=``, ``quantize_kv=``, ``overrides=``, ...)."""
    options.pop("inductor", None)
    config, backend = from_options(options)
    observer = EnergyObserver()
    compiler = StampCompiler(
        config,
        inductor=False,
        plan=backend.plan,
        debug_dir=backend.debug_dir,
        observer=observer,
        causal=causal,
    )
    compiled = torch.compile(model, backend=compiler)
    batch = (
        example_inputs[0]
        if len(example_inputs) == 1 and isinstance(example_inputs[0], dict)
        else tuple(example_inputs)
    )
    with torch.no_grad():
        run_batch(compiled, batch)
    plan = observer.finalize(compiler.merged_plan(), config.replace(avg_bits=None))
    fractions = plan.meta.get("energy_fraction", {})
    tables = [rec.site_table(fractions) for rec in compiler.records]
    table = "\n\n".join(f"graph {i}:\n{t}" if len(tables) > 1 else t for i, t in enumerate(tables))
    if print_table:
        print(table)
    return Explanation(compiler.records, plan, table)


def calibrate(
    model: torch.nn.Module,
    batches: Iterable[Any],
    config: StampConfig | None = None,
    *,
    show_progress: bool = True,
    causal: bool | None = None,
    **options: Any,
) -> AllocationPlan:
    """Run ``batches`` through ``model`` and return a calibrated plan (see the module docstring).

    ``options`` are the backend's policy options (``transform=``, ``avg_bits=``, ...), merged
    over ``config``.
    """
    config = merged_config(config, options)
    observer = EnergyObserver()
    compiler = run_observed(
        model,
        batches,
        config,
        observer,
        causal=causal,
        desc="stamp calibrate",
        show_progress=show_progress,
    )
    return observer.finalize(compiler.merged_plan(), config)


def merged_config(config: StampConfig | None, options: dict[str, Any]) -> StampConfig:
    """``options`` (validated like the backend's) merged over ``config``."""
    return from_options({**options, **({"config": config} if config is not None else {})})[0]


def run_observed(
    model: torch.nn.Module,
    batches: Iterable[Any],
    config: StampConfig,
    observer: Any,
    *,
    causal: bool | None,
    desc: str,
    show_progress: bool,
    after_batch: Callable[[Any], None] | None = None,
) -> StampCompiler:
    """Compile ``model`` in observer mode (no Inductor), run every batch without gradients and
    return the compiler (its records hold the sites and plans the observer saw).

    ``after_batch(batch)``, when given, runs after each batch went through the compiled model,
    with gradients enabled (the tuner's loss-gradient pass)."""
    batches = list(batches)
    if not batches:
        raise ValueError(f"{desc}: needs at least one batch")
    compiler = StampCompiler(config, inductor=False, observer=observer, causal=causal)
    compiled = torch.compile(model, backend=compiler)
    with torch.no_grad():
        for batch in progress(batches, desc=desc, enabled=show_progress):
            run_batch(compiled, batch)
            if after_batch is not None:
                with torch.enable_grad():
                    after_batch(batch)
    return compiler
