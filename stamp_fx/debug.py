"""Graph dumps and reports. The only module that reads environment variables (``STAMP_DEBUG_DIR``).

A :class:`DebugWriter` writes one numbered folder per compiled graph::

    <debug_dir>/graph_000/
        00_before_insert_stamp_ops.txt   print_readable(additional_meta=["stamp"]) + provenance header
        01_after_insert_stamp_ops.txt
        plan.json                        the AllocationPlan (feed it back with options={"plan": ...})
        sites.txt                        the site table
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import fx

from .analysis import Site
from .plan import AllocationPlan

__all__ = ["DebugWriter", "resolve_debug_dir", "format_site_table", "readable_graph"]

_ENV = "STAMP_DEBUG_DIR"


def resolve_debug_dir(option: str | os.PathLike | None) -> Path | None:
    """The ``debug_dir`` option, else ``$STAMP_DEBUG_DIR``, else None."""
    value = option if option is not None else os.environ.get(_ENV)
    return Path(value) if value else None


def readable_graph(gm: fx.GraphModule) -> str:
    """``print_readable`` with the ``stamp`` meta (and the op chosen to run it) beside each node."""
    try:
        return gm.print_readable(print_output=False, additional_meta=["stamp", "stamp_kernel"])
    except TypeError:  # older signature without additional_meta
        return gm.print_readable(print_output=False)


def format_site_table(
    sites: Sequence[Site], plan: AllocationPlan, energy_fraction: Mapping[str, float] | None = None
) -> str:
    """One row per site: FQN:slot, role, shape, transform, bits, energy share of the
    high-precision tokens (when measured), and the reason when skipped."""
    rows = []
    for s in sites:
        pol = plan.sites.get(s.key)
        if pol is not None:
            xf, _, rest = pol.describe().partition(" bits=")
            bits, _, flags = rest.partition(" ")
        else:
            xf = bits = flags = "-"
        energy = (energy_fraction or {}).get(s.key)
        rows.append(
            [
                s.key,
                s.role,
                "[" + ", ".join(s.shape) + "]",
                xf,
                bits,
                flags,
                "-" if energy is None else f"{100 * energy:.1f}%",
                "" if pol is not None else plan.skipped.get(s.key, "not in plan"),
            ]
        )
    head = [
        "site",
        "role",
        "shape",
        "transform",
        "bits",
        "flags",
        "hi-prec energy",
        "skipped because",
    ]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    quantized = sum(1 for s in sites if s.key in plan.sites)
    lines = [fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]
    lines.append(f"{quantized} of {len(sites)} sites quantized")
    return "\n".join(lines)


class DebugWriter:
    """Writes numbered dumps under ``root/graph_NNN`` (one folder per compiled graph)."""

    _counter = itertools.count()

    def __init__(self, root: Path, config_json: str):
        self.config_hash = hashlib.sha256(config_json.encode()).hexdigest()[:12]
        root.mkdir(parents=True, exist_ok=True)
        existing = sorted(root.glob("graph_*"))
        index = len(existing)
        self.dir = root / f"graph_{index:03d}"
        while self.dir.exists():
            index += 1
            self.dir = root / f"graph_{index:03d}"
        self.dir.mkdir(parents=True)
        self._files = itertools.count()

    def _path(self, name: str) -> Path:
        return self.dir / f"{next(self._files):02d}_{name}.txt"

    def dump_graph(self, gm: fx.GraphModule, name: str, *, header: str) -> Path:
        path = self._path(name)
        path.write_text(
            f"# stamp-fx | {header} | config {self.config_hash}\n{readable_graph(gm)}\n"
        )
        return path

    def write_plan(self, plan: AllocationPlan) -> Path:
        return plan.save(self.dir / "plan.json")

    def write_text(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(text + "\n")
        return path
