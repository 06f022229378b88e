"""Dynamo graph -> sites. All knowledge of un-normalised Dynamo ops lives here.

:func:`find_sites` returns one :class:`Site` per tensor the backend could quantize:

* the input of every linear layer: ``torch._C._nn.linear`` / ``F.linear`` / ``aten.linear``,
  ``nn.Linear`` call_module nodes, and ``addmm`` / ``mm`` / ``matmul`` against a weight
  (GPT-2's ``Conv1D``);
* the key and value of every ``scaled_dot_product_attention`` (for KV quantization): where a
  KV cache update feeds it (:func:`stamp_fx.kv_cache.find_cache_write`), the new tokens' K/V
  before the cache stores them (quantize-on-write, ``extra["cache_write"]``); else the
  attention input itself.

Each site carries its module FQN (from ``nn_module_stack``), its *role* from the graph structure
around attention (``q``, ``k``, ``v``, ``qkv`` for fused projections, ``attn_out``, ``mlp``,
``cross_kv`` for K/V computed from another sequence, ``attn_k`` / ``attn_v`` at the attention
input, ``other``), whether it sits inside the repeated blocks, its sequence axis, and a
``reason`` when it cannot be quantized (legality only; the plan decides policy).

Sequence axis: a rank-3 ``[B, S, D]`` input has ``seq_dim=1``. Another input (a flattened
``[B*S, D]``, an unflattened ``[B, H, W, D]``) is traced back through a chain of
view/reshape/flatten/unflatten/contiguous/transpose/permute ops that keep the features last to its
earliest ``[B, S, D]`` origin (``origin`` is then that node and the pass re-applies the chain);
anything else is not quantized, with a reason. :func:`unrecognised_linears` names matmul-family
calls on parameters that are not recognised as linear layers (the backend warns about them).

Padding: :func:`find_padding_mask` finds the HF ``attention_mask`` graph input (a 2-d padding
mask or a 4-d attention mask, see :mod:`stamp_fx.padding`); the pass turns it into a
``[batch, seq]`` real-token mask and hands it to the sites whose ``[batch, seq]`` sizes match.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .fx_values import example_tensor as _example
from .kv_cache import CacheWrite, find_cache_write

__all__ = [
    "Site",
    "AttentionCore",
    "find_sites",
    "find_attention_cores",
    "module_fqn",
    "looks_causal",
    "unrecognised_linears",
    "find_padding_mask",
    "is_decode_graph",
    "mask_matches",
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

_MAX_TRACE_NODES = 64


@dataclass
class Site:
    """One quantizable tensor; see the module docstring. ``key`` is ``<fqn>:<slot>``."""

    fqn: str
    slot: str  # "in" (linear input), "k" / "v" (attention input)
    role: str
    consumer: fx.Node  # the linear / attention node that reads the tensor
    arg_index: int  # position of the tensor in consumer.args
    origin: fx.Node | None  # the [B, S, D] tensor to quantize (None when not quantizable)
    reshape: fx.Node | None = None  # the last node of ``chain`` (what the consumer reads)
    chain: tuple[
        fx.Node, ...
    ] = ()  # layout ops from origin to consumer, re-applied after quantizing
    unflatten: fx.Node | None = None
    """For a ``[B*S, F]`` origin with no ``[B, S, F]`` tensor in the graph (an MLP's second
    linear after a row-wise activation): the ``[B, S, *]`` tensor whose two leading sizes the
    pass unflattens the origin by before quantizing (and flattens back after)."""
    seq_dim: int | None = None
    shape: tuple[str, ...] = ()
    features: int | None = None
    in_block: bool = False
    cross: bool = False
    reason: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.fqn}:{self.slot}"

    @property
    def quantizable(self) -> bool:
        return self.reason is None


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


def _shape_str(t: torch.Tensor | None) -> tuple[str, ...]:
    return () if t is None else tuple(str(s) for s in t.shape)


_FQN_SOURCE = re.compile(r"^L\[[^\]]*\](\[\d+\])?")
_FQN_PART = re.compile(r"\.(\w+)|\['([^']*)'\]|\[(\d+)\]")
_FQN_NOISE = {"__dict__", "_modules"}


def normalize_path(path: str) -> str:
    """Dynamo source path -> module FQN: ``"L['self'].__dict__['_modules']['blocks'][0].attn"``
    and ``"L['args'][0].model.layers.0.q_proj"`` become ``"blocks.0.attn"`` / ``"model.layers.0.q_proj"``."""
    rest = _FQN_SOURCE.sub("", path)
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
    while todo and len(seen) < _MAX_TRACE_NODES:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop(n):
            found.add(n)
        elif follow(n):
            todo.extend(step(n))
    return found


def _trace_back(start: object, stop) -> set[fx.Node]:
    """Nodes satisfying ``stop`` reached backwards from ``start`` through pass-through ops."""
    if not isinstance(start, fx.Node):
        return set()
    return _walk([start], stop, _is_pass_through, lambda n: n.all_input_nodes)


def _trace_forward(start: fx.Node, stop) -> set[fx.Node]:
    """Nodes satisfying ``stop`` reached forwards from ``start`` through layout-only ops."""

    def follow(n: fx.Node) -> bool:
        return _is_layout(n) or (n.op == "call_function" and n.target is operator.getitem)

    return _walk(start.users, stop, follow, lambda n: n.users)


# -- linear layers ---------------------------------------------------------------------------


def _linear_operands(gm: fx.GraphModule, node: fx.Node) -> tuple[int, object] | None:
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
    look like when :func:`_linear_operands` does not recognise them."""
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
        if _is_linear_like(gm, node) and _linear_operands(gm, node) is None:
            op = (
                node.target
                if isinstance(node.target, str)
                else getattr(node.target, "__name__", str(node.target))
            )
            out.append(f"{module_fqn(node) or node.name} ({op})")
    return out


def _is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _linear_operands(gm, node) is not None


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
    scores = _trace_back(softmax.args[0], _is_score_matmul)
    outs = [u for u in _trace_forward(softmax, _is_score_matmul)]
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


# -- sites -----------------------------------------------------------------------------------


def _in_block(fqn: str) -> bool:
    """Inside the repeated blocks: some path component is a ModuleList index."""
    return any(part.isdigit() for part in fqn.split("."))


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


def _same_size(a: object, b: object) -> bool:
    """Size equality without guarding on symbolic sizes (compared as expressions)."""
    sa, sb = _static_int(a), _static_int(b)
    if sa is not None and sb is not None:
        return sa == sb
    return str(a) == str(b)


def _flatten_source(node: fx.Node) -> fx.Node | None:
    """The earliest rank-3 tensor that ``node`` (rank 2) is a flattening of, through chain ops
    that keep its last axis; None if there is none."""
    t = _example(node)
    feat = _static_int(t.shape[-1]) if t is not None and t.ndim else None
    best = None
    for _ in range(_MAX_TRACE_NODES):
        if not _is_chain_op(node):
            break
        src = node.args[0]
        src_t = _example(src)
        if src_t is None or src_t.ndim == 0 or _moves_last_axis(node, src_t.ndim):
            break
        if feat is None or _static_int(src_t.shape[-1]) != feat:
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
    while todo and len(seen) < _MAX_TRACE_NODES:
        n = todo.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        t = _example(n)
        if t is None or t.ndim != 2 or not _same_size(t.shape[0], rows):
            continue
        src = _flatten_source(n)
        if src is not None:
            st = _example(src)
            if _same_size(st.shape[0] * st.shape[1], rows):
                return src
        operands = _linear_operands(gm, n)
        if operands is not None:
            todo.append(n.args[operands[0]])
        elif (n.op == "call_function" and n.target in _ROWWISE_FUNCTIONS) or (
            n.op == "call_method" and n.target in _ROWWISE_METHODS
        ):
            todo.extend(a for a in n.args if isinstance(a, fx.Node))
    return None


def _sequence_origin(
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
    feat = _static_int(t.shape[-1]) if t.ndim else None
    chain: list[fx.Node] = []
    best: tuple[fx.Node, tuple[fx.Node, ...]] | None = None
    node = x
    while _is_chain_op(node) and len(chain) < _MAX_TRACE_NODES:
        src = node.args[0]
        src_t = _example(src)
        if src_t is None or src_t.ndim == 0 or _moves_last_axis(node, src_t.ndim):
            break
        if feat is None or _static_int(src_t.shape[-1]) != feat:
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


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every linear input and every SDPA key/value in ``gm``, with roles and legality."""
    cores = find_attention_cores(gm)
    roles: dict[fx.Node, set[str]] = {}
    cross_linears: set[fx.Node] = set()
    cross_cores: set[fx.Node] = set()
    for core in cores:
        by_arg = {}
        for arg_name, arg in (("q", core.q), ("k", core.k), ("v", core.v)):
            by_arg[arg_name] = _trace_back(arg, lambda n: _is_linear(gm, n))
            for lin in by_arg[arg_name]:
                roles.setdefault(lin, set()).add(arg_name)
        for lin in _trace_forward(core.node, lambda n: _is_linear(gm, n)):
            roles.setdefault(lin, set()).add("attn_out")
        # Cross-attention: K/V projections read a different tensor than the Q projection.
        q_inputs = {_activation(gm, lin) for lin in by_arg["q"]}
        for lin in by_arg["k"] | by_arg["v"]:
            if q_inputs and _activation(gm, lin) not in q_inputs:
                cross_linears.add(lin)
                cross_cores.add(core.node)

    sites: list[Site] = []
    for node in gm.graph.nodes:
        operands = _linear_operands(gm, node)
        if operands is None:
            continue
        index, weight = operands
        fqn = module_fqn(node) or str(node.target if node.op == "call_module" else node.name)
        features = _feature_count(weight, node, index)
        role = _role(roles.get(node, set()), node in cross_linears, _in_block(fqn))
        origin, chain, seq_dim, reason, unflatten = _sequence_origin(node.args[index], features, gm)
        sites.append(
            Site(
                fqn=fqn,
                slot="in",
                role=role,
                consumer=node,
                arg_index=index,
                origin=origin,
                reshape=chain[-1] if chain else None,
                chain=chain,
                unflatten=unflatten,
                seq_dim=seq_dim,
                shape=_unflattened_shape(origin, unflatten)
                if unflatten is not None
                else _shape_str(_example(origin if origin is not None else node.args[index])),
                features=features,
                in_block=_in_block(fqn),
                cross=node in cross_linears,
                reason=reason,
            )
        )
    sites.extend(_kv_sites(cores, cross_cores))
    _dedupe_keys(sites)
    return sites


def _unflattened_shape(origin: fx.Node, source: fx.Node) -> tuple[str, ...]:
    src = _example(source)
    return (str(src.shape[0]), str(src.shape[1]), str(_example(origin).shape[-1]))


def _activation(gm: fx.GraphModule, lin: fx.Node) -> object:
    ops = _linear_operands(gm, lin)
    return lin.args[ops[0]] if ops else None


def _static_int(size: object) -> int | None:
    """An int for a static size, including a SymInt that Dynamo specialised to a constant (a
    dim marked dynamic that a weight's shape pinned); None for a truly symbolic size."""
    if isinstance(size, int):
        return int(size)
    if isinstance(size, torch.SymInt) and is_concrete_int(size):
        return int(size)
    return None


def _feature_count(weight: object, node: fx.Node, index: int) -> int | None:
    t = _example(node.args[index])
    if t is not None and t.ndim >= 1:
        return _static_int(t.shape[-1])
    return None


def _role(arg_roles: set[str], cross: bool, in_block: bool) -> str:
    if cross and arg_roles & {"k", "v"}:
        return "cross_kv"
    if {"q", "k", "v"} <= arg_roles or len(arg_roles & {"q", "k", "v"}) > 1:
        return "qkv"
    for r in ("q", "k", "v", "attn_out"):
        if r in arg_roles:
            return r
    return "mlp" if in_block else "other"


def _kv_sites(cores: Iterable[AttentionCore], cross_cores: set[fx.Node]) -> list[Site]:
    out = []
    for core in cores:
        fqn = module_fqn(core.node) or core.node.name
        for slot, arg, idx in (("k", core.k, core.k_index), ("v", core.v, core.v_index)):
            write = find_cache_write(arg, core.node) if core.kind == "sdpa" else None
            if write is not None:  # quantize-on-write: the new tokens, before the cache
                out.append(_write_site(fqn, slot, write, core.node in cross_cores))
                continue
            t = _example(arg)
            reason = None
            if core.kind != "sdpa":
                reason = "eager attention: K/V quantization is applied at scaled_dot_product_attention inputs only"
            elif idx is None:
                reason = f"{slot} passed by keyword to scaled_dot_product_attention"
            elif t is None or t.ndim != 4:
                reason = "attention input is not [batch, heads, seq, head_dim]"
            cross = core.node in cross_cores
            out.append(
                Site(
                    fqn=fqn,
                    slot=slot,
                    role=f"attn_{slot}",
                    consumer=core.node,
                    arg_index=idx if idx is not None else -1,
                    origin=arg if reason is None else None,
                    seq_dim=2 if reason is None else None,
                    shape=_shape_str(t),
                    features=_static_int(t.shape[-1]) if t is not None and t.ndim else None,
                    in_block=_in_block(fqn),
                    cross=cross,
                    reason=reason,
                )
            )
    return out


def _write_site(fqn: str, slot: str, write: CacheWrite, cross: bool) -> Site:
    """The K/V site of a cache update: ``write.new`` (``[batch, heads, new tokens, head_dim]``),
    quantized along axis 2 before the cache stores it; the pass rewires every reader of it."""
    t = _example(write.new)
    return Site(
        fqn=fqn,
        slot=slot,
        role=f"attn_{slot}",
        consumer=write.write,
        arg_index=-1,
        origin=write.new,
        seq_dim=2,
        shape=_shape_str(t),
        features=_static_int(t.shape[-1]),
        in_block=_in_block(fqn),
        cross=cross,
        extra={"cache_write": write.kind},
    )


def _dedupe_keys(sites: list[Site]) -> None:
    """A module called twice in one graph (weight sharing) gets ``#1``, ``#2`` ... suffixes."""
    counts: dict[str, int] = {}
    for s in sites:
        counts[s.key] = counts.get(s.key, 0) + 1
    seen: dict[str, int] = {}
    for s in sites:
        if counts[s.key] > 1:
            n = seen.get(s.key, 0)
            seen[s.key] = n + 1
            if n:
                s.slot = f"{s.slot}#{n}"


# -- decode ----------------------------------------------------------------------------------


def is_decode_graph(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is a decode step: some attention has a query of statically one token and
    a key/value sequence that is not (the KV cache). ``scaled_dot_product_attention`` is read
    from its query and key; eager ``softmax(q @ k^T) @ v`` from the attention probabilities
    (``[..., queries, keys]``, whatever layout the scores were computed in). A prefill, even
    into a StaticCache, has a longer query."""
    for core in find_attention_cores(gm):
        if core.kind == "sdpa":
            q, k = _example(core.q), _example(core.k)
            if q is None or k is None or q.ndim < 2 or k.ndim < 2:
                continue
            queries, keys = q.shape[-2], k.shape[-2]
        else:
            probs = _example(core.node.args[0]) if core.node.args else None
            if probs is None or probs.ndim < 2:
                continue
            queries, keys = probs.shape[-2], probs.shape[-1]
        if _static_int(queries) == 1 and _static_int(keys) != 1:
            return True
    return False


# -- padding ---------------------------------------------------------------------------------


def find_padding_mask(gm: fx.GraphModule) -> fx.Node | None:
    """The graph input holding the model's attention mask, or None: a placeholder whose name
    contains ``attention_mask`` (Dynamo names inputs after their source, e.g.
    ``l_kwargs_attention_mask_``) with a ``[batch, seq]`` padding mask (any dtype, nonzero =
    real) or a 4-d ``[batch, heads, queries, keys]`` bool or additive float attention mask as
    example value. :func:`stamp_fx.padding.real_tokens` says which tokens are real."""
    for node in gm.graph.nodes:
        if node.op != "placeholder" or "attention_mask" not in node.name:
            continue
        t = _example(node)
        if t is not None and t.ndim in (2, 4):
            return node
    return None


def mask_matches(mask: fx.Node, x: fx.Node, seq_dim: int) -> bool:
    """Whether a ``[batch, seq]`` mask describes the tokens of ``x`` along ``seq_dim``: same
    batch and sequence sizes (symbolic sizes compared as expressions). A batch of one counts:
    a single left-padded prompt is padded too."""
    m, t = _example(mask), _example(x)
    if m is None or t is None or m.ndim != 2 or t.ndim <= seq_dim or seq_dim < 1:
        return False
    return _same_size(m.shape[0], t.shape[0]) and _same_size(m.shape[1], t.shape[seq_dim])
