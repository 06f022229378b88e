"""Insert ``stamp::fake_quant`` (between two ``stamp::hadamard`` with a feature rotation) in
front of every planned site.

Sites that read the same tensor with the same policy (q/k/v projections, gate/up) share one
quantized tensor: quantize once, not once per consumer. A flattened ``[B*S, D]`` input (or any
layout chain, see ``sequence_axis.sequence_origin``) is quantized at its ``[B, S, D]`` origin and
the chain is re-applied. Running the pass again finds
the inserted ops and adds nothing (idempotent).

K/V at a KV cache update (``site.extra["cache_write"]``, see :mod:`stamp_fx.kv_cache`) are
quantized where the new tokens' K/V are made, and every reader of them (the cache update, so
the cache stores the quantized value) is rewired: quantize-on-write.

Tensor parallelism: a site whose features are split across ranks (``site.extra["shard"]``,
:mod:`stamp_fx.sharding`) gets ``stamp::fake_quant_sharded`` (per-token ranges all-reduced) or
``stamp::fake_quant_gathered`` (features gathered), as :func:`stamp_fx.sharding.shard_strategy`
decides, so each rank computes its shard of the one-device result.

Padded batches: when the graph has an ``attention_mask`` input (``ctx.padding_mask``; a 4-d
or float mask is first turned into a ``[batch, seq]`` real-token mask,
:func:`stamp_fx.padding.real_token_node`) whose ``[batch, seq]`` sizes match a site's, that
site gets ``stamp::fake_quant_masked`` (each row's real tokens quantized as a sequence of their
own) instead of ``stamp::fake_quant``, a batch of one included. Graphs without a mask get
exactly the plain op.
"""

from __future__ import annotations

import torch
from torch import fx

from ..analysis import mask_matches
from ..ops import op_args
from ..padding import real_token_node
from ..sharded_ops import fake_quant_gathered_op, fake_quant_sharded_op
from ..sharding import shard_strategy
from .context import PassContext, StampMeta

STAMP_OP = torch.ops.stamp.fake_quant.default
MASKED_OP = torch.ops.stamp.fake_quant_masked.default
HADAMARD_OP = torch.ops.stamp.hadamard.default
ROTATE_OP = torch.ops.stamp.rotate.default
SHARDED_OP = fake_quant_sharded_op._opoverload
GATHERED_OP = fake_quant_gathered_op._opoverload


def _is_stamp(node: object) -> bool:
    return isinstance(node, fx.Node) and (
        node.target in (STAMP_OP, MASKED_OP, HADAMARD_OP, ROTATE_OP, SHARDED_OP, GATHERED_OP)
        or node.meta.get("stamp_observer", False)
    )


def _autocorr_node(gm: fx.GraphModule, ctx: PassContext, key: str | None) -> fx.Node | None:
    """A get_attr of the KLT autocorrelation, placed right after the placeholders."""
    if key is None:
        return None
    attr = "_stamp_autocorr_" + "".join(c if c.isalnum() else "_" for c in key)
    if not hasattr(gm, attr):
        gm.register_buffer(attr, ctx.plan.tensors[key].to(torch.float64), persistent=False)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        return gm.graph.get_attr(attr)


def _annotate(node: fx.Node, origin: fx.Node, meta: StampMeta, consumer: fx.Node) -> None:
    node.meta["stamp"] = meta
    if "example_value" in origin.meta:
        node.meta["example_value"] = origin.meta["example_value"]
    node.meta["nn_module_stack"] = consumer.meta.get("nn_module_stack", {})


def _insert_quantizer(
    gm, origin, policy, seq_dim, features, autocorr, mask=None, shard=None, strategy="local"
) -> list[fx.Node]:
    """``fake_quant(origin)``, or ``hadamard(fake_quant(hadamard(origin)))`` with a feature
    rotation, inserted right after ``origin``; returns the new nodes, the replacement last.
    With a padding ``mask`` the quantizer is ``fake_quant_masked(x, mask, ...)``; with a
    feature ``shard`` (tensor parallelism) the sharded op of its ``strategy``
    (:func:`stamp_fx.sharding.shard_strategy`, module docstring)."""
    block = policy.rotation_block(features) if features else None
    if policy.feature_transform != "none" and block is None:
        raise ValueError(
            f"feature_transform {policy.feature_transform!r} needs a static feature dim"
        )
    nodes: list[fx.Node] = []
    current = origin
    if strategy == "gather":  # rotation and masking happen on the gathered features
        steps = [
            (GATHERED_OP, (shard.group, block or 0, mask, *op_args(policy, seq_dim), autocorr))
        ]
        block = None
    elif strategy == "reduce":
        steps = [(SHARDED_OP, (shard.group, *op_args(policy, seq_dim), autocorr))]
    elif mask is None:
        steps = [(STAMP_OP, (*op_args(policy, seq_dim), autocorr))]
    else:
        steps = [(MASKED_OP, (mask, *op_args(policy, seq_dim), autocorr))]
    if block is not None:
        steps = [*_rotation_step(block, False), *steps, *_rotation_step(block, True)]
    for target, args in steps:
        with gm.graph.inserting_after(current):
            current = gm.graph.call_function(target, (current, *args))
        nodes.append(current)
    return nodes


def _rotation_step(block: int, inverse: bool) -> list[tuple]:
    """A power-of-two block keeps ``stamp::hadamard`` (symmetric, and the op the Triton kernel
    takes); any other block is ``stamp::rotate``, whose second application is the transpose."""
    if block & (block - 1) == 0:
        return [(HADAMARD_OP, (block,))]
    return [(ROTATE_OP, (block, inverse))]


def _fake_like(fn, *tensors):
    """``fn`` on example values (fake tensors), for the meta of nodes the pass creates."""
    mode = getattr(tensors[0], "fake_mode", None) if tensors else None
    if mode is None:
        return None
    try:
        with mode:
            return fn(*tensors)
    except Exception:  # meta only: a node without it is still correct
        return None


def _size_arg(gm: fx.GraphModule, source: fx.Node, dim: int, after: fx.Node):
    """``source.shape[dim]`` as an int when static, else a ``size`` node after ``after``."""
    size = source.meta["example_value"].shape[dim]
    if isinstance(size, int):
        return size, after
    with gm.graph.inserting_after(after):
        node = gm.graph.call_method("size", (source, dim))
    node.meta["example_value"] = size
    return node, node


def _unflatten(gm: fx.GraphModule, flat: fx.Node, source: fx.Node) -> fx.Node:
    """``flat.unflatten(0, (B, S))`` right after ``flat``, with ``B, S`` the leading sizes of
    ``source`` (an ancestor of ``flat``, so defined before it)."""
    b, last = _size_arg(gm, source, 0, flat)
    s, last = _size_arg(gm, source, 1, last)
    with gm.graph.inserting_after(last):
        node = gm.graph.call_method("unflatten", (flat, 0, (b, s)))
    sizes = source.meta["example_value"].shape[:2]
    fake = _fake_like(lambda t: t.unflatten(0, tuple(sizes)), flat.meta.get("example_value"))
    if fake is not None:
        node.meta["example_value"] = fake
    node.meta["nn_module_stack"] = flat.meta.get("nn_module_stack", {})
    return node


def _flatten_back(gm: fx.GraphModule, quant: fx.Node, flat: fx.Node, meta) -> fx.Node:
    with gm.graph.inserting_after(quant):
        node = gm.graph.call_method("flatten", (quant, 0, 1))
    if "example_value" in flat.meta:
        node.meta["example_value"] = flat.meta["example_value"]
    node.meta["stamp"] = meta
    return node


def _mark_consumer(site, policy) -> None:
    prev = site.consumer.meta.get("stamp")
    site.consumer.meta["stamp"] = StampMeta(
        (prev.sites if prev else ()) + (site.key,),
        (prev.roles if prev else ()) + (site.role,),
        policy.describe(),
        "consumer",
    )


def insert_stamp_ops(gm: fx.GraphModule, ctx: PassContext) -> dict:
    groups: dict[tuple, list] = {}
    already = 0
    for site in ctx.sites:
        policy = ctx.plan.sites.get(site.key)
        if policy is None or site.origin is None:
            continue
        if _is_stamp(site.origin):
            already += 1
            continue
        key = (site.origin, policy, site.seq_dim, site.unflatten, site.extra.get("shard"))
        groups.setdefault(key, []).append(site)

    inserted = rewired = 0
    for (origin, policy, seq_dim, unflatten, shard), sites in groups.items():
        flat_origin = None
        if unflatten is not None:  # [B*S, F] -> [B, S, F] here, and back after quantizing
            flat_origin, origin = origin, _unflatten(gm, origin, unflatten)
        mask = None
        if ctx.padding_mask is not None and ctx.observer is None:
            real = ctx.extra.get("real_tokens")
            if real is None:  # once per graph, and only when some site is planned
                real = ctx.extra["real_tokens"] = real_token_node(gm, ctx.padding_mask)
            mask = real if mask_matches(real, origin, seq_dim) else None
        strategy = shard_strategy(shard, policy, masked=mask is not None)
        meta = StampMeta(
            tuple(s.key for s in sites),
            tuple(s.role for s in sites),
            policy.describe()
            + (" padding-mask" if mask is not None else "")
            + (f" {shard.describe()}:{strategy}" if shard else ""),
        )
        autocorr = (
            None if ctx.observer is not None else _autocorr_node(gm, ctx, policy.autocorr_key)
        )
        if ctx.observer is not None:
            with gm.graph.inserting_after(origin):
                keys = tuple(s.key for s in sites)
                new_nodes = [gm.graph.call_function(ctx.observer, (origin, keys, seq_dim))]
            new_nodes[0].meta["stamp_observer"] = True
        else:
            new_nodes = _insert_quantizer(
                gm, origin, policy, seq_dim, sites[0].features, autocorr, mask, shard, strategy
            )
        for node in new_nodes:
            _annotate(node, origin, meta, sites[0].consumer)
        quant = new_nodes[-1]
        if flat_origin is not None:
            quant = _flatten_back(gm, quant, flat_origin, meta)
        inserted += 1
        views: dict[fx.Node, fx.Node] = {}  # original chain node -> its copy on ``quant``
        for site in sites:
            if site.extra.get("cache_write"):
                # Quantize-on-write: the cache update and every other reader of the new K/V
                # (attention in a no-cache path) see the quantized value.
                keep = set(new_nodes)
                origin.replace_all_uses_with(
                    quant, delete_user_cb=lambda n, keep=keep: n not in keep
                )
                _mark_consumer(site, policy)
                rewired += 1
                continue
            new_input = quant
            for r in site.chain:
                if r not in views:
                    # Right before the original: its other args (sizes) are defined there.
                    with gm.graph.inserting_before(r):
                        views[r] = gm.graph.create_node(
                            r.op, r.target, (new_input, *r.args[1:]), dict(r.kwargs)
                        )
                    views[r].meta.update({k: v for k, v in r.meta.items() if k != "stamp"})
                    views[r].meta["stamp"] = meta
                new_input = views[r]
            site.consumer.update_arg(site.arg_index, new_input)
            _mark_consumer(site, policy)
            rewired += 1
        for old in reversed(list(views)):  # the originals, now unused (consumer side first)
            if not old.users:
                gm.graph.erase_node(old)
    return {"stamp_ops": inserted, "rewired_inputs": rewired, "already_quantized": already}
