"""The ``stamp`` torch.compile backend: analysis -> plan -> passes -> Inductor.

``torch.compile(model, backend="stamp", options={...})`` (registered through the
``torch_dynamo_backends`` entry point) or ``torch.compile(model, backend=StampCompiler(config))``.
Options are validated by :func:`stamp_fx.options.from_options`; ``mode`` is mapped onto Inductor's
config (``default``, ``reduce-overhead``, ``max-autotune``, ``max-autotune-no-cudagraphs``) and
rejected when Inductor is off. Every compiled graph is kept in ``StampCompiler.records``.

Decode: a graph whose attention query is one token reading a longer KV cache
(:func:`stamp_fx.analysis.is_decode_graph`) is planned with ``decode=True`` (its one-token linear
inputs, and with ``quantize_kv`` the new token's K/V at the cache write, get ``decode_bits``,
see :func:`stamp_fx.planner.decode_policy` and :mod:`stamp_fx.kv_cache`). ``with
compiler.bit_meter() as meter:`` counts, call by call, the average activation bits of what the
compiled graphs quantize (prefill and decode apart, :mod:`stamp_fx.bit_meter`;
:func:`generation_bits` wraps a ``generate()``).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from . import ops as _ops  # noqa: F401  (registers the stamp:: ops)
from .analysis import (
    Site,
    find_padding_mask,
    find_sites,
    is_decode_graph,
    looks_causal,
    unrecognised_linears,
)
from .bit_meter import BitMeter, graph_bits
from .config import SOLVER_FIELDS, StampConfig, solver_fields_set
from .debug import DebugWriter, format_site_table, resolve_debug_dir
from .lowering import DEFAULT_LOWERING, get_lowering
from .options import BackendOptions, from_options, reject_solver_options
from .passes import EAGER_PASSES, PASSES, PassContext, PassRecord, run_passes
from .plan import AllocationPlan, load_plan
from .planner import fit_plan, plan_sites

__all__ = [
    "StampCompiler",
    "CompileRecord",
    "generation_bits",
    "stamp_backend",
    "INDUCTOR_MODES",
]

INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileRecord:
    """What one backend call saw and did."""

    graph: fx.GraphModule
    sites: list[Site]
    plan: AllocationPlan
    passes: list[PassRecord]
    pass_seconds: float
    compile_seconds: float
    debug_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def site_table(self, energy_fraction: dict[str, float] | None = None) -> str:
        return format_site_table(self.sites, self.plan, energy_fraction)


def _mode_patches(mode: str | None, inductor: bool) -> dict[str, Any]:
    if mode in (None, "default"):
        return {}
    if mode not in INDUCTOR_MODES:
        raise ValueError(f"mode: unknown {mode!r}; valid modes: {', '.join(INDUCTOR_MODES)}")
    if not inductor:
        raise ValueError(
            f"mode={mode!r} tunes Inductor, but options inductor=False compiles without it"
        )
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


class StampCompiler:
    """A torch.compile backend object: ``torch.compile(model, backend=StampCompiler(config))``.

    ``causal`` overrides the graph-based guess of whether the model is a causal LM (which sets
    ``sink_tokens`` when the config leaves it on auto). ``observer`` (calibration: an object with
    ``watch(plan)`` and ``observe(x, site_keys, seq_dim) -> x``) replaces the quantization ops by
    eager calls that see each site's float input.
    """

    def __init__(
        self,
        config: StampConfig | None = None,
        *,
        inductor: bool = True,
        plan: Any = None,
        debug_dir: str | None = None,
        lowering: str = DEFAULT_LOWERING,
        kernel: str | None = None,
        mode: str | None = None,
        causal: bool | None = None,
        observer: Callable | None = None,
    ):
        self.config = config or StampConfig()
        if observer is None:  # calibration (observer mode) is where the solver options act
            reject_solver_options(solver_fields_set(self.config))
        self.options = BackendOptions(
            inductor=inductor, plan=plan, debug_dir=debug_dir, lowering=lowering, kernel=kernel,
            mode=mode,
        )  # fmt: skip
        # validates the name against the registry
        self.lowering = get_lowering(self.options.lowering)
        self.plan = load_plan(plan) if plan is not None else None
        self.config_patches = _mode_patches(mode, inductor)
        self.causal = causal
        self.observer = observer
        self.records: list[CompileRecord] = []
        self._meter: BitMeter | None = None

    @classmethod
    def from_options(
        cls, options: dict[str, Any] | None = None, mode: str | None = None, **kwargs
    ) -> StampCompiler:
        if kwargs.get("observer") is None:
            # Named even when given at their default value: the option does nothing here.
            reject_solver_options([k for k in SOLVER_FIELDS if k in (options or {})])
        config, backend = from_options(options, mode)
        return cls(
            config,
            inductor=backend.inductor,
            plan=backend.plan,
            debug_dir=backend.debug_dir,
            lowering=backend.lowering,
            mode=backend.mode,
            **kwargs,
        )

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        start = time.perf_counter()
        try:
            sites = find_sites(gm)
        except Exception as err:  # an unforeseen graph shape must not take the model down
            warnings.warn(
                f"stamp: site analysis failed ({type(err).__name__}: {err}); compiling without STaMP",
                stacklevel=2,
            )
            sites = []
        causal = looks_causal(gm) if self.causal is None else self.causal
        decode = _is_decode(gm)
        if self.plan is not None:
            _warn_plan_coverage(sites, self.plan)
            plan, conflicts = fit_plan(sites, self.plan)
        else:
            plan, conflicts = plan_sites(sites, self.config, causal=causal, decode=decode)
        missed = _unrecognised_linears(gm)
        if missed:
            warnings.warn(
                f"stamp: {len(missed)} matmul-like call(s) on parameters are not recognised as "
                f"linear layers and run unquantized: {_few(missed)}",
                stacklevel=2,
            )
        if not any(s.slot == "in" for s in sites):
            warnings.warn(
                "stamp: the graph has no linear layers; compiling it without STaMP", stacklevel=2
            )
        _warn_unhandled(sites, plan, kv=self.config.quantize_kv)
        _warn_conflicts(conflicts)
        if self.config.enabled or self.plan is not None:
            _warn_nothing_quantized(sites, plan)
        if self.observer is not None:
            self.observer.watch(plan)
        elif any(p.transform == "klt" and p.autocorr_key is None for p in plan.sites.values()):
            raise ValueError(
                "transform 'klt' needs a calibrated plan: plan = stamp_fx.calibrate(model, batches, "
                "transform='klt'), then options={'plan': plan}"
            )
        debug_root = resolve_debug_dir(self.options.debug_dir)
        writer = DebugWriter(debug_root, self.config.to_json()) if debug_root is not None else None
        eager = not self.options.inductor or self.observer is not None
        ctx = PassContext(
            sites=sites,
            plan=plan,
            debug=writer,
            observer=self.observer.observe if self.observer else None,
            lowering=None if eager else self.lowering,
            padding_mask=find_padding_mask(gm),
        )
        pass_records = run_passes(gm, ctx, EAGER_PASSES if eager else PASSES)
        pass_seconds = time.perf_counter() - start
        if writer is not None:
            writer.write_plan(plan)
            writer.write_text("sites.txt", format_site_table(sites, plan))
        compiled = self._lower(gm, example_inputs)
        bits = graph_bits(sites, plan)
        record = CompileRecord(
            graph=gm,
            sites=sites,
            plan=plan,
            passes=pass_records,
            pass_seconds=pass_seconds,
            compile_seconds=time.perf_counter() - start,
            debug_dir=str(writer.dir) if writer is not None else None,
            extra={"decode": decode, "bits": bits},
        )
        self.records.append(record)
        return self._metered(compiled, record)

    def _metered(self, compiled: Callable, record: CompileRecord) -> Callable:
        """``compiled``, counting each call into the active :meth:`bit_meter` (one attribute
        test per call when none is active); Dynamo's calling convention is kept."""

        def run(*args, **kwargs):
            meter = self._meter
            if meter is not None:
                meter.add(record)
            return compiled(*args, **kwargs)

        if getattr(compiled, "_boxed_call", False):
            run._boxed_call = True
        return run

    @contextlib.contextmanager
    def bit_meter(self):
        """``with compiler.bit_meter() as meter: model(...)``: a :class:`BitMeter` of every call
        of a graph this compiler compiled (before or inside the block)."""
        meter = self._meter = BitMeter()
        try:
            yield meter
        finally:
            self._meter = None

    def _lower(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if not self.options.inductor or self.observer is not None:
            return gm.forward
        return self.lowering.compile_fx(gm, example_inputs, config_patches=self.config_patches)

    @property
    def last(self) -> CompileRecord:
        if not self.records:
            raise RuntimeError(
                "StampCompiler has not compiled anything yet (run the compiled model first)"
            )
        return self.records[-1]

    def merged_plan(self) -> AllocationPlan:
        """One plan covering every graph compiled so far (graph breaks give several)."""
        sites, skipped, tensors = {}, {}, {}
        for rec in self.records:
            sites.update(rec.plan.sites)
            skipped.update(rec.plan.skipped)
            tensors.update(rec.plan.tensors)
        meta = self.records[-1].plan.meta if self.records else {}
        return AllocationPlan(
            sites=sites,
            skipped={k: v for k, v in skipped.items() if k not in sites},
            tensors=tensors,
            meta=meta,
        )


def _is_decode(gm: fx.GraphModule) -> bool:
    try:
        return is_decode_graph(gm)
    except Exception:  # an unforeseen graph shape: plan it as a prefill
        return False


def generation_bits(model, compiler: StampCompiler | None = None, **generate_kwargs) -> BitMeter:
    """Run ``model.generate(**generate_kwargs)`` with ``model.forward`` compiled by ``compiler``
    (default ``StampCompiler()``) and return the :class:`BitMeter` of that whole generation
    (the prefill call and every decode step). ``model.forward`` is restored afterwards."""
    import torch

    compiler = compiler or StampCompiler()
    forward = model.forward
    model.forward = torch.compile(forward, backend=compiler)
    try:
        with compiler.bit_meter() as meter, torch.no_grad():
            model.generate(**generate_kwargs)
    finally:
        model.forward = forward
    return meter


def _warn_unhandled(sites: Sequence[Site], plan: AllocationPlan, kv: bool = False) -> None:
    """Warn about in-block sites the analysis could not handle (they run unquantized): linear
    inputs, and with ``quantize_kv`` K/V too (e.g. eager attention, which has no K/V site)."""
    slots = ("in", "k", "v") if kv else ("in",)
    bad = [s for s in sites if s.in_block and s.reason is not None and s.slot in slots]
    if bad:
        listing = "; ".join(f"{s.key}: {s.reason}" for s in bad[:5])
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        warnings.warn(
            f"stamp: {len(bad)} site(s) compiled without STaMP: {listing}{more}", stacklevel=3
        )


def _unrecognised_linears(gm: fx.GraphModule) -> list[str]:
    try:
        return unrecognised_linears(gm)
    except Exception:  # a diagnostic must never take the compile down
        return []


def _few(keys: Sequence[str], n: int = 5) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _warn_conflicts(conflicts: dict[str, str]) -> None:
    """Warn about every site an option does not fit (it runs unquantized), with its reason."""
    if not conflicts:
        return
    by_reason: dict[str, list[str]] = {}
    for key, reason in conflicts.items():
        by_reason.setdefault(reason, []).append(key)
    listing = "; ".join(f"{reason}: {_few(keys, 3)}" for reason, keys in by_reason.items())
    warnings.warn(
        f"stamp: {len(conflicts)} site(s) compiled without STaMP because an option does not "
        f"fit them: {listing}",
        stacklevel=3,
    )


def _warn_nothing_quantized(sites: Sequence[Site], plan: AllocationPlan) -> None:
    """A compile that quantizes no site at all says so, with the commonest reasons."""
    keys = [s.key for s in sites]
    if not keys or not any(s.slot == "in" for s in sites):
        return  # no sites / no linears: warned about separately
    if any(k in plan.sites for k in keys):
        return
    reasons: dict[str, int] = {}
    for k in keys:
        r = plan.skipped.get(k, "not in the plan")
        reasons[r] = reasons.get(r, 0) + 1
    listing = "; ".join(
        f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda item: -item[1])[:4]
    )
    warnings.warn(
        f"stamp: 0 of {len(keys)} sites quantized: the graph runs in float. Reasons: {listing}",
        stacklevel=3,
    )


def _warn_plan_coverage(sites: Sequence[Site], plan: AllocationPlan) -> None:
    """A pinned plan must fit the graph: warn about quantizable sites it leaves out and about
    sites it names that this graph lacks (a plan saved for another model, or a graph break
    that put them in another graph)."""
    graph_keys = {s.key for s in sites}
    named = set(plan.sites) | set(plan.skipped)
    uncovered = [s.key for s in sites if s.reason is None and s.in_block and s.key not in named]
    if uncovered:
        warnings.warn(
            f"stamp: the pinned plan leaves {len(uncovered)} of {len(graph_keys)} site(s) of this "
            f"graph uncovered (they run unquantized): {_few(uncovered)}",
            stacklevel=3,
        )
    absent = sorted(k for k in plan.sites if k not in graph_keys)
    if absent:
        warnings.warn(
            f"stamp: {len(absent)} of the pinned plan's {len(plan.sites)} quantized site(s) are "
            f"not in this graph: {_few(absent)} (a plan for another model, or a graph break "
            "put them in another graph)",
            stacklevel=3,
        )


def stamp_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """Entry point of ``torch.compile(model, backend="stamp", options=..., mode=...)``."""
    return StampCompiler.from_options(options, mode)(gm, example_inputs)
