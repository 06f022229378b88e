"""The example tensor Dynamo (``example_value``) or a later trace (``val``) left on an FX node.

One definition for the graph analyses (:mod:`.analysis`, :mod:`.kv_cache`), which read shapes
and dtypes off nodes without running the graph.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["example_tensor"]


def example_tensor(node: object) -> torch.Tensor | None:
    """``node``'s example tensor, or None (not a node, or its value is not a tensor)."""
    if isinstance(node, fx.Node):
        v = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(v, torch.Tensor):
            return v
    return None
