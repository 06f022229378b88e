"""Where a linear's input has its sequence axis: the ``[batch, seq, features]`` tensor it comes
from in a Dynamo graph.

A rank-3 ``[B, S, D]`` input has ``seq_dim=1``. Another input (a flattened ``[B*S, D]``, an
unflattened ``[B, H, W, D]``) is traced back through a chain of
view/reshape/flatten/unflatten/contiguous/transpose/permute ops that keep the features last to its
earliest ``[B, S, D]`` origin, which the pass quantizes and then re-applies the chain to; a
``[B*S, F]`` input whose rows come from such a tensor through row-wise ops is unflattened by the
pass. :func:`sequence_origin` is the one entry point (:func:`stamp_fx.analysis.find_sites` calls
it per linear).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .fx_values import example_tensor as _example
from .graph_ops import MAX_TRACE_NODES, linear_operands

__all__ = ["same_size", "sequence_origin", "static_int"]


def static_int(size: object) -> int | None:
    """An int for a static size, including a SymInt that Dynamo specialised to a constant (a
    dim marked dynamic that a weight's shape pinned); None for a truly symbolic size."""
    if isinstance(size, int):
        return int(size)
    if isinstance(size, torch.SymInt) and is_concrete_int(size):
        return int(size)
    return None


_CHAIN_METHODS = {"view", "reshape", "flatten", "unflatten", "contiguous", "transpose", "permute"}
_CHAIN_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten, torch.transpose, torch.permute,
                    torch.Tensor.contiguous}  # fmt: skip


def _is_chain_op(node: object) -> bool:
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _CHAIN_METHODS
    return node.op == "call_function" and node.target in _CHAIN_FUNCTIONS


def _moves_last_axis(node: fx.Node, ndim: int) -> bool:
    """Whether a transpose/permute moves the input's last axis (the features) elsewhere."""
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dims = list(node.args[1:])
    if name == "transpose":
        return any(isinstance(d, int) and d % ndim == ndim - 1 for d in dims[:2])
    if name == "permute":
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = list(dims[0])
        return not dims or not isinstance(dims[-1], int) or dims[-1] % ndim != ndim - 1
    return False


_ROWWISE_FUNCTIONS = {
    F.gelu, F.relu, F.silu, F.mish, F.dropout, F.layer_norm, torch.tanh, torch.sigmoid,
    torch.relu, torch.nn.functional.hardswish, operator.mul, operator.add, operator.sub,
    operator.truediv, torch.mul, torch.add, torch.sub,
}  # fmt: skip
_ROWWISE_METHODS = {"relu", "tanh", "sigmoid", "to", "float", "half", "bfloat16", "contiguous",
                    "mul", "add", "sub", "div", "type_as"}  # fmt: skip


def same_size(a: object, b: object) -> bool:
    """Size equality without guarding on symbolic sizes (compared as expressions)."""
    sa, sb = static_int(a), static_int(b)
    if sa is not None and sb is not None:
        return sa == sb
    return str(a) == str(b)


def _flatten_source(node: fx.Node) -> fx.Node | None:
    """The earliest rank-3 tensor that ``node`` (rank 2) is a flattening of, through chain ops
    that keep its last axis; None if there is none."""
    t = _example(node)
    feat = static_int(t.shape[-1]) if t is not None and t.ndim else None
    best = None
    for _ in range(MAX_TRACE_NODES):
        if not _is_chain_op(node):
            break
        src = node.args[0]
        src_t = _example(src)
        if src_t is None or src_t.ndim == 0 or _moves_last_axis(node, src_t.ndim):
            break
        if feat is None or static_int(src_t.shape[-1]) != feat:
            break
        if src_t.ndim == 3:
            best = src
        node = src
    return best


def _row_source(gm: fx.GraphModule, x: fx.Node) -> fx.Node | None:
    """For a ``[N, F]`` activation: a ``[B, S, *]`` tensor with ``B * S == N`` that ``x``'s rows
    come from through row-wise ops (activations, norms, elementwise arithmetic, linears), found
    where an ancestor is a flattening of it; None if there is none."""
    rows = _example(x).shape[0]
    todo, seen = [x], set()
    while todo and len(seen) < MAX_TRACE_NODES:
        n = todo.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        t = _example(n)
        if t is None or t.ndim != 2 or not same_size(t.shape[0], rows):
            continue
        src = _flatten_source(n)
        if src is not None:
            st = _example(src)
            if same_size(st.shape[0] * st.shape[1], rows):
                return src
        operands = linear_operands(gm, n)
        if operands is not None:
            todo.append(n.args[operands[0]])
        elif (n.op == "call_function" and n.target in _ROWWISE_FUNCTIONS) or (
            n.op == "call_method" and n.target in _ROWWISE_METHODS
        ):
            todo.extend(a for a in n.args if isinstance(a, fx.Node))
    return None


def sequence_origin(
    x: object, features: int | None, gm: fx.GraphModule | None = None
) -> tuple[fx.Node | None, tuple[fx.Node, ...], int | None, str | None, fx.Node | None]:
    """(origin, chain, seq_dim, reason) for the activation argument of a linear.

    A rank-3 input is ``[batch, seq, features]`` itself. Any other input is traced back through
    a chain of view / reshape / flatten / unflatten / contiguous / transpose / permute ops that
    keep the features as the last axis (e.g. ``[B, S, D] -> [B*S, D]``, or a transpose of the
    leading axes first) to the earliest ``[batch, seq, features]`` tensor on it: that is the
    origin, quantized along its axis 1, and the chain (origin's user first) is re-applied.
    A ``[B*S, F]`` input with no such chain whose rows come from one through row-wise ops
    (:func:`_row_source`) is its own origin, unflattened to ``[B, S, F]`` by the pass (the last
    element names the tensor that gives ``B`` and ``S``)."""
    t = _example(x)
    if not isinstance(x, fx.Node) or t is None:
        return None, (), None, "activation has no example value", None
    if t.ndim == 3:
        return x, (), 1, None, None
    feat = static_int(t.shape[-1]) if t.ndim else None
    chain: list[fx.Node] = []
    best: tuple[fx.Node, tuple[fx.Node, ...]] | None = None
    node = x
    while _is_chain_op(node) and len(chain) < MAX_TRACE_NODES:
        src = node.args[0]
        src_t = _example(src)
        if src_t is None or src_t.ndim == 0 or _moves_last_axis(node, src_t.ndim):
            break
        if feat is None or static_int(src_t.shape[-1]) != feat:
            break  # the chain splits or merges the features
        chain.insert(0, node)
        if src_t.ndim == 3:
            best = (src, tuple(chain))
        node = src
    if best is not None:
        return best[0], best[1], 1, None, None
    if t.ndim == 2:
        source = _row_source(gm, x) if gm is not None else None
        if source is not None:
            return x, (), 1, None, source
        return (
            None,
            (),
            None,
            "input is [tokens, features] with no [batch, seq, features] origin (no sequence axis)",
            None,
        )
    return (
        None,
        (),
        None,
        f"input has rank {t.ndim} and no [batch, seq, features] origin; expected [batch, seq, features]",
        None,
    )
