"""A dependency-free progress line for long calibration and sensitivity runs (stderr)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """Yield ``items`` while printing ``desc: i/total  elapsed  eta``: in place on a terminal,
    otherwise about every 10% (so logs stay short)."""
    stream = stream or sys.stderr
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    tty = enabled and getattr(stream, "isatty", lambda: False)()
    step = max(1, (total or 10) // 10)
    start = time.perf_counter()
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        if not enabled:
            continue
        elapsed = time.perf_counter() - start
        if tty or i % step == 0 or i == total:
            eta = f"  eta {elapsed / i * (total - i):.0f}s" if total else ""
            of = f"/{total}" if total else ""
            end = "\r" if tty and i != total else "\n"
            stream.write(f"{desc}: {i}{of}  {elapsed:.1f}s{eta}{end}")
            stream.flush()
