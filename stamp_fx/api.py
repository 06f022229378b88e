"""User-facing drivers that run a model through the backend in observer mode.

* ``stamp_fx.explain(model, *inputs, **options)``: compiles without Inductor, runs the example
  inputs once (float, unquantized) and prints every site with its role, shape, policy, the share
  of activation energy its high-precision tokens hold on these inputs, and the reason for every
  skipped site.
* ``stamp_fx.calibrate(model, batches, config, **options)``: runs calibration batches and
  returns a calibrated :class:`~stamp_fx.plan.AllocationPlan` (see ``calibrate.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .backend import StampCompiler
from .calibrate import EnergyObserver, run_batch
from .clip_search import ClipSearch, clip_ratios_from
from .config import StampConfig
from .debug import format_site_table
from .options import from_options
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
    arguments are the backend's options (``transform=``, ``quantize_kv=``, ``overrides=``, ...).

    ``plan`` and ``debug_dir`` are honoured; ``avg_bits`` (with ``allowed_bits`` /
    ``allocation_metric``) solves the bits on these inputs and the table shows them. explain
    never runs Inductor, so ``lowering`` (old name ``kernel``), ``mode`` and ``inductor=True`` raise."""
    if options.get("inductor", False) is not False:
        raise ValueError(
            f"inductor: explain runs the graph without Inductor; got inductor={options['inductor']!r} "
            "(leave it out, or compile with torch.compile(model, backend='stamp') to use Inductor)"
        )
    options.pop("inductor", None)
    _reject_backend_options("explain", options, ("lowering", "kernel", "mode"))
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
    plan = observer.finalize(compiler.merged_plan(), config)
    fractions = plan.meta.get("energy_fraction", {})
    tables = [format_site_table(rec.sites, plan, fractions) for rec in compiler.records]
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
    clip_search: bool | Sequence[float] = False,
    **options: Any,
) -> AllocationPlan:
    """Run ``batches`` through ``model`` and return a calibrated plan (see the module docstring).

    ``clip_search=True`` (or a list of candidate ratios in (0, 1]) also picks each site's clip
    ratios, for its tokens below ``high_bits`` and for those at it, by least quantization error
    on ``batches`` (:mod:`stamp_fx.clip_search`); the plan stores them.

    ``options`` are the backend's policy options (``transform=``, ``avg_bits=``, ...), merged
    over ``config``, and ``debug_dir`` (graph dumps of the calibration graphs); the other
    backend options (``plan``, ``lowering`` / ``kernel``, ``mode``, ``inductor``) raise: calibration builds
    the plan and runs without Inductor.
    """
    config, debug_dir = merged_config(config, options, what="calibrate")
    ratios = clip_ratios_from(clip_search)
    search = None
    if ratios is not None:
        search = ClipSearch(ratios, config.allowed_bits if config.avg_bits is not None else ())
    observer = EnergyObserver(search)
    compiler = run_observed(
        model,
        batches,
        config,
        observer,
        causal=causal,
        desc="stamp calibrate",
        show_progress=show_progress,
        debug_dir=debug_dir,
    )
    return observer.finalize(compiler.merged_plan(), config)


_CALIBRATION_ONLY_BACKEND = ("plan", "lowering", "kernel", "mode", "inductor")


def _reject_backend_options(what: str, options: dict[str, Any], names: tuple[str, ...]) -> None:
    given = [k for k in names if k in options]
    if given:
        raise ValueError(
            f"{', '.join(given)}: {what} does not accept "
            f"{'this backend option' if len(given) == 1 else 'these backend options'} (it runs "
            "the model eagerly in observer mode to build a plan); pass "
            f"{'it' if len(given) == 1 else 'them'} to torch.compile(model, backend='stamp', "
            "options={...}) with the plan instead. Accepted here: the policy options and debug_dir"
        )


def merged_config(
    config: StampConfig | None, options: dict[str, Any], *, what: str = "calibrate"
) -> tuple[StampConfig, str | None]:
    """``options`` (validated like the backend's) merged over ``config``, and ``debug_dir``.
    The backend options a calibration run cannot honour raise (see :func:`calibrate`)."""
    _reject_backend_options(what, options, _CALIBRATION_ONLY_BACKEND)
    config, backend = from_options(
        {**options, **({"config": config} if config is not None else {})}
    )
    return config, backend.debug_dir


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
    debug_dir: str | None = None,
) -> StampCompiler:
    """Compile ``model`` in observer mode (no Inductor), run every batch without gradients and
    return the compiler (its records hold the sites and plans the observer saw).

    ``after_batch(batch)``, when given, runs after each batch went through the compiled model,
    with gradients enabled (the tuner's loss-gradient pass)."""
    batches = list(batches)
    if not batches:
        raise ValueError(f"{desc}: needs at least one batch")
    compiler = StampCompiler(
        config, inductor=False, observer=observer, causal=causal, debug_dir=debug_dir
    )
    compiled = torch.compile(model, backend=compiler)
    with torch.no_grad():
        for batch in progress(batches, desc=desc, enabled=show_progress):
            run_batch(compiled, batch)
            if after_batch is not None:
                with torch.enable_grad():
                    after_batch(batch)
    return compiler
