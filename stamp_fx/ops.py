"""``stamp::`` custom ops: defined once, each with a fake (meta) impl and the reference impl.

``torch.ops.stamp.fake_quant(x, seq_dim, transform, levels, depth_target, grid, sink_tokens,
high_tokens, high_bits, low_bits, band_edges, band_bits, symmetric, group_size, clip, autocorr)``
is the STaMP fake quantization of one site (see
:class:`stamp_fx.plan.SitePolicy`, whose fields the arguments spell out with sentinels:
``levels=-1`` auto, ``depth_target=-1`` = ``high_tokens``, ``grid=[]`` none, ``group_size=0``
per token, empty ``band_edges`` for the first-``high_tokens`` rule, ``clip=[]`` none, else
``[high_clip_ratio, clip_ratio]``). A policy's feature rotation is a
separate op placed before and after it: ``torch.ops.stamp.hadamard(x, block)`` for a
power-of-two block (symmetric, its own inverse, the op the Triton kernel can take), or
``torch.ops.stamp.rotate(x, block, inverse)`` for any other block (:mod:`stamp_fx.rotations`:
a Kronecker Hadamard or a seeded random orthogonal; not symmetric, so the second one is the
transpose). The fake impl returns a tensor like
``x`` (contiguous; so Dynamo and Inductor never graph-break and symbolic sequence lengths stay symbolic);
the real impl is :meth:`SitePolicy.apply`, i.e. ``reference.py``. Gradients pass straight through
(the straight-through estimator), so the op also works under autograd.

``torch.ops.stamp.fake_quant_masked(x, mask, seq_dim, ...)`` (the same arguments after ``mask``)
is the padding-aware form, inserted only when the model is called with a padded batch (an HF
``attention_mask``, ``[batch, seq]``, nonzero = real token): each batch row's real tokens are
quantized as a sequence of their own (:func:`masked_apply`: gathered in order, so under left
padding the sink is the first real token), and pad positions pass through unchanged. Pad
positions therefore change no real token's transform, range or bits. Unmasked and batch-of-one
graphs keep the plain op. It has no Inductor decomposition (the gather is data-dependent), so
Inductor calls this reference implementation for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .allocation import SpectralBitPlan
from .plan import SitePolicy
from .rotations import feature_rotation
from .transforms import block_hadamard

__all__ = [
    "fake_quant_op",
    "fake_quant_masked_op",
    "hadamard_op",
    "rotate_op",
    "masked_apply",
    "per_real_row",
    "op_args",
    "policy_from_op_args",
]


def op_args(policy: SitePolicy, seq_dim: int) -> tuple:
    """Positional arguments (after ``x`` and before ``autocorr``) of ``stamp::fake_quant``."""
    bands = policy.bands
    return (
        seq_dim,
        policy.transform,
        -1 if policy.levels is None else policy.levels,
        -1 if policy.depth_target is None else policy.depth_target,
        list(policy.grid or ()),
        policy.sink_tokens,
        policy.high_tokens,
        policy.high_bits,
        policy.low_bits,
        list(bands.edges) if bands else [],
        list(bands.bits) if bands else [],
        policy.symmetric,
        policy.group_size or 0,
        # [] unless the site clips: no float arguments on the common path (Dynamo lifts
        # floats read in traced Python to graph inputs, and a new value would recompile).
        [policy.high_clip_ratio, policy.clip_ratio] if policy.clips else [],
    )


def policy_from_op_args(
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
    has_autocorr: bool,
) -> SitePolicy:
    return SitePolicy(
        transform=transform,
        levels=None if levels < 0 else levels,
        depth_target=None if depth_target < 0 else depth_target,
        grid=tuple(grid) if grid else None,
        sink_tokens=sink_tokens,
        high_tokens=high_tokens,
        high_bits=high_bits,
        low_bits=low_bits,
        bands=SpectralBitPlan(tuple(band_edges), tuple(band_bits)) if band_edges else None,
        symmetric=symmetric,
        group_size=group_size or None,
        high_clip_ratio=clip[0] if clip else 1.0,
        clip_ratio=clip[1] if clip else 1.0,
        autocorr_key="autocorr" if has_autocorr else None,
    )


def decode_op_args(*args) -> tuple[SitePolicy, dict[str, Tensor] | None]:
    """A fake-quant op's policy arguments (ending with ``autocorr``) as a policy and the
    tensors its transform reads (every ``stamp::fake_quant*`` op decodes them here)."""
    *fields, autocorr = args
    policy = policy_from_op_args(*fields, autocorr is not None)
    return policy, ({"autocorr": autocorr} if autocorr is not None else None)


@torch.library.custom_op("stamp::fake_quant", mutates_args=())
def fake_quant_op(
    x: Tensor,
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
    policy, tensors = decode_op_args(
        transform, levels, depth_target, grid, sink_tokens, high_tokens, high_bits,
        low_bits, band_edges, band_bits, symmetric, group_size, clip, autocorr,
    )  # fmt: skip
    return policy.apply_sequence(x, seq_dim, tensors).contiguous()


@fake_quant_op.register_fake
def _(x, seq_dim, transform, levels, depth_target, grid, sink_tokens, high_tokens, high_bits,
      low_bits, band_edges, band_bits, symmetric, group_size, clip, autocorr=None):  # fmt: skip
    # Always contiguous, like the real impl, whatever the input's strides.
    return x.new_empty(x.shape)


def register_straight_through(op) -> None:
    """Give the custom op ``op`` fake quantization's straight-through gradient: its first
    input's gradient passes unchanged, every other input gets none. The count of the others
    comes from the op's schema, so adding an argument cannot leave a stale count behind."""
    others = len(op._opoverload._schema.arguments) - 1

    def backward(ctx, grad):
        return (grad,) + (None,) * others

    op.register_autograd(backward, setup_context=_no_context)


def _no_context(ctx, inputs, output) -> None:
    pass


register_straight_through(fake_quant_op)


def per_real_row(
    x: Tensor, mask: Tensor, seq_dim: int, quantize: Callable[[Tensor], Tensor], op: str
) -> Tensor:
    """``quantize`` (a sequence fake quant along ``seq_dim``) on each batch row's real tokens
    (``mask[b] != 0``) as a sequence of their own; pad positions are returned unchanged. A
    batch without padding is one call. ``x`` is ``[B, ..., S, ..., D]`` with the batch first,
    ``mask`` is ``[B, S]``; ``op`` names the caller in the shape error. Both masked ops (the
    reference and the Haar kernel's) gather and scatter through this one function."""
    seq_dim = seq_dim % x.ndim
    if seq_dim == 0 or mask.ndim != 2 or tuple(mask.shape) != (x.shape[0], x.shape[seq_dim]):
        raise ValueError(
            f"{op}: attention_mask must be [batch, seq] = "
            f"{(x.shape[0], x.shape[seq_dim])}, got {tuple(mask.shape)}"
        )
    real = mask != 0
    if bool(real.all()):
        return quantize(x).contiguous()
    out = x.clone(memory_format=torch.contiguous_format)
    for b in range(x.shape[0]):
        index = real[b].nonzero().squeeze(1).to(x.device)
        if index.numel() == 0:
            continue
        row = x[b : b + 1].index_select(seq_dim, index)
        out[b : b + 1].index_copy_(seq_dim, index, quantize(row))
    return out


def masked_apply(policy: SitePolicy, x: Tensor, mask: Tensor, seq_dim: int, tensors=None) -> Tensor:
    """``policy.apply_sequence`` on each batch row's real tokens (``mask[b] != 0``) as a
    sequence of their own; pad positions are returned unchanged (:func:`per_real_row`)."""
    return per_real_row(
        x, mask, seq_dim, lambda rows: policy.apply_sequence(rows, seq_dim, tensors),
        "stamp::fake_quant_masked",
    )  # fmt: skip


@torch.library.custom_op("stamp::fake_quant_masked", mutates_args=())
def fake_quant_masked_op(
    x: Tensor,
    mask: Tensor,
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
    policy, tensors = decode_op_args(
        transform, levels, depth_target, grid, sink_tokens, high_tokens, high_bits,
        low_bits, band_edges, band_bits, symmetric, group_size, clip, autocorr,
    )  # fmt: skip
    return masked_apply(policy, x, mask, seq_dim, tensors)


@fake_quant_masked_op.register_fake
def _(x, mask, seq_dim, transform, levels, depth_target, grid, sink_tokens, high_tokens,
      high_bits, low_bits, band_edges, band_bits, symmetric, group_size, clip, autocorr=None):  # fmt: skip
    return x.new_empty(x.shape)


register_straight_through(fake_quant_masked_op)


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


@torch.library.custom_op("stamp::rotate", mutates_args=())
def rotate_op(x: Tensor, block: int, inverse: bool) -> Tensor:
    """Orthonormal rotation ``x @ (I ⊗ R_block)`` of the feature (last) dim, ``R_blockᵀ`` with
    ``inverse`` (:func:`stamp_fx.rotations.feature_rotation`, any block dividing the features)."""
    return feature_rotation(x, block, inverse).contiguous()


@rotate_op.register_fake
def _(x, block, inverse):
    return x.new_empty(x.shape)


def _rotate_backward(ctx, grad):
    # Orthonormal: the adjoint of x -> x R is g -> g Rᵀ, the op with ``inverse`` flipped.
    return rotate_op(grad, ctx.block, not ctx.inverse), None, None


def _rotate_setup(ctx, inputs, output) -> None:
    ctx.block, ctx.inverse = inputs[1], inputs[2]


rotate_op.register_autograd(_rotate_backward, setup_context=_rotate_setup)
