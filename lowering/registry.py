"""Lowerings of ``stamp::`` ops for Inductor, in a name registry (``options={"lowering": name}``).

A :class:`Lowering` says whether Inductor decomposes ``stamp::`` ops (:mod:`.decompositions`),
adds Inductor config patches, and makes the choice of op for each ``stamp::`` node
(:func:`.kernel_choice.choose`, applied by the backend's ``select_kernels`` pass on the Dynamo
graph). All are called when a graph is compiled, so importing the registry never imports
Triton (the Triton kernels' tests need to choose the interpreter before that import).

* ``auto`` (the default): the hand-written Triton kernels on CUDA where they apply (the fused
  Haar fake-quant kernel, the Hadamard rotation kernel), the fused Inductor decomposition for
  every other site (Triton on CUDA, C++ on the CPU);
* ``triton``: the same (the name that selected the hand-written kernels before ``auto``);
* ``inductor``: the Inductor decomposition everywhere, no hand-written kernel;
* ``reference``: every ``stamp::`` op an opaque call to the pure-PyTorch reference (correct
  everywhere, slow; for debugging).

Where no decomposition applies (``klt``; a symbolic length under auto Haar levels or the WHT,
whose coefficient layout changes with the length bracket) Inductor calls the reference, or on
CUDA the Haar kernel through an op that picks its depth per call: a new length never recompiles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stamp_fx.options import DEFAULT_LOWERING

from .cache import inductor_config_patches

__all__ = [
    "DEFAULT_LOWERING",
    "Lowering",
    "LOWERINGS",
    "register_lowering",
    "get_lowering",
    "available_lowerings",
]


@dataclass(frozen=True)
class Lowering:
    name: str
    description: str
    decomposes: bool = False
    """Inductor decomposes ``stamp::fake_quant`` / ``stamp::hadamard`` into ATen ops it fuses
    (else they stay extern calls to the reference)."""
    config_patches: Callable[[], dict[str, Any]] | None = None
    """Returns Inductor config patches; default :func:`.cache.inductor_config_patches` tagged
    with the lowering's name (so cached code is never shared between lowerings)."""
    hand_written: bool | None = False
    """Hand-written kernels where they apply (True), the decomposition only (False), or no
    choice at all: every node stays an extern call (None)."""

    def __post_init__(self) -> None:
        if self.config_patches is None:
            object.__setattr__(
                self, "config_patches", functools.partial(inductor_config_patches, self.name)
            )

    def choose(self, node):
        """What runs this ``stamp::`` node (a :class:`.kernel_choice.Choice`), or None."""
        if self.hand_written is None:
            return None
        from .kernel_choice import choose

        return choose(node, hand_written=self.hand_written)

    def compile_fx(self, gm, example_inputs, config_patches: dict[str, Any] | None = None):
        """``compile_fx`` with this lowering's kernel choice, decompositions and patches (what
        the ``stamp`` backend does after its passes); a torch.compile backend for graphs that
        already contain ``stamp::`` ops, as tests and kernel benchmarks build them."""
        from torch._inductor.compile_fx import compile_fx

        from .decompositions import decompositions_active

        self.apply_choices(gm)
        with decompositions_active(self.decomposes):
            return compile_fx(
                gm,
                list(example_inputs),
                config_patches={**self.config_patches(), **(config_patches or {})},
            )

    def apply_choices(self, gm) -> dict[str, int]:
        """Swap every ``stamp::`` node of ``gm`` for the op :meth:`choose` picks; returns how
        many nodes each label got. Swapped nodes keep their meta, with ``meta["stamp_kernel"]``
        set to the label. Nodes that already carry a label were decided (the backend's
        ``select_kernels`` pass runs before :meth:`compile_fx`, which applies the choices again
        for graphs built by hand) and are left alone, so a graph is decided once."""
        counts: dict[str, int] = {}
        graph = gm.graph
        for node in list(graph.nodes):
            if "stamp_kernel" in node.meta:
                continue
            choice = self.choose(node)
            if choice is None:
                continue
            counts[choice.label] = counts.get(choice.label, 0) + 1
            target = node
            if choice.target is not None:
                with graph.inserting_before(node):
                    target = graph.call_function(choice.target, tuple(choice.args))
                target.meta.update(node.meta)
                node.replace_all_uses_with(target)
                graph.erase_node(node)
            target.meta["stamp_kernel"] = choice.label
        if counts:
            graph.lint()
            gm.recompile()
        return counts


LOWERINGS: dict[str, Lowering] = {}


def register_lowering(lowering: Lowering) -> Lowering:
    if lowering.name in LOWERINGS:
        raise ValueError(f"lowering {lowering.name!r} is already registered")
    LOWERINGS[lowering.name] = lowering
    return lowering


def available_lowerings() -> tuple[str, ...]:
    return tuple(sorted(LOWERINGS))


def get_lowering(name: str) -> Lowering:
    try:
        return LOWERINGS[name]
    except KeyError:
        raise ValueError(
            f"lowering: unknown {name!r}; valid lowerings: {', '.join(available_lowerings())}"
        ) from None


register_lowering(
    Lowering(
        "reference",
        "every stamp op runs as an extern call to the PyTorch reference implementation "
        "(debugging; slow)",
        hand_written=None,
    )
)
register_lowering(
    Lowering(
        "inductor",
        "stamp ops decomposed into ATen ops that Inductor fuses (C++ on CPU, Triton on CUDA); "
        "klt and dynamic-length auto-depth sites stay extern calls to the reference",
        decomposes=True,
    )
)
for _name, _what in (
    ("auto", "the default: "),
    ("triton", "same as 'auto': "),
):
    register_lowering(
        Lowering(
            _name,
            _what + "the hand-written Triton kernels (fused Haar fake quant, Hadamard rotation) "
            "for the CUDA sites they take, the 'inductor' decomposition for the rest",
            decomposes=True,
            hand_written=True,
        )
    )
