"""Inductor-facing lowering of ``stamp::`` ops (installed as ``stamp_fx.lowering``).

Today: :class:`~stamp_fx.lowering.cache.StampSourcePass`, which keys Inductor's FX graph cache
on stamp-fx's own source so an upgrade never reuses code compiled against an older op.
Decompositions into fused kernels follow with the lowering issue.
"""

from .cache import StampSourcePass, inductor_config_patches

__all__ = ["StampSourcePass", "inductor_config_patches"]
