"""Compile wall time of tiny random models with backend="stamp" versus backend="inductor".

Cold compiles: Dynamo is reset, Inductor's FX graph cache is off and its cache directory is new
for every measurement, so each row is the full cost a first compile pays. Also prints the stamp site summary.

    python -m benchmarks.bench_compile --quick
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from benchmarks.harness import base_parser, emit
from stamp_fx import StampCompiler, StampConfig
from tests import models


def compile_seconds(model, inputs, backend) -> float:
    """Wall time of the first call; a fresh Inductor cache dir makes C++ builds cold too."""
    torch._dynamo.reset()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="stamp_bench_")
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        start = time.perf_counter()
        torch.compile(model, backend=backend)(**inputs)
        return time.perf_counter() - start


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    rows = []
    # Warm Inductor's one-time process start-up so the first row is not charged for it.
    compile_seconds(*models.llama(layers=1), "inductor")
    for name in ("llama", "pixart"):
        model, inputs = models.FACTORIES[name]()
        base = min(compile_seconds(model, inputs, "inductor") for _ in range(repeat))
        stamp = min(
            compile_seconds(model, inputs, StampCompiler(StampConfig(high_tokens=4)))
            for _ in range(repeat)
        )
        eager_stamp = min(
            compile_seconds(
                model, inputs, StampCompiler(StampConfig(high_tokens=4), inductor=False)
            )
            for _ in range(repeat)
        )
        rows.append([name, base, stamp, stamp / base, eager_stamp])
    emit(
        "cold compile time (s), tiny random models",
        ["model", "inductor", "stamp", "stamp / inductor", "stamp, no inductor"],
        rows,
        device=args.device,
        json_path=args.json,
    )


if __name__ == "__main__":
    main()
