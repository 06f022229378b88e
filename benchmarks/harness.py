"""Shared benchmark harness: argument parsing, timing, plain tables and JSON with provenance.

Timing: on CUDA ``triton.testing.do_bench`` (median, warm-up excluded); on the CPU the median of
``repeat`` wall-clock runs after ``warmup`` runs. Every JSON carries the git sha, torch/triton
versions, the device and the command line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and few repeats (seconds on a CPU)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def time_ms(fn: Callable[[], object], *, device: str, repeat: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()``.

    On CUDA ``triton.testing.do_bench`` (median; plain launches, no CUDA graphs unless ``fn``
    replays one), its warm-up and repetition windows widened for slow calls (a whole model) so
    the median is over at least ``repeat`` runs after at least ``warmup`` runs."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        once_ms = (time.perf_counter() - start) * 1e3
        return float(
            do_bench(
                fn,
                warmup=max(25.0, warmup * once_ms),
                rep=max(100.0, repeat * once_ms),
                return_mode="median",
            )
        )
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def default_lowering() -> str:
    """The lowering ``torch.compile(model, backend="stamp")`` uses with no options."""
    from stamp_fx import StampCompiler

    return StampCompiler.from_options({}).options.lowering


def provenance(device: str) -> dict[str, object]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        sha = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    )
    return {
        "git_sha": sha or None,
        "torch": torch.__version__,
        "triton": triton_version,
        "device": name,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
    }


def format_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in cells)])


def emit(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    device: str,
    json_path: Path | None,
    extra: dict | None = None,
) -> dict:
    """Print ``title`` and the table; write JSON (with provenance) when ``json_path`` is set."""
    meta = provenance(device)
    print(
        f"## {title}\n{meta['device']} | torch {meta['torch']} | {meta['date']} | `{meta['command']}`\n"
    )
    print(format_table(columns, rows))
    print()
    payload = {
        "title": title,
        "meta": meta,
        "columns": list(columns),
        "rows": [list(r) for r in rows],
        **(extra or {}),
    }
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2, default=str))
    return payload
