"""The Haar kernels as ``torch`` ops (what :mod:`.kernel_choice` puts in a graph).

* ``stamp::haar_fake_quant`` and ``stamp::haar2d_fake_quant``: ``triton_op`` s, so Inductor sees
  the Triton kernel and launches it from its own generated code;
* ``stamp::haar_fake_quant_dynamic``: an opaque op for a symbolic length under auto levels
  (the depth decided per call, so a new length never recompiles);
* ``stamp::haar_fake_quant_masked``: a padded batch, each row's real tokens on the kernel.

All take the site's policy in one encoding (:func:`.kernel_choice._haar_kernel_args`) and pass
gradients straight through (fake quantization's straight-through estimator).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from stamp_fx.ops import per_real_row, register_straight_through

from .kernel_choice import haar_kernel_policy
from .symbolic import haar_levels
from .triton_haar import MAX_LEVELS, haar_fake_quant

__all__ = [
    "haar2d_fake_quant_op",
    "haar_fake_quant_dynamic_op",
    "haar_fake_quant_masked_op",
    "haar_fake_quant_op",
]


@triton_op("stamp::haar_fake_quant", mutates_args=())
def haar_fake_quant_op(
    x: Tensor,
    levels: int,
    sink_tokens: int,
    high_tokens: int,
    high_bits: int,
    low_bits: int,
    symmetric: bool,
    depth_target: int,
) -> Tensor:
    """``torch.ops.stamp.haar_fake_quant``: :func:`haar_fake_quant` as a ``triton_op``, so
    ``torch.compile`` sees (and Inductor launches from its own code) the Triton kernel."""
    return haar_fake_quant(
        x, levels, sink_tokens, high_tokens, high_bits, low_bits, symmetric,
        depth_target=depth_target,
    )  # fmt: skip


@triton_op("stamp::haar2d_fake_quant", mutates_args=())
def haar2d_fake_quant_op(
    x: Tensor,
    grid_h: int,
    grid_w: int,
    levels: int,
    sink_tokens: int,
    high_tokens: int,
    high_bits: int,
    low_bits: int,
    symmetric: bool,
    depth_target: int,
) -> Tensor:
    """``torch.ops.stamp.haar2d_fake_quant``: :func:`haar_fake_quant` with
    ``grid=(grid_h, grid_w)`` (the haar2d site of an image grid) as a ``triton_op``."""
    return haar_fake_quant(
        x, levels, sink_tokens, high_tokens, high_bits, low_bits, symmetric,
        grid=(grid_h, grid_w), depth_target=depth_target,
    )  # fmt: skip


@torch.library.custom_op("stamp::haar_fake_quant_dynamic", mutates_args=())
def haar_fake_quant_dynamic_op(
    x: Tensor,
    levels: int,
    sink_tokens: int,
    high_tokens: int,
    high_bits: int,
    low_bits: int,
    symmetric: bool,
    depth_target: int,
) -> Tensor:
    """``torch.ops.stamp.haar_fake_quant_dynamic``: the kernel for a site whose length is
    symbolic. An opaque op (Inductor calls it, it does not trace it), so the Haar depth, which
    auto levels take from the length, is decided per call and a new length never recompiles.
    Past ``MAX_LEVELS`` it runs the reference, which computes the same thing."""
    args = (sink_tokens, high_tokens, high_bits, low_bits, symmetric)
    policy = haar_kernel_policy(levels, *args, depth_target)
    depth = haar_levels(max(0, x.shape[-2] - sink_tokens), levels, policy.haar_target)
    if depth > MAX_LEVELS:
        return policy.apply_sequence(x, -2).contiguous()
    return haar_fake_quant(x, depth, *args)


@haar_fake_quant_dynamic_op.register_fake
def _(x, levels, sink_tokens, high_tokens, high_bits, low_bits, symmetric, depth_target):
    return x.new_empty(x.shape)


@torch.library.custom_op("stamp::haar_fake_quant_masked", mutates_args=())
def haar_fake_quant_masked_op(
    x: Tensor,
    mask: Tensor,
    levels: int,
    sink_tokens: int,
    high_tokens: int,
    high_bits: int,
    low_bits: int,
    symmetric: bool,
    depth_target: int,
) -> Tensor:
    """``torch.ops.stamp.haar_fake_quant_masked``: ``stamp::fake_quant_masked`` (each batch
    row's real tokens, ``mask[b] != 0``, quantized as a sequence of their own; pads unchanged)
    on the kernel. ``x`` is ``[B, ..., S, D]`` (batch first, sequence on dim -2), ``mask``
    ``[B, S]``. A batch without padding is one kernel call; a padded one, one per row (the
    depth decided per call, as :func:`haar_fake_quant_dynamic_op` does)."""
    args = (levels, sink_tokens, high_tokens, high_bits, low_bits, symmetric, depth_target)
    return per_real_row(
        x, mask, -2, lambda rows: haar_fake_quant_dynamic_op(rows, *args),
        "stamp::haar_fake_quant_masked",
    )  # fmt: skip


@haar_fake_quant_masked_op.register_fake
def _(x, mask, levels, sink_tokens, high_tokens, high_bits, low_bits, symmetric, depth_target):
    return x.new_empty(x.shape)


for _op in (
    haar_fake_quant_op,
    haar2d_fake_quant_op,
    haar_fake_quant_dynamic_op,
    haar_fake_quant_masked_op,
):
    register_straight_through(_op)
