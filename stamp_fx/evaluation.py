"""Evaluation helpers: perplexity over non-overlapping windows, and the named method rows that the
demo and the accuracy benchmarks compare.

A *method* is a name plus backend options; ``None`` options mean the float model, uncompiled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .progress import progress

__all__ = [
    "Method",
    "BASE_METHODS",
    "PerplexityResult",
    "average_bits",
    "compile_method",
    "perplexity",
    "token_windows",
]


@dataclass(frozen=True)
class Method:
    name: str
    options: dict[str, Any] | None  # None: the float model
    note: str = ""


# The rows every accuracy table starts from (STAMP.md section 6: "every method keeps its first
# 64 tokens at 8 bit"; A4 RTN is plain 4-bit per-token round-to-nearest).
BASE_METHODS: tuple[Method, ...] = (
    Method("FP", None, "float32, no quantization"),
    Method("A4 RTN", {"transform": "identity", "high_tokens": 0}, "4-bit per-token min-max"),
    Method(
        "A4 + first 64 raw tokens at 8",
        {"transform": "identity", "high_tokens": 64, "sink_tokens": 0},
        "the paper's fair baseline",
    ),
    Method(
        "STaMP haar, 64 at 8",
        {"transform": "haar", "high_tokens": 64},
        "sink_tokens auto (1 for LMs)",
    ),
    Method(
        "STaMP haar, 64 at 8, +Hadamard",
        {"transform": "haar", "high_tokens": 64, "feature_transform": "hadamard"},
        "online block-Hadamard on the features",
    ),
)


def token_windows(
    ids: torch.Tensor, window: int, max_windows: int | None = None
) -> list[torch.Tensor]:
    """Non-overlapping windows of ``window`` tokens from a 1-D id tensor (the tail is dropped)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    return [ids[i * window : (i + 1) * window] for i in range(n)]


@dataclass
class PerplexityResult:
    ppl: float
    tokens: int
    seconds: float
    per_window_nll: list[float] = field(default_factory=list)


@torch.no_grad()
def perplexity(
    model: Any, windows: Sequence[torch.Tensor], *, desc: str = "ppl", show_progress: bool = True
) -> PerplexityResult:
    """exp(mean next-token NLL) over all windows, each evaluated alone at batch size 1."""
    total_nll, total_tokens, per_window = 0.0, 0, []
    start = time.perf_counter()
    for w in progress(windows, desc=desc, enabled=show_progress):
        logits = model(input_ids=w.unsqueeze(0)).logits[0, :-1].double()
        nll = F.cross_entropy(logits, w[1:], reduction="sum").item()
        per_window.append(nll / (w.numel() - 1))
        total_nll += nll
        total_tokens += w.numel() - 1
    return PerplexityResult(
        math.exp(total_nll / total_tokens), total_tokens, time.perf_counter() - start, per_window
    )


def compile_method(model: torch.nn.Module, method: Method, **extra_options: Any) -> tuple[Any, Any]:
    """(callable, StampCompiler or None) for a method; Dynamo is reset so methods never share
    compiled code. ``extra_options`` (e.g. ``inductor=False``, ``debug_dir=``) are merged in."""
    if method.options is None:
        return model, None
    from .backend import StampCompiler

    torch._dynamo.reset()
    compiler = StampCompiler.from_options({**method.options, **extra_options})
    return torch.compile(model, backend=compiler, dynamic=False), compiler


def average_bits(plan: Any, sites: Sequence[Any], length: int) -> float:
    """Activation-size-weighted average bits over the planned sites for ``length`` tokens
    (each site weighted by its feature count; unquantized sites are left out)."""
    total = weight = 0.0
    for site in sites:
        policy = plan.sites.get(site.key)
        if policy is None or not site.features:
            continue
        bits = policy.bit_vector(policy.make_transform(plan.tensors), length)
        total += site.features * sum(bits) / len(bits)
        weight += site.features
    return total / weight if weight else float("nan")
