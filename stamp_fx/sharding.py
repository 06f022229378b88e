"""Tensor parallelism: which sites read a tensor split across ranks, and how to quantize them.

STaMP's per-token min-max range spans the whole feature axis. Under row-parallel sharding (the
inputs of ``o_proj`` and ``down_proj`` in the usual Megatron / torchtitan / transformers
``tp_plan``) each rank holds a slice of the features, and a quantizer run on that slice alone
would compute other ranges than one device does: the result would change with the number of
GPUs. This module finds such sites on the Dynamo graph and says what the pass must do there
(:func:`shard_strategy`, the one decision); :mod:`stamp_fx.sharded_ops` holds the ops.

Two ways a sharded linear input reaches the graph, both recognised by :func:`annotate_sharding`:

* ``torch.distributed.tensor.parallel.parallelize_module`` (ColwiseParallel / RowwiseParallel):
  the linear reads ``DTensor.from_local(local, mesh, placements)`` made by the style's
  input hook. The site moves to ``local`` (a plain tensor: ``stamp::`` ops have no DTensor
  sharding rule) and ``from_local`` joins the layout chain the pass re-applies, so q/k/v (and
  gate/up) still share one quantizer.
* transformers' ``from_pretrained(..., tp_plan="auto")``: in inference the linear runs on plain
  local tensors and its weight is ``param.to_local()`` of a DTensor; a weight sharded along its
  input features (``Shard(1)``) means the activation is this rank's feature shard.

Per mesh dimension, ``Replicate`` and a shard of the batch axis are local to each rank (a
token's range lies on one rank). ``Shard`` of the features is handled; ``Shard`` of the
sequence axis (sequence parallelism) and ``Partial`` are refused: the site runs unquantized with
a reason, as is a DTensor input made inside the graph (a ``redistribute``), which is where a
sequence-parallel plan gathers its tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx

from .fx_values import example_tensor

__all__ = ["ShardSpec", "annotate_sharding", "shard_strategy", "STRATEGIES"]

STRATEGIES = ("local", "reduce", "gather")
"""``local``: the site's tensor holds every feature of its tokens (or every feature group the
policy quantizes), the ordinary ops run on it. ``reduce``: ``stamp::fake_quant_sharded``, one
all-reduce of ``[2, batch, tokens]`` per site combines the ranges. ``gather``:
``stamp::fake_quant_gathered`` all-gathers the features, runs the one-device computation and keeps
this rank's slice (a feature rotation whose block spans shards, padding masks, groups across
shards)."""


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """The features of a site's tensor are split over ``size`` ranks of process group
    ``group`` (its name, as torch.distributed's functional collectives take it), evenly:
    ``local_features * size == features``."""

    group: str
    size: int
    features: int
    local_features: int
    source: str  # "dtensor" (parallelize_module) or "local weight" (transformers' tp_plan)

    def describe(self) -> str:
        return f"tp={self.size}({self.local_features}/{self.features} features)"


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_dtensor(t: object) -> bool:
    dt = _dtensor_type()
    return dt is not None and isinstance(t, dt)


def _is_from_local(node: fx.Node) -> bool:
    if node.op != "call_function" or not node.args:
        return False
    target = node.target
    dt = _dtensor_type()
    return (dt is not None and target is getattr(dt.from_local, "__func__", dt.from_local)) or (
        getattr(target, "__name__", "") == "from_local"
        and getattr(target, "__module__", "").startswith("torch.distributed.tensor")
    )


def _feature_mesh_dim(placements, ndim: int, seq_dim: int | None) -> tuple[int | None, str | None]:
    """(mesh dim whose shards split the last axis, or None; reason when the layout is refused)."""
    from torch.distributed.tensor import Partial, Shard

    found = None
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Partial):
            return None, f"input is a Partial DTensor ({p}): not reduced before the linear"
        if not isinstance(p, Shard):
            continue
        dim = p.dim % ndim
        if dim == ndim - 1:
            if found is not None:
                return None, "input features are sharded over more than one mesh dimension"
            found = mesh_dim
        elif seq_dim is not None and dim == seq_dim % ndim:
            return None, (
                f"sequence-parallel input (tokens sharded, {p} on mesh dim {mesh_dim}): the "
                "sequence transform needs every token on one rank; gather the tokens before "
                "this linear (e.g. ColwiseParallel(input_layouts=Shard(1)) without "
                "SequenceParallel) or leave the site out"
            )
    return found, None


def _spec(mesh, mesh_dim: int, features: int, local: int, source: str) -> ShardSpec | str:
    size = mesh.size(mesh_dim)
    if local * size != features:
        return (
            f"features split unevenly over {size} ranks ({local} here of {features}): "
            "STaMP needs an even feature split under tensor parallelism"
        )
    return ShardSpec(mesh.get_group(mesh_dim).group_name, size, features, local, source)


def _from_dtensor_input(origin: fx.Node, seq_dim: int | None) -> tuple[fx.Node, object] | str:
    """For a site whose tensor is a DTensor: (the local tensor to quantize, ShardSpec or None)."""
    if origin.op == "call_method" and origin.target == "redistribute" and origin.args:
        src = example_tensor(origin.args[0])
        if _is_dtensor(src):  # name the layout it came from (sequence parallelism)
            reason = _feature_mesh_dim(src.placements, src.ndim, seq_dim)[1]
            if reason is not None:
                return reason
    if not _is_from_local(origin) or not isinstance(origin.args[0], fx.Node):
        return (
            "input is a DTensor computed inside the graph (e.g. a sequence-parallel plan's "
            "redistribute); stamp quantizes DTensors made by DTensor.from_local only"
        )
    dt = example_tensor(origin)
    local = origin.args[0]
    lt = example_tensor(local)
    if lt is None or lt.ndim != dt.ndim:
        return "the local tensor of the DTensor input has no example value of its rank"
    mesh_dim, reason = _feature_mesh_dim(dt.placements, dt.ndim, seq_dim)
    if reason is not None:
        return reason
    if mesh_dim is None:
        return local, None
    return local, _spec(dt.device_mesh, mesh_dim, int(dt.shape[-1]), int(lt.shape[-1]), "dtensor")


def _local_weight_shard(gm: fx.GraphModule, consumer: fx.Node, x: object) -> ShardSpec | str | None:
    """transformers' local-tensor path: the linear's weight is ``W.to_local()`` of a DTensor;
    ``Shard(1)`` of ``[out, in]`` means ``x`` is this rank's feature shard."""
    if consumer.op != "call_function" or consumer.target is not torch._C._nn.linear:
        return None
    w = consumer.args[1] if len(consumer.args) > 1 else consumer.kwargs.get("weight")
    if not (isinstance(w, fx.Node) and w.op == "call_method" and w.target == "to_local"):
        return None
    param = example_tensor(w.args[0])
    if not _is_dtensor(param) or param.ndim != 2:
        return None
    mesh_dim, reason = _feature_mesh_dim(param.placements, 2, None)
    if reason is not None:
        return f"weight {reason}"
    if mesh_dim is None:
        return None
    t = example_tensor(x)
    return _spec(param.device_mesh, mesh_dim, int(param.shape[1]), int(t.shape[-1]), "local weight")


def annotate_sharding(gm: fx.GraphModule, sites: Iterable) -> None:
    """Mark every linear-input site of a tensor-parallel graph (see the module docstring):
    ``site.extra["shard"]`` a :class:`ShardSpec` where its features are split, the site moved
    off a ``DTensor.from_local`` onto the local tensor, or ``site.reason`` when the layout is
    refused. ``site.features`` is the feature count of the whole (unsharded) tensor, the one a
    single device sees, so the plan does not depend on the number of ranks."""
    if _dtensor_type() is None:
        return
    for site in sites:
        if site.slot != "in" or site.origin is None:
            continue
        spec: object = None
        if _is_dtensor(example_tensor(site.origin)):
            found = _from_dtensor_input(site.origin, site.seq_dim)
            if isinstance(found, str):
                spec = found
            else:
                from_local = site.origin
                site.origin, spec = found
                site.chain = (from_local, *site.chain)
                site.reshape = site.chain[-1]
        else:
            spec = _local_weight_shard(gm, site.consumer, site.consumer.args[site.arg_index])
        if isinstance(spec, str):
            site.origin, site.chain, site.reshape, site.reason = None, (), None, spec
        elif spec is not None:
            site.extra["shard"] = spec
            site.features = spec.features


def shard_strategy(spec: ShardSpec | None, policy, masked: bool = False) -> str:
    """How the pass quantizes a site (one of :data:`STRATEGIES`): the cheapest way that computes
    exactly what one device computes. Every token's range over the features is an all-reduce of
    two numbers per token (``reduce``); a feature rotation whose block does not lie inside one
    shard, per-group ranges whose groups straddle shards, and the padding-masked quantizer
    (it re-gathers each row's real tokens) need the whole features (``gather``)."""
    if spec is None:
        return "local"
    block = policy.rotation_block(spec.features)
    if masked or (block is not None and spec.local_features % block):
        return "gather"
    if policy.group_size is not None:
        return "local" if spec.local_features % policy.group_size == 0 else "gather"
    return "reduce"
