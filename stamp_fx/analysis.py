"""Dynamo graph -> sites. With :mod:`stamp_fx.graph_ops` (which recognises the linear layers and
attention among Dynamo's un-normalised ops), all knowledge of Dynamo graphs lives here.

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

Sequence axis (:mod:`stamp_fx.sequence_axis`): a rank-3 ``[B, S, D]`` input has ``seq_dim=1``;
another input is traced back to its ``[B, S, D]`` origin (``origin`` is then that node and the
pass re-applies the chain); anything else is not quantized, with a reason. :func:`unrecognised_linears` names matmul-family
calls on parameters that are not recognised as linear layers (the backend warns about them).

Tensor parallelism: :func:`stamp_fx.sharding.annotate_sharding` moves sites off
``DTensor.from_local`` onto the local tensor and marks those whose features are split across
ranks (``extra["shard"]``), or refuses a layout (sequence parallelism) with a reason.

Padding: :func:`find_padding_mask` finds the HF ``attention_mask`` graph input (a 2-d padding
mask or a 4-d attention mask, see :mod:`stamp_fx.padding`); the pass turns it into a
``[batch, seq]`` real-token mask and hands it to the sites whose ``[batch, seq]`` sizes match.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx

from .fx_values import example_tensor as _example
from .graph_ops import (
    MAX_TRACE_NODES,
    AttentionCore,
    find_attention_cores,
    is_linear,
    linear_operands,
    looks_causal,
    module_fqn,
    shape_str,
    trace_back,
    trace_forward,
    unrecognised_linears,
)
from .kv_cache import CacheWrite, find_cache_write
from .sequence_axis import same_size, sequence_origin, static_int
from .sharding import annotate_sharding

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


# -- sites -----------------------------------------------------------------------------------


def _in_block(fqn: str) -> bool:
    """Inside the repeated blocks: some path component is a ModuleList index."""
    return any(part.isdigit() for part in fqn.split("."))


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every linear input and every SDPA key/value in ``gm``, with roles and legality."""
    cores = find_attention_cores(gm)
    roles: dict[fx.Node, set[str]] = {}
    cross_linears: set[fx.Node] = set()
    cross_cores: set[fx.Node] = set()
    for core in cores:
        by_arg = {}
        for arg_name, arg in (("q", core.q), ("k", core.k), ("v", core.v)):
            by_arg[arg_name] = trace_back(arg, lambda n: is_linear(gm, n))
            for lin in by_arg[arg_name]:
                roles.setdefault(lin, set()).add(arg_name)
        for lin in trace_forward(core.node, lambda n: is_linear(gm, n)):
            roles.setdefault(lin, set()).add("attn_out")
        # Cross-attention: K/V projections read a different tensor than the Q projection.
        q_inputs = {_activation(gm, lin) for lin in by_arg["q"]}
        for lin in by_arg["k"] | by_arg["v"]:
            if q_inputs and _activation(gm, lin) not in q_inputs:
                cross_linears.add(lin)
                cross_cores.add(core.node)

    sites: list[Site] = []
    for node in gm.graph.nodes:
        operands = linear_operands(gm, node)
        if operands is None:
            continue
        index, weight = operands
        fqn = module_fqn(node) or str(node.target if node.op == "call_module" else node.name)
        features = _feature_count(weight, node, index)
        role = _role(roles.get(node, set()), node in cross_linears, _in_block(fqn))
        origin, chain, seq_dim, reason, unflatten = sequence_origin(node.args[index], features, gm)
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
                else shape_str(_example(origin if origin is not None else node.args[index])),
                features=features,
                in_block=_in_block(fqn),
                cross=node in cross_linears,
                reason=reason,
            )
        )
    sites.extend(_kv_sites(cores, cross_cores))
    annotate_sharding(gm, sites)  # tensor parallelism: sharded features, DTensor inputs
    _dedupe_keys(sites)
    return sites


def _unflattened_shape(origin: fx.Node, source: fx.Node) -> tuple[str, ...]:
    src = _example(source)
    return (str(src.shape[0]), str(src.shape[1]), str(_example(origin).shape[-1]))


def _activation(gm: fx.GraphModule, lin: fx.Node) -> object:
    """The tensor a linear reads, behind device moves: accelerate's hooks (``device_map``)
    give every module its own ``x.to(device)``, which must not make q/k/v look like
    cross-attention (reading different tensors)."""
    ops = linear_operands(gm, lin)
    return _behind_device_moves(lin.args[ops[0]]) if ops else None


def _behind_device_moves(x: object) -> object:
    for _ in range(MAX_TRACE_NODES):
        if not (isinstance(x, fx.Node) and x.op == "call_method" and x.target == "to"):
            break
        moves_only = all(isinstance(a, (str, torch.device)) for a in x.args[1:]) and set(
            x.kwargs
        ) <= {"device", "non_blocking", "copy"}
        if not moves_only or not isinstance(x.args[0], fx.Node):
            break
        x = x.args[0]
    return x


def _feature_count(weight: object, node: fx.Node, index: int) -> int | None:
    t = _example(node.args[index])
    if t is not None and t.ndim >= 1:
        return static_int(t.shape[-1])
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
                    shape=shape_str(t),
                    features=static_int(t.shape[-1]) if t is not None and t.ndim else None,
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
        shape=shape_str(t),
        features=static_int(t.shape[-1]),
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
        if static_int(queries) == 1 and static_int(keys) != 1:
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
    return same_size(m.shape[0], t.shape[0]) and same_size(m.shape[1], t.shape[seq_dim])
