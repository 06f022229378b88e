"""Keep Inductor's FX graph cache honest about stamp-fx's code.

The cache key covers the graph and Inductor's config but not the Python behind a custom op's
fake or real implementation. A ``CustomGraphPass`` installed as ``post_grad_custom_post_pass``
contributes its ``uuid()`` to the key; ours hashes every source file of the installed package,
so changing stamp-fx invalidates cached code while an unchanged one still hits the cache.

The uuid also names the lowering. AOTAutograd's cache keys the graph *before* decompositions
(and the decomposition table is not part of any key), so without the name a graph compiled with
one lowering would be served, from cache, to a compile that asked for another.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass


@functools.cache
def source_hash() -> str:
    """SHA-256 over the package's .py files (the library and this lowering package)."""
    import stamp_fx

    digest = hashlib.sha256()
    roots = {Path(stamp_fx.__file__).resolve().parent, Path(__file__).resolve().parent}
    for root in sorted(roots):
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


class StampSourcePass(CustomGraphPass):
    """A post-grad pass that changes nothing itself; its uuid ties cached code to stamp-fx's
    source and to the lowering (``tag``) that produced it. ``then``: a user's own
    ``post_grad_custom_post_pass`` (a ``CustomGraphPass``), run after it and part of the uuid,
    so installing ours never drops theirs."""

    def __init__(self, tag: str = "", then: CustomGraphPass | None = None) -> None:
        self.tag = tag
        self.then = then

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.then is not None:
            self.then(graph)

    def uuid(self) -> Any:
        theirs = self.then.uuid() if self.then is not None else None
        return (
            f"{source_hash()}:{self.tag}"
            if theirs is None
            else (f"{source_hash()}:{self.tag}", theirs)
        )


def inductor_config_patches(tag: str = "") -> dict[str, Any]:
    """Config patches every stamp compile adds to ``compile_fx`` (``tag``: the lowering name).

    A user's ``post_grad_custom_post_pass`` is chained, not replaced: a ``CustomGraphPass``
    runs inside ours (and keys the cache with ours); a plain callable, which Inductor's cache
    cannot key, is kept as it is (Inductor then bypasses the FX graph cache, as it would for
    that callable alone) and ours, a no-op without caching, is left out.

    ``emulate_precision_casts``: the reference rounds to the activation's dtype between the
    steps of a site (rotation, fake quant, rotation back), and a quantizer's codes depend on
    that rounding. Inductor by default drops a downcast-upcast pair inside a fused kernel,
    which moves a bf16 site's inputs off the reference by one rounding and flips codes at
    ties (measured: one quantization step on a bf16 rotated site); with it, every cast rounds.
    """
    from torch._inductor import config

    patches: dict[str, Any] = {"emulate_precision_casts": True}
    theirs = config.post_grad_custom_post_pass
    if theirs is None or isinstance(theirs, CustomGraphPass):
        patches["post_grad_custom_post_pass"] = StampSourcePass(tag, then=theirs)
    return patches
