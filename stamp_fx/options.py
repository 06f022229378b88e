"""``torch.compile(..., options=)`` into a :class:`~stamp_fx.config.StampConfig` (the
quantization policy) and :class:`BackendOptions` (what the backend itself does with it), and the
options the backend refuses by name with the call that does what was asked (the bit-allocation
solver, weight quantization)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Any

from .config import StampConfig

__all__ = [
    "DEFAULT_LOWERING",
    "WEIGHT_OPTION_NAMES",
    "BackendOptions",
    "from_options",
    "reject_solver_options",
    "reject_weight_options",
]

DEFAULT_LOWERING = "auto"
"""The lowering a compile gets when ``lowering`` is not given (see ``stamp_fx.lowering``)."""


def reject_solver_options(names: list[str] | tuple[str, ...]) -> None:
    """Raise for solver options given to the compile-time backend, which cannot honour them
    (the solver needs calibrated per-site energies; no default energy model stands in)."""
    if not names:
        return
    listed = ", ".join(names)
    raise ValueError(
        f"{listed}: the bit-allocation solver needs calibrated energies and does not run at "
        f"compile time, so {'this option is' if len(names) == 1 else 'these options are'} not "
        "accepted by the backend. Calibrate first: plan = stamp_fx.calibrate(model, batches, "
        "avg_bits=...) (or stamp_fx.tune(model, batches, avg_bits=...).plan), then "
        "torch.compile(model, backend='stamp', options={'plan': plan})"
    )


WEIGHT_OPTION_NAMES = (
    "weight_bits",
    "weight_group_size",
    "weight_method",
    "weight_symmetric",
    "weights",
)
"""Weight-quantization names a user might pass as compile options (see :func:`reject_weight_options`)."""


def reject_weight_options(names: list[str] | tuple[str, ...]) -> None:
    """Weights are quantized once, before compiling, by ``stamp_fx.quantize_weights``; the
    backend quantizes activations only, so these options would do nothing there: raise."""
    if not names:
        return
    raise ValueError(
        f"{', '.join(names)}: weight quantization is not a compile option (the backend "
        "quantizes activations only). Quantize the weights once first: wplan = "
        "stamp_fx.quantize_weights(model, method='rtn' or 'gptq', bits=4, group_size=128, "
        "batches=...), then torch.compile(model, backend='stamp', options={...})"
    )


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """Options of the backend itself (not of the quantization policy). Debug options never
    change what is compiled."""

    inductor: bool = True
    """Compile the rewritten graph with Inductor; False runs it eagerly (fast debugging)."""
    plan: Any = None
    """A saved plan (JSON path, dict or AllocationPlan) used verbatim instead of the policy."""
    debug_dir: str | None = None
    """Write graph dumps, plan.json and the site table here."""
    lowering: str = DEFAULT_LOWERING
    """How stamp ops are lowered in Inductor: a name from ``stamp_fx.lowering.available_lowerings()``
    (``auto``: the fastest correct op for each site and device; ``reference``: the eager
    reference, for debugging)."""
    kernel: str | None = None
    """The old name of ``lowering`` (it selects a lowering, not one kernel): still accepted,
    with a ``FutureWarning``; folded into ``lowering`` (and reset to None) on construction."""
    mode: str | None = None
    """torch.compile mode, mapped onto Inductor's config. torch.compile refuses ``mode=`` and
    ``options=`` together, so it may also be given as ``options={"mode": ...}``."""

    def __post_init__(self) -> None:
        if not isinstance(self.inductor, bool):
            raise ValueError(f"inductor: must be True or False, got {self.inductor!r}")
        if self.debug_dir is not None and not isinstance(self.debug_dir, (str, os.PathLike)):
            raise ValueError(f"debug_dir: must be a path, got {self.debug_dir!r}")
        if self.kernel is not None:
            if self.lowering not in (DEFAULT_LOWERING, self.kernel):
                raise ValueError(
                    f"lowering given twice: lowering={self.lowering!r} and its old name "
                    f"kernel={self.kernel!r}; pass lowering only"
                )
            warnings.warn(
                f"stamp option 'kernel' is now called 'lowering' (it selects a lowering); "
                f"use lowering={self.kernel!r}",
                FutureWarning,
                stacklevel=4,
            )
            object.__setattr__(self, "lowering", self.kernel)
            object.__setattr__(self, "kernel", None)
        if not isinstance(self.lowering, str):
            raise ValueError(f"lowering: must be a lowering name, got {self.lowering!r}")


def from_options(
    options: dict[str, Any] | None, mode: str | None = None
) -> tuple[StampConfig, BackendOptions]:
    """Split and validate ``torch.compile(..., options=...)`` into policy and backend options.

    Unknown keys raise ``ValueError`` listing every valid key.
    """
    options = dict(options or {})
    if "config" in options:
        base = options.pop("config")
        if not isinstance(base, StampConfig):
            raise ValueError(f"config: must be a StampConfig, got {type(base).__name__}")
    else:
        base = None
    reject_weight_options([k for k in options if k in WEIGHT_OPTION_NAMES])
    backend_keys = [f.name for f in dataclasses.fields(BackendOptions)]
    config_keys = [k for k in StampConfig.field_names() if k != "version"]
    unknown = sorted(set(options) - set(backend_keys) - set(config_keys))
    if unknown:
        raise ValueError(
            f"unknown stamp option(s) {unknown}; valid options: {', '.join(sorted(config_keys + backend_keys + ['config']))}"
        )
    if mode is not None and options.get("mode") not in (None, mode):
        raise ValueError(f"mode given twice: mode={mode!r} and options['mode']={options['mode']!r}")
    if mode is not None:
        options["mode"] = mode
    backend = BackendOptions(**{k: options.pop(k) for k in backend_keys if k in options})
    if "grid" in options and isinstance(options["grid"], list):
        options["grid"] = tuple(options["grid"])
    config = base.replace(**options) if base is not None else StampConfig(**options)
    return config, backend
