"""What ``stamp-fx tune`` shows a person: the report table and the plots of a tuning result.

Presentation only (the numbers come from :mod:`stamp_fx.tuning`): sites are listed in depth
order (``layers.2`` before ``layers.10``, :func:`depth_order`), grouped by block with
:func:`layer_and_role`, and the chosen bits are drawn as a layer x role map.
:meth:`~stamp_fx.tuning.TuneResult.report` and :meth:`~stamp_fx.tuning.TuneResult.plot` call
:func:`format_report` and :func:`plot`; matplotlib is imported only when plotting.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: tuning imports this module
    from .tuning import TuneResult

__all__ = ["depth_order", "format_report", "keys_by_depth", "layer_and_role", "plot"]


def format_report(result: TuneResult) -> str:
    """The plain-text table of :meth:`TuneResult.report`: one row per site in depth order
    (chosen bits and option, predicted and measured error), then the budget line."""
    rows = [
        (
            "site", "bits", "high tokens", "low bits", "bound (pred.)", "output err",
            "output SQNR dB", "pred. loss incr.",
        )
    ]  # fmt: skip
    for key in keys_by_depth(result):
        o, s = result.choice[key], result.sites[key]
        rows.append(
            (
                key,
                f"{s.bits[o]:.3f}",
                str(o.high_tokens),
                str(o.low_bits),
                f"{s.bound[o]:.3g}",
                f"{s.error[o]:.3g}",
                f"{s.sqnr_db(o):.1f}",
                f"{s.fisher[o]:.3g}" if o in s.fisher else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(
        f"budget {result.budget:.4f} bits, achieved {result.avg_bits:.4f} (activation-size "
        f"weighted), objective {result.objective}"
    )
    return "\n".join(lines)


def keys_by_depth(result: TuneResult) -> list[str]:
    """Site keys block by block (``layers.2`` before ``layers.10``), in graph order within
    a block, sites outside the blocks last."""
    graph_order = {k: i for i, k in enumerate(result.sites)}

    def key(site: str) -> tuple:
        layer = layer_and_role(site)[0]
        return (layer is None, layer or 0, graph_order.get(site, 0), depth_order(site))

    return sorted(result.choice, key=key)


def plot(result: TuneResult, path_prefix: str) -> list[str]:
    """Two PNGs: the chosen bits as a layer x role map (one row per block, one column per
    site role, sites outside the blocks in a row of their own), and output SQNR per site in
    depth order (``layers.2`` before ``layers.10``), the block boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys_by_depth(result)
    bits = {k: result.sites[k].bits[result.choice[k]] for k in keys}
    layers = sorted({layer_and_role(k)[0] for k in keys}, key=lambda v: (v is None, v or 0))
    roles = list(dict.fromkeys(layer_and_role(k)[1] for k in keys))
    grid = [[float("nan")] * len(roles) for _ in layers]
    for k in keys:
        layer, role = layer_and_role(k)
        grid[layers.index(layer)][roles.index(role)] = bits[k]
    paths = []
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(roles) + 2), max(3, 0.22 * len(layers) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(roles)), roles, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(
        range(len(layers)), ["other" if v is None else str(v) for v in layers], fontsize=7
    )
    ax.set_ylabel("block (layer index)")
    ax.set_title(f"tuned plan at {result.budget:.3f} bits: average bits per site", fontsize=9)
    fig.colorbar(image, ax=ax, label="average bits")
    if len(layers) * len(roles) <= 400:  # small enough to print every value
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                if v == v:  # (not NaN: the site exists)
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.tight_layout()
    paths.append(f"{path_prefix}_bits.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    sqnr = [result.sites[k].sqnr_db(result.choice[k]) for k in keys]
    fig, ax = plt.subplots(figsize=(max(6, len(keys) * 0.06), 3.5))
    ax.bar(range(len(keys)), sqnr)
    starts = [
        i
        for i, k in enumerate(keys)
        if i and layer_and_role(k)[0] != layer_and_role(keys[i - 1])[0]
    ]
    for i in starts:
        ax.axvline(i - 0.5, color="0.8", linewidth=0.5)
    ax.set_xlabel("site, in depth order (grey lines: block boundaries)")
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title(f"tuned plan at {result.budget:.3f} bits: output SQNR per site", fontsize=9)
    fig.tight_layout()
    paths.append(f"{path_prefix}_sqnr.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def depth_order(key: str) -> tuple:
    """Sort key for site keys in model order: numbers compare as numbers, so
    ``layers.2`` comes before ``layers.10``."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)
    )


def layer_and_role(key: str) -> tuple[int | None, str]:
    """``("model.layers.3.self_attn.q_proj:in")`` -> ``(3, "self_attn.q_proj:in")``: the first
    index in the module path (the block) and what follows it (the site's place in the block);
    ``(None, key)`` for a site outside the repeated blocks."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1 :]) or key
    return None, key
