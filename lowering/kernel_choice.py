"""Which op runs each ``stamp::`` node: the one place a lowering decides it.

The stamp backend's ``select_kernels`` pass calls :func:`choose` on every ``stamp::fake_quant``
and ``stamp::hadamard`` node of the Dynamo graph, after the quantizers are inserted and before
Inductor sees the graph, and swaps the node for the answer. Deciding here, on the graph the
backend owns, instead of in a pass installed into Inductor's config, leaves a user's own
Inductor passes alone and puts the choice in the debug dumps (``stamp_kernel`` in the node meta).

The answers, for a lowering with hand-written kernels (``auto``, the default; ``triton``):

* ``stamp::fake_quant`` on CUDA that :func:`.triton_haar.eligible` takes:
  ``stamp::haar_fake_quant`` (a ``triton_op``: Inductor launches the kernel from its own code),
  ``stamp::haar2d_fake_quant`` for a haar2d site (the same kernel on square tiles of the grid),
  or, for a symbolic length under auto levels, ``stamp::haar_fake_quant_dynamic`` (an opaque
  op that picks the Haar depth per call), so a new length never recompiles;
* ``stamp::hadamard`` on CUDA that :func:`.hadamard_kernel.eligible` takes:
  ``stamp::hadamard_kernel``; ``stamp::rotate`` (a block that is not a power of two: a Kronecker
  Hadamard or random orthogonal the kernel cannot compute) is not decided here and always goes
  to its decomposition;
* anything else stays, and Inductor decomposes it (:mod:`.decompositions`; C++ on the CPU) or,
  where no decomposition applies (``klt``; a symbolic length under auto Haar levels or the WHT),
  calls the reference.

``stamp::fake_quant_masked`` (a padded batch: each row's real tokens form their own sequence,
a data-dependent gather) has no decomposition and no kernel: it is always left to the
reference (``Choice("reference")``), which Inductor calls as an extern kernel.

The ``inductor`` lowering takes no hand-written kernel; ``reference`` keeps every node as an
extern call (:func:`choose` is not called).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx

from stamp_fx.fx_values import example_tensor
from stamp_fx.plan import SitePolicy

from .symbolic import symbolic_length

__all__ = ["Choice", "choose", "DECOMPOSED", "REFERENCE"]

DECOMPOSED = "inductor"
REFERENCE = "reference"


@dataclass(frozen=True)
class Choice:
    """``target(*args)`` replaces the node (``target`` None: the node stays); ``label`` names
    what runs it, for reports."""

    label: str
    target: object = None
    args: tuple = ()


def _bound_arguments(op: torch._ops.OpOverload, node: fx.Node) -> list:
    """The node's arguments in schema order, defaults filled in."""
    out = []
    for i, arg in enumerate(op._schema.arguments):
        if i < len(node.args):
            out.append(node.args[i])
        else:
            out.append(node.kwargs.get(arg.name, arg.default_value))
    return out


def _concrete_arg(arg):
    """Configuration arguments that Dynamo passed as symbolic graph inputs, as their values."""
    if isinstance(arg, fx.Node):
        value = arg.meta.get("val", arg.meta.get("example_value"))
        if isinstance(value, torch.SymBool):
            return bool(value)
        if isinstance(value, torch.SymFloat):
            return float(value)
        if isinstance(value, torch.SymInt):
            return int(value)
        return value if isinstance(value, (int, float, bool)) else arg
    if isinstance(arg, (list, tuple)):
        return [_concrete_arg(a) for a in arg]
    return arg


def _fallback(policy: SitePolicy, x: Tensor, seq_dim: int) -> Choice:
    from .traceable_transforms import traceable_transform

    cls = traceable_transform(policy.transform)
    if cls is None or policy.autocorr_key is not None:
        return Choice(REFERENCE)
    if symbolic_length(x, seq_dim) and cls.shape_depends_on_length(policy):
        return Choice(REFERENCE)
    return Choice(DECOMPOSED)


def haar_kernel_policy(
    levels: int, sink_tokens: int, high_tokens: int, high_bits: int, low_bits: int,
    symmetric: bool, depth_target: int, grid: tuple[int, int] | None = None,
) -> SitePolicy:  # fmt: skip
    """The inverse of :func:`_haar_kernel_args`: the policy a Haar kernel op's arguments encode
    (for an op that falls back to the reference). -1 spells None (auto depth, or a depth target
    that follows ``high_tokens``)."""
    return SitePolicy(
        transform="haar" if grid is None else "haar2d", grid=grid,
        levels=None if levels < 0 else levels,
        depth_target=None if depth_target < 0 else depth_target,
        sink_tokens=sink_tokens, high_tokens=high_tokens,
        high_bits=high_bits, low_bits=low_bits, symmetric=symmetric,
    )  # fmt: skip


def _haar_kernel_args(policy: SitePolicy) -> tuple:
    """The policy as the Haar kernel ops take it (after the tensor arguments; a haar2d op takes
    the grid's height and width first); :func:`haar_kernel_policy` decodes it."""
    unset = lambda v: -1 if v is None else v  # noqa: E731
    return (
        unset(policy.levels), policy.sink_tokens, policy.high_tokens, policy.high_bits,
        policy.low_bits, policy.symmetric, unset(policy.depth_target),
    )  # fmt: skip


def _choose_fake_quant(node: fx.Node, hand_written: bool) -> Choice:
    from .decompositions import policy_of

    op = torch.ops.stamp.fake_quant.default
    args = _bound_arguments(op, node)
    args = [args[0], *(_concrete_arg(a) for a in args[1:])]
    x, seq_dim, autocorr = example_tensor(args[0]), args[1], args[-1]
    if x is None:
        return Choice(DECOMPOSED)
    try:
        policy = policy_of(*args[2:])
    except ValueError:
        return Choice(DECOMPOSED)  # the decomposition reports it
    if autocorr is not None or not hand_written or x.device.type != "cuda":
        return _fallback(policy, x, seq_dim)
    from . import haar_ops, triton_haar  # noqa: F401 (haar_ops registers the ops chosen here)

    if not triton_haar.eligible(x, policy, seq_dim):
        return _fallback(policy, x, seq_dim)
    kernel_args = (args[0], *_haar_kernel_args(policy))
    if policy.transform == "haar2d":
        grid_op = torch.ops.stamp.haar2d_fake_quant.default
        return Choice("haar2d kernel", grid_op, (args[0], *policy.grid, *kernel_args[1:]))
    if policy.levels is None and symbolic_length(x, -2):
        # The depth follows the length: decided per call, so no guard and no recompile.
        dynamic = torch.ops.stamp.haar_fake_quant_dynamic.default
        return Choice("haar kernel (depth per call)", dynamic, kernel_args)
    return Choice("haar kernel", torch.ops.stamp.haar_fake_quant.default, kernel_args)


def _choose_hadamard(node: fx.Node, hand_written: bool) -> Choice:
    op = torch.ops.stamp.hadamard.default
    args = _bound_arguments(op, node)
    x, block = example_tensor(args[0]), _concrete_arg(args[1])
    if x is None or not hand_written or x.device.type != "cuda" or not isinstance(block, int):
        return Choice(DECOMPOSED)
    from . import hadamard_kernel

    if not hadamard_kernel.eligible(x, block):
        return Choice(DECOMPOSED)
    return Choice("hadamard kernel", torch.ops.stamp.hadamard_kernel.default, (args[0], block))


def _choose_masked(node: fx.Node, hand_written: bool) -> Choice:
    """A padded batch's site: no decomposition (each row's real tokens are a sequence of their
    own), so the reference, or on CUDA the Haar kernel once per call (a batch without padding)
    or once per row (``stamp::haar_fake_quant_masked``)."""
    from .decompositions import policy_of

    op = torch.ops.stamp.fake_quant_masked.default
    args = _bound_arguments(op, node)
    args = [args[0], args[1], *(_concrete_arg(a) for a in args[2:])]
    x, seq_dim, autocorr = example_tensor(args[0]), args[2], args[-1]
    if x is None or autocorr is not None or not hand_written or x.device.type != "cuda":
        return Choice(REFERENCE)
    try:
        policy = policy_of(*args[3:])
    except ValueError:
        return Choice(REFERENCE)
    from . import haar_ops, triton_haar  # noqa: F401 (haar_ops registers the ops chosen here)

    if policy.transform != "haar":  # the per-row kernel op is 1-D only
        return Choice(REFERENCE)
    if not triton_haar.eligible(x, policy, seq_dim) or seq_dim % x.ndim == 0:
        return Choice(REFERENCE)
    kernel_args = (args[0], args[1], *_haar_kernel_args(policy))
    return Choice(
        "haar kernel (padded rows)", torch.ops.stamp.haar_fake_quant_masked.default, kernel_args
    )


def choose(node: fx.Node, *, hand_written: bool) -> Choice | None:
    """What runs ``node`` (None: not a ``stamp::`` op this module decides)."""
    if node.op != "call_function":
        return None
    fake_quant, hadamard = torch.ops.stamp.fake_quant, torch.ops.stamp.hadamard
    masked = torch.ops.stamp.fake_quant_masked
    if node.target in (masked, masked.default):
        return _choose_masked(node, hand_written)
    if node.target in (fake_quant, fake_quant.default):
        return _choose_fake_quant(node, hand_written)
    if node.target in (hadamard, hadamard.default):
        return _choose_hadamard(node, hand_written)
    return None
