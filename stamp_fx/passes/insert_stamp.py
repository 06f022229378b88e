"""Insert ``stamp::fake_quant`` (between two ``stamp::hadamard`` with a feature rotation) in
front of every planned site.

Sites that read the same tensor with the same policy (q/k/v projections, gate/up) share one
quantized tensor: quantize once, not once per consumer. A flattened ``[B*S, D]`` input is
quantized at its ``[B, S, D]`` origin and the view is re-applied. Running the pass again finds
the inserted ops and adds nothing (idempotent).
"""

from __future__ import annotations

import torch
from torch import fx

from ..ops import op_args
from .context import PassContext, StampMeta

STAMP_OP = torch.ops.stamp.fake_quant.default
HADAMARD_OP = torch.ops.stamp.hadamard.default


def _is_stamp(node: object) -> bool:
    return isinstance(node, fx.Node) and (
        node.target in (STAMP_OP, HADAMARD_OP) or node.meta.get("stamp_observer", False)
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


def _insert_quantizer(gm, origin, policy, seq_dim, features, autocorr) -> list[fx.Node]:
    """``fake_quant(origin)``, or ``hadamard(fake_quant(hadamard(origin)))`` with a feature
    rotation, inserted right after ``origin``; returns the new nodes, the replacement last."""
    block = policy.feature_block(features) if features else None
    if policy.feature_transform != "none" and block is None:
        raise ValueError(
            f"feature_transform {policy.feature_transform!r} needs a static feature dim"
        )
    nodes: list[fx.Node] = []
    current = origin
    steps = [(STAMP_OP, (*op_args(policy, seq_dim), autocorr))]
    if block is not None:
        steps = [(HADAMARD_OP, (block,)), *steps, (HADAMARD_OP, (block,))]
    for target, args in steps:
        with gm.graph.inserting_after(current):
            current = gm.graph.call_function(target, (current, *args))
        nodes.append(current)
    return nodes


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
        groups.setdefault((site.origin, policy, site.seq_dim), []).append(site)

    inserted = rewired = 0
    for (origin, policy, seq_dim), sites in groups.items():
        meta = StampMeta(
            tuple(s.key for s in sites), tuple(s.role for s in sites), policy.describe()
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
            new_nodes = _insert_quantizer(gm, origin, policy, seq_dim, sites[0].features, autocorr)
        for node in new_nodes:
            _annotate(node, origin, meta, sites[0].consumer)
        quant = new_nodes[-1]
        inserted += 1
        views: dict[fx.Node, fx.Node] = {}
        for site in sites:
            new_input = quant
            if site.reshape is not None:
                if site.reshape not in views:
                    r = site.reshape
                    with gm.graph.inserting_after(quant):
                        views[r] = gm.graph.create_node(
                            r.op, r.target, (quant, *r.args[1:]), dict(r.kwargs)
                        )
                    views[r].meta.update({k: v for k, v in r.meta.items() if k != "stamp"})
                    views[r].meta["stamp"] = meta
                new_input = views[site.reshape]
            site.consumer.update_arg(site.arg_index, new_input)
            prev = site.consumer.meta.get("stamp")
            site.consumer.meta["stamp"] = StampMeta(
                (prev.sites if prev else ()) + (site.key,),
                (prev.roles if prev else ()) + (site.role,),
                policy.describe(),
                "consumer",
            )
            rewired += 1
        for old in views:
            if not old.users:
                gm.graph.erase_node(old)  # the original view, now unused
    return {"stamp_ops": inserted, "rewired_inputs": rewired, "already_quantized": already}
