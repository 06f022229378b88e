"""Inductor-facing lowering of ``stamp::`` ops (installed as ``stamp_fx.lowering``).

* :mod:`.registry`: the lowerings selectable with ``options={"kernel": name}``;
* :mod:`.cache`: :class:`StampSourcePass`, which keys Inductor's FX graph cache on stamp-fx's
  own source so an upgrade never reuses code compiled against an older op.
"""

from .cache import StampSourcePass, inductor_config_patches
from .registry import LOWERINGS, Lowering, available_lowerings, get_lowering, register_lowering

__all__ = [
    "LOWERINGS",
    "Lowering",
    "StampSourcePass",
    "available_lowerings",
    "get_lowering",
    "inductor_config_patches",
    "register_lowering",
]
