"""Lowerings of ``stamp::`` ops for Inductor, in a name registry (``options={"kernel": name}``).

A :class:`Lowering` contributes a decomposition table (merged over Inductor's default one) and
Inductor config patches. Both are zero-argument callables, called when a graph is compiled, so
importing the registry never imports Triton (the Triton kernels' tests need to choose the
interpreter before that import).

* ``reference`` keeps ``stamp::fake_quant`` as an opaque call to the pure-PyTorch reference
  (correct everywhere, not fast);
* ``inductor`` decomposes it into ATen ops that Inductor fuses (:mod:`.decompositions`);
* ``triton`` sends the default Haar case on CUDA to the hand-written fused kernel
  (:mod:`.triton_haar`; a pre-grad graph pass swaps those sites to the ``stamp::haar_fake_quant``
  triton_op before AOTAutograd traces the graph) and everything else to the ``inductor``
  decomposition.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .cache import inductor_config_patches

__all__ = ["Lowering", "LOWERINGS", "register_lowering", "get_lowering", "available_lowerings"]


@dataclass(frozen=True)
class Lowering:
    name: str
    description: str
    decompositions: Callable[[], dict[Any, Callable]] = dict
    """Returns ``{op overload: decomposition}`` merged over ``select_decomp_table()``."""
    config_patches: Callable[[], dict[str, Any]] | None = None
    """Returns Inductor config patches; default :func:`.cache.inductor_config_patches` tagged
    with the lowering's name (so cached code is never shared between lowerings)."""

    def __post_init__(self) -> None:
        if self.config_patches is None:
            object.__setattr__(
                self, "config_patches", functools.partial(inductor_config_patches, self.name)
            )

    def compile_fx(self, gm, example_inputs, config_patches: dict[str, Any] | None = None):
        """``compile_fx`` with this lowering's decompositions and patches (what the ``stamp``
        backend does after its passes); a torch.compile backend for graphs that already
        contain ``stamp::`` ops, as tests and kernel benchmarks build them."""
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table

        extra = self.decompositions()
        return compile_fx(
            gm,
            list(example_inputs),
            config_patches={**self.config_patches(), **(config_patches or {})},
            decompositions={**select_decomp_table(), **extra} if extra else None,
        )


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
            f"kernel: unknown {name!r}; valid kernels: {', '.join(available_lowerings())}"
        ) from None


register_lowering(
    Lowering(
        "reference",
        "stamp::fake_quant runs as an extern call to the PyTorch reference implementation",
    )
)


def _inductor_decompositions() -> dict[Any, Callable]:
    from .decompositions import decomposition_table

    return decomposition_table()


def _triton_config_patches() -> dict[str, Any]:
    from .triton_haar import routing_config_patches

    return {**inductor_config_patches("triton"), **routing_config_patches()}


register_lowering(
    Lowering(
        "inductor",
        "stamp::fake_quant decomposed into ATen ops that Inductor fuses (C++ on CPU, Triton on "
        "CUDA); klt stays an extern call to the reference",
        decompositions=_inductor_decompositions,
    )
)

register_lowering(
    Lowering(
        "triton",
        "the hand-written fused Haar fake-quant Triton kernel for eligible CUDA sites, the "
        "'inductor' decomposition for the rest",
        decompositions=_inductor_decompositions,
        config_patches=_triton_config_patches,
    )
)
