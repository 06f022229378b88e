"""Dynamo's un-normalised ops, recognised: linear layers, attention, and the small graph walks
the site analysis (:mod:`stamp_fx.analysis`) is built from.

Dynamo graphs call torch functions, tensor methods and modules as the model wrote them, not
ATen: ``F.linear``, ``x @ w.T``, ``torch.einsum``, ``nn.Linear`` modules, ``addmm`` against a
GPT-2 ``Conv1D`` weight, SDPA or eager ``softmax(q @ k^T) @ v`` attention. The tables below list
each family once; :func:`linear_operands` answers "is this node a linear layer, and which
argument is its activation", :func:`find_attention_cores` finds every attention computation,
:func:`looks_causal` whether the model masks the future, :func:`unrecognised_linears` names
matmul-family calls on parameters that are none of these (the backend warns about them).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

__all__ = [
    "AttentionCore",
    "MAX_TRACE_NODES",
    "find_attention_cores",
    "is_linear",
    "linear_operands",
    "looks_causal",
    "module_fqn",
    "normalize_path",
    "shape_str",
    "trace_back",
    "trace_forward",
    "unrecognised_linears",
]

_LINEAR_FUNCTIONS = {torch._C._nn.linear, F.linear, torch.ops.aten.linear.default}
# target -> (index of the activation, index of the weight): ``activation @ weight``
_MATMUL_FUNCTIONS = {
    torch.addmm: (1, 2),
    torch.ops.aten.addmm.default: (1, 2),
    torch.baddbmm: (1, 2),
    torch.mm: (0, 1),
    torch.ops.aten.mm.default: (0, 1),
    torch.bmm: (0, 1),
    torch.ops.aten.bmm.default: (0, 1),
    torch.matmul: (0, 1),
    operator.matmul: (0, 1),
}
_MATMUL_METHODS = {"matmul": (0, 1), "mm": (0, 1), "bmm": (0, 1), "__matmul__": (0, 1)}
_EINSUM_FUNCTIONS = {torch.einsum, torch.functional.einsum}
# What a weight may pass through on its way to a matmul (transposes, casts, broadcasts).
_WEIGHT_METHODS = {
    "to", "t", "float", "half", "bfloat16", "transpose", "permute", "expand", "unsqueeze",
    "contiguous", "detach", "type_as", "view", "reshape",
}  # fmt: skip
_WEIGHT_FUNCTIONS = {torch.t, torch.transpose, torch.permute, torch.unsqueeze}
_WEIGHT_ATTRS = {"T", "mT", "H", "mH"}
_SDPA_FUNCTIONS = {
    torch._C._nn.scaled_dot_product_attention,
    F.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
}
_SOFTMAX_FUNCTIONS = {
    F.softmax,
    torch.softmax,
    torch.Tensor.softmax,
    torch.ops.aten._softmax.default,
}
_SCORE_MATMULS = {torch.matmul, operator.matmul, torch.bmm, torch.ops.aten.bmm.default}

# Ops that only move or rescale data (layout, dtype, RoPE arithmetic): roles are traced through them.
_PASS_METHODS = {
    "view", "reshape", "transpose", "permute", "contiguous", "to", "float", "half", "bfloat16",
    "type_as", "unsqueeze", "squeeze", "flatten", "unflatten", "expand", "repeat", "clone",
    "split", "chunk", "narrow", "mul", "add", "neg", "sub", "div", "repeat_interleave",
}  # fmt: skip
_PASS_FUNCTIONS = {
    operator.getitem, operator.mul, operator.add, operator.neg, operator.sub, operator.truediv,
    torch.transpose, torch.reshape, torch.permute, torch.flatten, torch.unsqueeze, torch.squeeze,
    torch.cat, torch.mul, torch.add, torch.neg, torch.split, torch.chunk, torch.repeat_interleave,
    F.dropout, torch.Tensor.contiguous,
}  # fmt: skip
# Pure layout ops: the only ones followed forward from an attention output to its projection.
_LAYOUT_METHODS = {
    "view",
    "reshape",
    "transpose",
    "permute",
    "contiguous",
    "to",
    "flatten",
    "float",
    "half",
    "bfloat16",
}
_LAYOUT_FUNCTIONS = {torch.transpose, torch.reshape, torch.permute, torch.flatten, F.dropout}

MAX_TRACE_NODES = 64


@dataclass
class AttentionCore:
    """One attention computation: SDPA, or eager ``softmax(q @ k^T) @ v``."""

    node: fx.Node  # the SDPA node, or the final matmul of eager attention
    q: fx.Node
    k: fx.Node
    v: fx.Node
    kind: str  # "sdpa" | "eager"
    k_index: int | None = None  # positions of k / v in node.args (SDPA only)
    v_index: int | None = None


# -- small graph helpers --------------------------------------------------------------------


def shape_str(t: torch.Tensor | None) -> tuple[str, ...]:
    return () if t is None else tuple(str(s) for s in t.shape)


_FQN_SOURCE = re.compile(r"^L\[[^\]]*\](\[\d+\])?")
_FQN_PART = re.compile(r"\.(\w+)|\['([^']*)'\]|\[(\d+)\]")
_FQN_NOISE = {"__dict__", "_modules"}


def normalize_path(path: str) -> str:
    """Dynamo source path -> module FQN: ``"L['self'].__dict__['_modules']['blocks'][0].attn"``
    and ``"L['args'][0].model.layers.0.q_proj"`` become ``"blocks.0.attn"`` / ``"model.layers.0.q_proj"``."""
    # accelerate's hooks (device_map, offload) call ``module._old_forward``, the original
    # bound forward: Dynamo's source then runs through ``._old_forward.__self__`` (the module).
    rest = _FQN_SOURCE.sub("", path).replace("._old_forward.__self__", "")
    parts = [next(g for g in m.groups() if g is not None) for m in _FQN_PART.finditer(rest)]
    return ".".join(p for p in parts if p not in _FQN_NOISE)


def module_fqn(node: fx.Node) -> str | None:
    """FQN of the innermost module a node was traced in (``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _cls = list(stack.values())[-1]
    return normalize_path(str(path))


def _is_weight(gm: fx.GraphModule, node: object) -> bool:
    """True for a parameter: a lifted placeholder, a get_attr, possibly behind a dtype cast."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target in _WEIGHT_METHODS:
        return _is_weight(gm, node.args[0])
    if node.op == "call_function" and node.target in _WEIGHT_FUNCTIONS:
        return _is_weight(gm, node.args[0])
    if (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] in _WEIGHT_ATTRS
    ):
        return _is_weight(gm, node.args[0])
    if node.op == "get_attr":
        try:
            return isinstance(gm.get_parameter(node.target), torch.nn.Parameter)
        except AttributeError:
            return isinstance(getattr(gm, str(node.target), None), torch.nn.Parameter)
    if node.op == "placeholder":
        arg = node.meta.get("grapharg")
        example = getattr(arg, "example", None)
        if example is not None:
            return isinstance(example, torch.nn.Parameter)
        return "_parameters_" in node.name
    return False


def _is_pass_through(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _PASS_METHODS
    return node.op == "call_function" and node.target in _PASS_FUNCTIONS


def _is_layout(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    return node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS


def _walk(starts: Iterable[fx.Node], stop, follow, step) -> set[fx.Node]:
    """Nodes satisfying ``stop`` reached from ``starts`` by repeatedly taking ``step(n)`` of the
    nodes ``n`` that ``follow`` accepts (bounded, so a huge graph cannot make it quadratic)."""
    found: set[fx.Node] = set()
    todo, seen = list(starts), set()
    while todo and len(seen) < MAX_TRACE_NODES:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop(n):
            found.add(n)
        elif follow(n):
            todo.extend(step(n))
    return found


def trace_back(start: object, stop) -> set[fx.Node]:
    """Nodes satisfying ``stop`` reached backwards from ``start`` through pass-through ops."""
    if not isinstance(start, fx.Node):
        return set()
    return _walk([start], stop, _is_pass_through, lambda n: n.all_input_nodes)


def trace_forward(start: fx.Node, stop) -> set[fx.Node]:
    """Nodes satisfying ``stop`` reached forwards from ``start`` through layout-only ops."""

    def follow(n: fx.Node) -> bool:
        return _is_layout(n) or (n.op == "call_function" and n.target is operator.getitem)

    return _walk(start.users, stop, follow, lambda n: n.users)


# -- linear layers ---------------------------------------------------------------------------


def linear_operands(gm: fx.GraphModule, node: fx.Node) -> tuple[int, object] | None:
    """(activation arg index, weight) if ``node`` is a linear layer, else None.

    A linear layer is ``F.linear`` / ``nn.Linear``, or ``activation @ weight`` written with
    ``@`` / ``matmul`` / ``mm`` / ``bmm`` / ``addmm`` / ``baddbmm`` (GPT-2's ``Conv1D``, an
    ``nn.Linear`` subclass whose forward is ``x @ self.weight.T + self.bias``), or a two-operand
    ``einsum`` that contracts the activation's last axis with a weight; the weight is a parameter,
    possibly behind a transpose, cast or broadcast (``.T``, ``.t()``, ``.to()``, ``.expand()``)."""
    if node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
        return 0, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    indices = None
    if node.op == "call_function":
        indices = _MATMUL_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        indices = _MATMUL_METHODS.get(str(node.target))
    if indices is not None:
        xi, wi = indices
        if (
            len(node.args) > wi
            and _is_weight(gm, node.args[wi])
            and not _is_weight(gm, node.args[xi])
        ):
            return xi, node.args[wi]
        return None
    if node.op == "call_function" and node.target in _EINSUM_FUNCTIONS:
        return _einsum_operands(gm, node)
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, torch.nn.Linear):
            return 0, mod.weight
    return None


def _einsum_operands(gm: fx.GraphModule, node: fx.Node) -> tuple[int, object] | None:
    """``einsum("...d,ed->...e", x, w)``-style: two positional operands, one a weight, the
    activation's last subscript contracted with the weight (so its last axis is the features)."""
    if len(node.args) != 3 or not isinstance(node.args[0], str):
        return None
    equation = node.args[0].replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    subs = lhs.split(",")
    if len(subs) != 2:
        return None
    weights = [_is_weight(gm, a) for a in node.args[1:]]
    if weights.count(True) != 1:
        return None
    wi = weights.index(True)
    xi = 1 - wi
    x_sub, w_sub = subs[xi], subs[wi]
    if not x_sub or not x_sub[-1].isalpha():
        return None
    last = x_sub[-1]
    contracted = (last not in out) if arrow else (lhs.count(last) > 1)
    if last not in w_sub or not contracted:
        return None
    return xi + 1, node.args[wi + 1]


def _is_linear_like(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A matmul-family call with a parameter operand (linear or not): what a model's linears
    look like when :func:`linear_operands` does not recognise them."""
    if node.op == "call_function":
        family = (
            node.target in _LINEAR_FUNCTIONS
            or node.target in _MATMUL_FUNCTIONS
            or node.target in _EINSUM_FUNCTIONS
        )
    else:
        family = node.op == "call_method" and str(node.target) in _MATMUL_METHODS
    if not family:
        return False
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    for a in node.args:
        if isinstance(a, (list, tuple)):
            operands.extend(x for x in a if isinstance(x, fx.Node))
    return any(_is_weight(gm, a) for a in operands)


def unrecognised_linears(gm: fx.GraphModule) -> list[str]:
    """``"<module FQN> (<op>)"`` for every matmul-family call on a parameter that is not
    recognised as a linear layer's input (so it is never quantized)."""
    out = []
    for node in gm.graph.nodes:
        if _is_linear_like(gm, node) and linear_operands(gm, node) is None:
            op = (
                node.target
                if isinstance(node.target, str)
                else getattr(node.target, "__name__", str(node.target))
            )
            out.append(f"{module_fqn(node) or node.name} ({op})")
    return out


def is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    return linear_operands(gm, node) is not None


# -- attention -------------------------------------------------------------------------------


def _sdpa_arg(node: fx.Node, index: int, name: str) -> tuple[object, int | None]:
    if len(node.args) > index:
        return node.args[index], index
    return node.kwargs.get(name), None


def find_attention_cores(gm: fx.GraphModule) -> list[AttentionCore]:
    cores = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _SDPA_FUNCTIONS:
            q, _ = _sdpa_arg(node, 0, "query")
            k, ki = _sdpa_arg(node, 1, "key")
            v, vi = _sdpa_arg(node, 2, "value")
            if all(isinstance(t, fx.Node) for t in (q, k, v)):
                cores.append(AttentionCore(node, q, k, v, "sdpa", ki, vi))
        elif _is_softmax(node):
            core = _eager_core(node)
            if core is not None:
                cores.append(core)
    return cores


def _is_softmax(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "softmax"
    return node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS


def _is_score_matmul(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SCORE_MATMULS


def _eager_core(softmax: fx.Node) -> AttentionCore | None:
    """``softmax(q @ k^T [* scale] [+ mask]) [dropout] @ v`` -> an AttentionCore."""
    scores = trace_back(softmax.args[0], _is_score_matmul)
    outs = [u for u in trace_forward(softmax, _is_score_matmul)]
    if len(scores) != 1 or len(outs) != 1:
        return None
    (score,), (out,) = scores, outs
    return AttentionCore(out, score.args[0], score.args[1], out.args[1], "eager")


def looks_causal(gm: fx.GraphModule) -> bool:
    """Whether the graph is a causal LM: some SDPA call has ``is_causal=True`` or the model
    modules are decoder layers (``*DecoderLayer``) or a ``*ForCausalLM`` / ``*LMHeadModel``
    class. The root module is not in ``nn_module_stack``, and a padded batch (an
    ``attention_mask``) gives SDPA an explicit causal mask with ``is_causal=False``, so the
    decoder-layer class is what still says "causal" there."""
    for node in gm.graph.nodes:
        if (
            node.op == "call_function"
            and node.target in _SDPA_FUNCTIONS
            and node.kwargs.get("is_causal") is True
        ):
            return True
        for _path, cls in (node.meta.get("nn_module_stack") or {}).values():
            name = getattr(cls, "__name__", str(cls))
            if name.endswith(("ForCausalLM", "LMHeadModel", "DecoderLayer")) or (
                "CausalLM" in name or "DecoderLayer" in name
            ):
                return True
    return False
