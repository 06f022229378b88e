"""Analyse each distinct launch of our Triton kernel once per process, not once per launch.

When a ``triton_op`` launches a user Triton kernel inside ``torch.compile``, torch finds out
which tensor arguments the launch writes (``identify_accessed_tensors`` in
``torch._higher_order_ops.triton_kernel_wrap``, ``identify_mutated_tensors`` before torch
2.12): it generates the kernel's Triton IR and walks it, for the functionalization of every launch and again when Inductor lowers it. That was most
of the extra compile time of ``lowering="triton"`` (a cProfile of a 4-block DiT compile on an
H200: 92 s against Inductor's 11 s), yet a model has hundreds of launches and only a handful of
distinct ones: the answer depends only on the kernel, its compile-time constants and which
arguments are tensors, none of which change between the sites of one model.

:func:`memoize_access_analysis` wraps torch's function(s) with a cache for the kernels it is given
(other kernels pass straight through). The cached answer is torch's own, computed the first
time; a key that cannot be built (an unexpected argument type) also passes straight through.
If torch moves or renames the function, nothing is patched and compiles are just slower.
"""

from __future__ import annotations

import copy
import functools
import threading
from typing import Any

from torch import Tensor

__all__ = ["memoize_access_analysis", "analysis_cache_info"]

_lock = threading.Lock()
_kernels: dict[int, Any] = {}  # id(JITFunction) -> JITFunction (kept alive, ids stay unique)
_cache: dict[tuple, Any] = {}
_stats = {"hits": 0, "misses": 0}


def analysis_cache_info() -> dict[str, int]:
    """Hits, misses and size of the cache (tests and benchmarks read it)."""
    with _lock:
        return {**_stats, "size": len(_cache)}


def _arg_key(value: Any) -> Any:
    if isinstance(value, Tensor) or type(value).__name__ == "TensorBox":
        return ("tensor", str(getattr(value, "dtype", None) or value.get_dtype()))
    if isinstance(value, (bool, int, float, str)) or value is None:
        return ("value", value)
    # A symbolic scalar: the IR is generated with a placeholder value, so only its kind counts.
    return ("scalar", type(value).__name__)


def _key(kernel: Any, kwargs: dict[str, Any], tma_metadata: Any) -> tuple | None:
    if id(kernel) not in _kernels or tma_metadata:
        return None
    # Constant (constexpr) arguments are keyed by value: they select the code. Runtime
    # scalars by value too when they are plain Python numbers, since Triton specialises on
    # some values (1, multiples of 16); that keeps the key conservative.
    return (id(kernel), tuple(sorted((name, _arg_key(v)) for name, v in kwargs.items())))


_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")
"""torch's analysis under its current name (2.12+) and its earlier one (2.11)."""


def memoize_access_analysis(kernel: Any) -> bool:
    """Cache torch's tensor-access analysis for launches of ``kernel`` (a ``JITFunction``).
    Returns whether a cache is installed (False when this torch has no such function)."""
    try:
        from torch._higher_order_ops import triton_kernel_wrap as wrap
    except ImportError:  # pragma: no cover - torch without user-kernel support
        return False
    installed = False
    with _lock:
        _kernels[id(kernel)] = kernel
        for name in _ANALYSES:
            original = getattr(wrap, name, None)
            if original is None:
                continue
            if not getattr(original, "_stamp_memoized", False):
                setattr(wrap, name, _memoized(name, original))
            installed = True
    return installed


def _memoized(name: str, original: Any) -> Any:
    @functools.wraps(original)
    def analysis(kernel, kwargs, tma_descriptor_metadata, *args, **kw):
        try:
            key = _key(kernel, kwargs, tma_descriptor_metadata)
        except Exception:  # an argument we cannot key: ask torch
            key = None
        if key is None or args or kw:
            return original(kernel, kwargs, tma_descriptor_metadata, *args, **kw)
        key = (name, *key)
        with _lock:
            hit = _cache.get(key)
            _stats["hits" if hit is not None else "misses"] += 1
        if hit is None:
            hit = original(kernel, kwargs, tma_descriptor_metadata)
            with _lock:
                _cache[key] = hit
        return copy.deepcopy(hit)  # callers keep it; never share one object

    analysis._stamp_memoized = True
    return analysis
