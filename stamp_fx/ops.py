"""``stamp::`` custom ops: defined once, each with a fake (meta) impl and the reference impl.

``torch.ops.stamp.fake_quant(x, seq_dim, transform, levels, grid, sink_tokens, high_tokens,
high_bits, low_bits, band_edges, band_bits, symmetric, group_size, autocorr)`` is the STaMP fake
quantization of one site (see :class:`stamp_fx.plan.SitePolicy`, whose fields the arguments
spell out with sentinels: ``levels=-1`` auto, ``grid=[]`` none, ``group_size=0`` per token,
empty ``band_edges`` for the first-``high_tokens`` rule). A policy's feature rotation is a
separate op, ``torch.ops.stamp.hadamard(x, block)``, placed before and after it. The fake impl returns a tensor like
``x`` (contiguous; so Dynamo and Inductor never graph-break and symbolic sequence lengths stay symbolic);
the real impl is :meth:`SitePolicy.apply`, i.e. ``reference.py``. Gradients pass straight through
(the straight-through estimator), so the op also works under autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .allocation import SpectralBitPlan
from .plan import SitePolicy
from .transforms import block_hadamard

__all__ = ["fake_quant_op", "hadamard_op", "op_args", "policy_from_op_args"]


def op_args(policy: SitePolicy, seq_dim: int) -> tuple:
    """Positional arguments (after ``x`` and before ``autocorr``) of ``stamp::fake_quant``."""
    bands = policy.bands
    return (
        seq_dim,
        policy.transform,
        -1 if policy.levels is None else policy.levels,
        list(policy.grid or ()),
        policy.sink_tokens,
        policy.high_tokens,
        policy.high_bits,
        policy.low_bits,
        list(bands.edges) if bands else [],
        list(bands.bits) if bands else [],
        policy.symmetric,
        policy.group_size or 0,
    )


def policy_from_op_args(
    transform: str,
    levels: int,
    grid: list[int],
    sink_tokens: int,
    high_tokens: int,
    high_bits: int,
    low_bits: int,
    band_edges: list[float],
    band_bits: list[int],
    symmetric: bool,
    group_size: int,
    has_autocorr: bool,
) -> SitePolicy:
    return SitePolicy(
        transform=transform,
        levels=None if levels < 0 else levels,
        grid=tuple(grid) if grid else None,
        sink_tokens=sink_tokens,
        high_tokens=high_tokens,
        high_bits=high_bits,
        low_bits=low_bits,
        bands=SpectralBitPlan(tuple(band_edges), tuple(band_bits)) if band_edges else None,
        symmetric=symmetric,
        group_size=group_size or None,
        autocorr_key="autocorr" if has_autocorr else None,
    )


@torch.library.custom_op("stamp::fake_quant", mutates_args=())
def fake_quant_op(
    x: Tensor,
    seq_dim: int,
    transform: str,
    levels: int,
    grid: list[int],
    sink_tokens: int,
    high_tokens: int,
    high_bits: int,
    low_bits: int,
    band_edges: list[float],
    band_bits: list[int],
    symmetric: bool,
    group_size: int,
    autocorr: Tensor | None = None,
) -> Tensor:
    policy = policy_from_op_args(
        transform, levels, grid, sink_tokens, high_tokens, high_bits, low_bits,
        band_edges, band_bits, symmetric, group_size, autocorr is not None,
    )  # fmt: skip
    tensors = {"autocorr": autocorr} if autocorr is not None else None
    return policy.apply_sequence(x, seq_dim, tensors).contiguous()


@fake_quant_op.register_fake
def _(x, seq_dim, transform, levels, grid, sink_tokens, high_tokens, high_bits, low_bits,
      band_edges, band_bits, symmetric, group_size, autocorr=None):  # fmt: skip
    # Always contiguous, like the real impl, whatever the input's strides.
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output) -> None:
    pass


def _straight_through(ctx, grad):
    return (grad,) + (None,) * 13


fake_quant_op.register_autograd(_straight_through, setup_context=_setup_context)


@torch.library.custom_op("stamp::hadamard", mutates_args=())
def hadamard_op(x: Tensor, block: int) -> Tensor:
    """Orthonormal block-Hadamard rotation of the feature (last) dim; its own inverse."""
    return block_hadamard(x, block).contiguous()


@hadamard_op.register_fake
def _(x, block):
    return x.new_empty(x.shape)


def _hadamard_backward(ctx, grad):
    # The rotation is symmetric and orthonormal: its adjoint is itself.
    return hadamard_op(grad, ctx.block), None


def _hadamard_setup(ctx, inputs, output) -> None:
    ctx.block = inputs[1]


hadamard_op.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)
