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
    """A post-grad pass that changes nothing; its uuid ties cached code to stamp-fx's source
    and to the lowering (``tag``) that produced it."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> Any:
        return f"{source_hash()}:{self.tag}"


def inductor_config_patches(tag: str = "") -> dict[str, Any]:
    """Config patches every stamp compile adds to ``compile_fx`` (``tag``: the lowering name)."""
    return {"post_grad_custom_post_pass": StampSourcePass(tag)}
