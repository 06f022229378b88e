"""``stamp::`` ops for a site whose features are split across tensor-parallel ranks.

Both take this rank's feature shard ``x`` and the process group's name (``group``, as
torch.distributed's functional collectives name groups), then the arguments of
``stamp::fake_quant`` (:func:`stamp_fx.ops.op_args`), and return this rank's shard of what
one device computes on the whole tensor (:mod:`stamp_fx.sharding` says which op a site gets):

* ``stamp::fake_quant_sharded(x, group, seq_dim, ...)``: the sequence transform and its inverse
  act on each feature column alone, so they run on the shard; only the per-token range crosses
  shards, and one all-reduce (max of ``(-min, max)``, ``[2, batch, tokens]`` floats) makes it the
  one-device range. Min and max are exact: the codes equal the one-device codes bit for bit.
* ``stamp::fake_quant_gathered(x, group, block, mask, seq_dim, ...)``: all-gathers the features,
  applies the feature rotation (``block``, 0 for none), the padding-masked (``mask``) or plain
  STaMP fake quant and the inverse rotation exactly as the one-device ops do, and keeps this
  rank's slice. It moves the whole activation, so it is used only where the rotation block or the
  feature groups span shards, or a padding mask applies.

The collectives run eagerly inside the ops (Inductor calls them as extern kernels), on the
group's current stream. Fake impls return a tensor like ``x``; gradients pass straight through.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .ops import decode_op_args, masked_apply, register_straight_through
from .rotations import feature_rotation

__all__ = ["fake_quant_sharded_op", "fake_quant_gathered_op", "group_by_name"]


def group_by_name(name: str):
    """The process group a graph names (torch's own resolver for functional collectives)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _range_reducer(group):
    def reduce_range(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        # One collective for both ends: max(-lo) = -min(lo) exactly.
        both = torch.stack([-lo, hi]).contiguous()
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        return -both[0], both[1]

    return reduce_range


@torch.library.custom_op("stamp::fake_quant_sharded", mutates_args=())
def fake_quant_sharded_op(
    x: Tensor,
    group: str,
    seq_dim: int,
    transform: str,
    levels: int,
    depth_target: int,
    grid: list[int],
    sink_tokens: int,
    high_tokens: int,
    high_bits: int,
    low_bits: int,
    band_edges: list[float],
    band_bits: list[int],
    symmetric: bool,
    group_size: int,
    clip: list[float],
    autocorr: Tensor | None = None,
) -> Tensor:
    fields = (transform, levels, depth_target, grid, sink_tokens, high_tokens, high_bits,
              low_bits, band_edges, band_bits, symmetric, group_size, clip)  # fmt: skip
    policy, tensors = decode_op_args(*fields, autocorr)
    if policy.group_size is not None:
        raise ValueError(
            "stamp::fake_quant_sharded combines whole-token ranges; per-group ranges inside a "
            "shard need no communication (use stamp::fake_quant)"
        )
    reducer = _range_reducer(group_by_name(group))
    return policy.apply_sequence(x, seq_dim, tensors, reduce_range=reducer).contiguous()


@torch.library.custom_op("stamp::fake_quant_gathered", mutates_args=())
def fake_quant_gathered_op(
    x: Tensor,
    group: str,
    block: int,
    mask: Tensor | None,
    seq_dim: int,
    transform: str,
    levels: int,
    depth_target: int,
    grid: list[int],
    sink_tokens: int,
    high_tokens: int,
    high_bits: int,
    low_bits: int,
    band_edges: list[float],
    band_bits: list[int],
    symmetric: bool,
    group_size: int,
    clip: list[float],
    autocorr: Tensor | None = None,
) -> Tensor:
    fields = (transform, levels, depth_target, grid, sink_tokens, high_tokens, high_bits,
              low_bits, band_edges, band_bits, symmetric, group_size, clip)  # fmt: skip
    policy, tensors = decode_op_args(*fields, autocorr)
    pg = group_by_name(group)
    local = x.contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(parts, local, group=pg)
    full = torch.cat(parts, -1)
    # The same steps, in the same dtype, as stamp::hadamard / stamp::rotate around
    # stamp::fake_quant (or its masked form) on one device.
    if block:
        full = feature_rotation(full, block)
    if mask is not None:
        full = masked_apply(policy, full, mask, seq_dim, tensors)
    else:
        full = policy.apply_sequence(full, seq_dim, tensors)
    if block:
        full = feature_rotation(full, block, True)
    width = local.shape[-1]
    return full.narrow(-1, dist.get_rank(pg) * width, width).contiguous()


@fake_quant_sharded_op.register_fake
def _(x, group, seq_dim, *args, **kwargs):
    return x.new_empty(x.shape)


@fake_quant_gathered_op.register_fake
def _(x, group, block, mask, seq_dim, *args, **kwargs):
    return x.new_empty(x.shape)


register_straight_through(fake_quant_sharded_op)
register_straight_through(fake_quant_gathered_op)
