"""Inductor-facing lowering of ``stamp::`` ops (installed as ``stamp_fx.lowering``).

* :mod:`.registry`: the lowerings selectable with ``options={"lowering": name}``
  (``auto``, the default; ``triton``, ``inductor``, ``reference``);
* :mod:`.kernel_choice`: which op runs each ``stamp::`` node under a lowering (the one place
  that decides; applied by the backend's ``select_kernels`` pass);
* :mod:`.cache`: :class:`StampSourcePass`, which keys Inductor's FX graph cache on stamp-fx's
  own source (and the lowering's name) so an upgrade never reuses code compiled against an
  older op, nor one lowering another's;
* :mod:`.decompositions`: ``stamp::fake_quant`` as ATen ops for Inductor to fuse, and their
  installation in Inductor's table; :mod:`.traceable_transforms` the sequence transforms'
  traceable twins it is built on;
* :mod:`.triton_haar`: the hand-written fused Haar kernels' specification, tiling and launcher;
  :mod:`.haar_rows` the ``rows`` kernel (1-D tiles of up to 32 tokens, and haar2d's square
  tiles, whose butterflies and positions are in :mod:`.haar_grid`); :mod:`.haar_slab` the
  ``slab`` kernel (any depth); :mod:`.haar_ops` the ``torch`` ops on them; :mod:`.triton_common`
  their shared device functions; :mod:`.hadamard_kernel` the feature-rotation kernel;
  :mod:`.kernel_analysis` a cache of torch's per-launch analysis of them (all imported lazily:
  they import Triton);
* :mod:`.symbolic`: the few shape questions that need a concrete answer, and their guards.
"""

from .cache import StampSourcePass, inductor_config_patches
from .registry import (
    DEFAULT_LOWERING,
    LOWERINGS,
    Lowering,
    available_lowerings,
    get_lowering,
    register_lowering,
)

__all__ = [
    "DEFAULT_LOWERING",
    "LOWERINGS",
    "Lowering",
    "StampSourcePass",
    "available_lowerings",
    "get_lowering",
    "inductor_config_patches",
    "register_lowering",
]
