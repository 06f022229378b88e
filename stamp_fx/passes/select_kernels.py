"""Choose the op that runs every inserted ``stamp::`` node (hand-written kernel, Inductor
decomposition or reference call), as the compile's lowering decides it.

The decision itself lives in the lowering (:meth:`stamp_fx.lowering.Lowering.choose`, one
place); this pass applies it on the Dynamo graph, so the choice shows in the debug dumps
(``stamp_kernel`` beside each node) and the stats, and Inductor receives a graph whose ops
already say what runs them. A graph run eagerly (``inductor=False``, calibration) has no
lowering and keeps the reference ops.
"""

from __future__ import annotations

from torch import fx

from .context import PassContext


def select_kernels(gm: fx.GraphModule, ctx: PassContext) -> dict:
    if ctx.lowering is None or ctx.observer is not None:
        return {}
    return ctx.lowering.apply_choices(gm)
