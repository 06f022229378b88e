"""Graph rewrites on the Dynamo graph, each ``p(gm, ctx) -> stats``, run in the order of PASSES."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import fx

from .context import PassContext, PassRecord, StampMeta
from .insert_stamp import insert_stamp_ops
from .select_kernels import select_kernels

__all__ = [
    "PASSES",
    "EAGER_PASSES",
    "PassContext",
    "PassRecord",
    "StampMeta",
    "run_passes",
    "insert_stamp_ops",
    "select_kernels",
]

Pass = Callable[[fx.GraphModule, PassContext], dict]

PASSES: tuple[Pass, ...] = (insert_stamp_ops, select_kernels)
EAGER_PASSES: tuple[Pass, ...] = (insert_stamp_ops,)
"""A graph that runs eagerly (no Inductor, calibration) keeps the reference ops: no choice."""


def run_passes(
    gm: fx.GraphModule, ctx: PassContext, passes: tuple[Pass, ...] = PASSES
) -> list[PassRecord]:
    """Run ``passes`` in order; the debug writer (if any) dumps the graph before and after each."""
    records = []
    for p in passes:
        name = p.__name__
        if ctx.debug is not None:
            ctx.debug.dump_graph(gm, f"before_{name}", header=f"before pass {name}")
        start = time.perf_counter()
        stats = p(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        seconds = time.perf_counter() - start
        records.append(PassRecord(name, seconds, stats))
        if ctx.debug is not None:
            ctx.debug.dump_graph(
                gm,
                f"after_{name}",
                header=f"after pass {name} ({seconds * 1e3:.1f} ms) stats={stats}",
            )
    return records
