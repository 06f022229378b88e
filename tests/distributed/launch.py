"""Run a function on N gloo CPU ranks (torch.multiprocessing spawn), with a hard timeout.

``run_ranks(fn, world, tmp_path, *args)`` spawns ``world`` processes that join a gloo group on a
free localhost port, call ``fn(rank, world, *args)`` and save what it returns to
``tmp_path/rank<i>.pt``; it returns the list of those results. A rank that raises fails the
test with its traceback; ranks still running after ``timeout`` seconds (a collective that hangs)
are killed, so a hang cannot block CI.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args):
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks share the machine's cores
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip  (transformers' tp_plan loader reads these)
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.save({"ok": fn(rank, world, *args)}, path)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_path, *args, timeout: float = DEFAULT_TIMEOUT_S) -> list:
    ctx = mp.start_processes(
        _entry, args=(world, free_port(), str(tmp_path), fn, args), nprocs=world,
        join=False, start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks still running after {timeout:.0f} s")
    except mp.ProcessRaisedException:
        pass  # the rank's traceback is in its result file, reported below
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = []
    for rank in range(world):
        path = Path(tmp_path) / f"rank{rank}.pt"
        if not path.exists():
            raise RuntimeError(f"rank {rank} wrote no result (killed or crashed)")
        got = torch.load(path, weights_only=False)
        if "error" in got:
            raise RuntimeError(f"rank {rank} failed:\n{got['error']}")
        results.append(got["ok"])
    return results
