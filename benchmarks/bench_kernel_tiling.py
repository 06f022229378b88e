"""Which tiling of the fused Haar kernels is fastest? (kernel x features per program x warps x
schedule)

For each [1, S, D] bf16 activation, times ``lowering/triton_haar.haar_fake_quant`` (default
site policy: Haar, auto levels, 64 tokens at 8 bits, the rest at 4) for every combination of
``--variants`` (the ``rows`` and ``slab`` kernels; rows only takes tiles of up to 32 tokens),
``--block-d`` (features per program), ``--warps`` and ``--schedules``, next to a
device-to-device copy of the same tensor in the same run, and checks each output against the
default's (all must agree bit for bit). ``--grid HxW`` times the haar2d site of an ``H x W`` token
grid instead (no sinks; the rows kernel only; every shape must hold ``H*W`` tokens). CUDA only.

    python -m benchmarks.bench_kernel_tiling --json tiling.json
    python -m benchmarks.bench_kernel_tiling --grid 64x64 --shapes 4096x1152 --variants rows
"""

from __future__ import annotations

import torch

from benchmarks.bench_kernels import graph_time_ms
from benchmarks.harness import base_parser, emit


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["2048x4096", "8192x8192"])
    parser.add_argument("--block-d", type=int, nargs="*", default=[128, 256, 512, 1024])
    parser.add_argument("--warps", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--schedules", nargs="*", default=["fused", "split"])
    parser.add_argument("--variants", nargs="*", default=["rows", "slab"])
    parser.add_argument("--grid", default=None, help="HxW: time haar2d on this token grid")
    args = parser.parse_args()
    grid = tuple(int(v) for v in args.grid.split("x")) if args.grid else None
    if not args.device.startswith("cuda"):
        raise SystemExit("bench_kernel_tiling times the compiled kernel: it needs a CUDA device")
    from stamp_fx.lowering import triton_haar

    rows = []
    for shape in args.shapes:
        seq, dim = (int(v) for v in shape.split("x"))
        x = torch.randn(1, seq, dim, device=args.device).to(torch.bfloat16)
        y = torch.empty_like(x)
        nbytes = 2 * x.numel() * x.element_size()
        copy_ms, _ = graph_time_ms(lambda x=x, y=y: y.copy_(x), device=args.device, repeat=20)
        copy_gbs = nbytes / copy_ms / 1e6
        rows.append([seq, dim, "copy", "", "", "", copy_ms, copy_gbs, 100.0, ""])
        if grid is not None and grid[0] * grid[1] != seq:
            raise SystemExit(f"--grid {args.grid} holds {grid[0] * grid[1]} tokens, not {seq}")
        default = triton_haar.haar_fake_quant(x, -1, grid=grid)
        combos = [
            (variant, schedule, block_d, warps)
            for variant in args.variants
            for schedule in args.schedules
            for block_d in [None, *args.block_d]
            for warps in args.warps
        ]
        for variant, schedule, block_d, warps in combos:

            def run(x=x, variant=variant, block_d=block_d, warps=warps, schedule=schedule):
                return triton_haar.haar_fake_quant(
                    x,
                    -1,
                    block_d=block_d,
                    num_warps=warps,
                    schedule=schedule,
                    variant=variant,
                    grid=grid,
                )

            key = [seq, dim, variant, schedule, block_d or "default", warps]
            try:
                same = torch.equal(run(), default)
                ms, _ = graph_time_ms(run, device=args.device, repeat=20)
            except Exception as err:  # a tiling the kernel or compiler rejects
                rows.append([*key, "n/a", "", "", str(err)[:50]])
                continue
            gbs = nbytes / ms / 1e6
            rows.append([*key, ms, gbs, 100 * gbs / copy_gbs, "yes" if same else "NO"])
        del x, y
    emit(
        "fused Haar kernel tilings, bf16 [1, S, D], default policy"
        + (f", haar2d on a {args.grid} grid" if grid else ""),
        ["S", "D", "kernel", "schedule", "block_d", "warps", "ms", "GB/s", "copy %", "same output"],
        rows,
        device=args.device,
        json_path=args.json,
    )


if __name__ == "__main__":
    main()
