"""Where keys and values enter a KV cache: the place K/V are quantized (quantize-on-write).

A Hugging Face ``Cache`` traced by Dynamo leaves its update in the graph:

* ``DynamicCache`` (and its sliding-window layer): ``keys = torch.cat([past, new], dim=-2)``,
  where ``past`` is the cache's tensor (a graph input) or, on the first call, an empty
  ``torch.tensor([])``; the concatenation is what attention reads and what the cache keeps;
* ``StaticCache``: ``buffer.index_copy_(2, positions, new)`` (or ``buffer[:, :, positions] =
  new``) into the preallocated buffer (a graph input, or a ``torch.zeros`` on the first call),
  and attention reads the buffer (sliced, or expanded by ``repeat_kv``).

:func:`find_cache_write` walks back from a ``scaled_dot_product_attention`` key/value input,
through layout ops (slices, ``repeat_kv``'s expand/reshape, casts), to such an update and
returns ``new``: the K/V of the tokens this call adds, after RoPE, before the cache. Quantizing
``new`` there means the cache stores quantized values and attention reads them, and entries
already in the cache are never quantized again (see ``planner.py`` for the rule each block
gets). None means no cache update was recognised: the caller then quantizes the attention
input itself (correct without a cache; in a decode step the site is skipped, since that input
holds the cached entries).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .fx_values import example_tensor

__all__ = ["CacheWrite", "find_cache_write"]

_CAT = {torch.cat, torch.concat, torch.concatenate}
_INDEX_COPY = {torch.Tensor.index_copy_, torch.index_copy}
# Ops between a cache tensor and attention that only slice, broadcast or re-lay it out.
_READ_METHODS = {
    "view", "reshape", "expand", "contiguous", "to", "float", "half", "bfloat16", "type_as",
    "unsqueeze", "flatten", "repeat_interleave", "repeat",
}  # fmt: skip
_READ_FUNCTIONS = {operator.getitem, torch.reshape, torch.flatten, torch.unsqueeze,
                   torch.repeat_interleave}  # fmt: skip
_EMPTY = {torch.tensor, torch.empty, torch.zeros}
_MAX_STEPS = 32


@dataclass(frozen=True)
class CacheWrite:
    """One cache update: ``new`` (``[batch, heads, new tokens, head_dim]``) is written by the
    node ``write`` (a ``cat`` or an in-place copy); ``kind`` is ``"cat"`` or ``"copy"``."""

    new: fx.Node
    write: fx.Node
    kind: str


def _is_read_op(node: fx.Node) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _READ_METHODS
    return node.op == "call_function" and node.target in _READ_FUNCTIONS


def _is_cache_tensor(node: object) -> bool:
    """A cache's own storage: a graph input, or the empty / zero tensor of a lazy init."""
    if not isinstance(node, fx.Node):
        return False
    return node.op == "placeholder" or (node.op == "call_function" and node.target in _EMPTY)


def _seq_axis(dim: object) -> bool:
    return dim in (2, -2)


def _cat_write(node: fx.Node) -> CacheWrite | None:
    """``torch.cat([past, new], dim=-2)`` with ``past`` a cache tensor and ``new`` 4-d."""
    if node.op != "call_function" or node.target not in _CAT or not node.args:
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not _seq_axis(dim):
        return None
    past, new = parts
    t = example_tensor(new)
    if not _is_cache_tensor(past) or t is None or t.ndim != 4:
        return None
    return CacheWrite(new, node, "cat")


def _copy_source(node: fx.Node, buffer: fx.Node) -> fx.Node | None:
    """The tensor an in-place write of ``node`` copies into ``buffer`` along the sequence
    axis (``index_copy_(2, positions, new)`` or ``buffer[:, :, positions] = new``)."""
    method = node.op == "call_method" and node.target == "index_copy_"
    if method or (node.op == "call_function" and node.target in _INDEX_COPY):
        args = node.args
    elif node.op == "call_function" and node.target is operator.setitem and len(node.args) == 3:
        index = node.args[1]
        if node.args[0] is not buffer or not isinstance(index, tuple) or len(index) != 3:
            return None
        whole = all(isinstance(i, slice) and i == slice(None) for i in index[:2])
        return node.args[2] if whole and isinstance(node.args[2], fx.Node) else None
    else:
        return None
    if len(args) != 4 or args[0] is not buffer or not _seq_axis(args[1]):
        return None
    return args[3] if isinstance(args[3], fx.Node) else None


def _copy_write(buffer: fx.Node, reader: fx.Node) -> CacheWrite | None:
    """The single in-place write into ``buffer`` that happens before ``reader`` reads it."""
    order = {n: i for i, n in enumerate(buffer.graph.nodes)}
    writes = []
    for user in buffer.users:
        source = _copy_source(user, buffer)
        if source is not None and order[user] < order[reader]:
            writes.append(CacheWrite(source, user, "copy"))
    if len(writes) != 1 or (
        example_tensor(writes[0].new) is None or example_tensor(writes[0].new).ndim != 4
    ):
        return None
    return writes[0]


def find_cache_write(kv: fx.Node, attention: fx.Node) -> CacheWrite | None:
    """The cache update that attention input ``kv`` (read by node ``attention``) comes from,
    or None (see the module docstring)."""
    node = kv
    for _ in range(_MAX_STEPS):
        write = _cat_write(node)
        if write is not None:
            return write
        if _is_cache_tensor(node):
            return _copy_write(node, attention)
        if not _is_read_op(node):
            return None
        node = node.args[0]
    return None
