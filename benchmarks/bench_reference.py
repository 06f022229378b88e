"""How fast is the reference (the oracle) and how much does STaMP buy on correlated data?

Table 1: forward+inverse time of each sequence transform for [S, D] activations (D = 4096),
next to the identity and a plain copy (the memory-traffic floor), on the chosen device. Table 2: SQNR of plain 4-bit per-token quantization
(A4), identity with the first 64 raw tokens at 8 bits, and STaMP with each transform (64
transformed tokens at 8 bits, rest at 4) on AR(1) data (rho 0.95).

    python benchmarks/bench_reference.py --quick
"""

from __future__ import annotations

import math

import torch

from benchmarks.harness import base_parser, emit, time_ms
from stamp_fx import TokenBits, make_transform, sqnr_db, stamp_fake_quant_ref


def ar1_batch(length: int, features: int, rho: float, seed: int, device: str) -> torch.Tensor:
    """AR(1) along the sequence, unit variance, computed by a scan in float64 (columns independent)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(length, features, generator=gen, dtype=torch.float64)
    # x_t = rho x_{t-1} + sqrt(1-rho^2) e_t, vectorised over features.
    out = torch.empty_like(noise)
    out[0] = noise[0]
    innov = math.sqrt(1 - rho**2)
    for t in range(1, length):
        out[t] = rho * out[t - 1] + innov * noise[t]
    return out.to(device)


def ar1_autocorr(length: int, rho: float) -> torch.Tensor:
    idx = torch.arange(length, dtype=torch.float64)
    return rho ** (idx[:, None] - idx[None, :]).abs()


def grid_for(length: int) -> tuple[int, int]:
    h = 2 ** (int(math.log2(length)) // 2)
    return h, length // h


def build(name: str, length: int, rho: float):
    if name == "haar2d":
        return make_transform("haar2d", grid=grid_for(length))
    if name == "klt":
        return make_transform("klt", autocorr=ar1_autocorr(length, rho))
    return make_transform(name)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rho", type=float, default=0.95)
    args = parser.parse_args()
    lengths = [512, 2048]
    repeat = 3 if args.quick else 10
    names = ["identity", "haar", "haar2d", "dct", "wht", "klt"]

    speed_rows = []
    for length in lengths:
        x = torch.randn(length, args.dim, device=args.device)
        base = time_ms(x.clone, device=args.device, repeat=repeat)
        speed_rows.append([length, args.dim, "copy (x.clone())", base, 1.0])
        for name in names:
            t = build(name, length, args.rho)
            t.inverse(t.forward(x, 0), 0, length=length)  # build caches outside the timing
            ms = time_ms(
                lambda t=t, x=x, n=length: t.inverse(t.forward(x, 0), 0, length=n),
                device=args.device,
                repeat=repeat,
            )
            speed_rows.append([length, args.dim, name, ms, ms / base])
    emit(
        "sequence transform forward+inverse (float32)",
        ["S", "D", "transform", "ms", "x copy"],
        speed_rows,
        device=args.device,
        json_path=None,
    )

    acc_rows = []
    features = 256 if args.quick else 1024
    for length in lengths:
        x = ar1_batch(length, features, args.rho, seed=0, device=args.device).float()
        bits = TokenBits(64, 8, 4)
        avg = bits.average(length)
        acc_rows.append(
            [
                length,
                "A4 per-token RTN",
                4.0,
                sqnr_db(x, stamp_fake_quant_ref(x, transform="identity", bits=4)),
            ]
        )
        acc_rows.append(
            [
                length,
                "identity, first 64 raw tokens at 8",
                avg,
                sqnr_db(x, stamp_fake_quant_ref(x, transform="identity", bits=bits)),
            ]
        )
        for name in names[1:]:
            t = build(name, length, args.rho)
            acc_rows.append(
                [
                    length,
                    f"STaMP {t.describe()}",
                    avg,
                    sqnr_db(x, stamp_fake_quant_ref(x, transform=t, bits=bits)),
                ]
            )
    emit(
        f"SQNR (dB) on AR(1) data, rho={args.rho}, D={features}",
        ["S", "method", "avg bits", "SQNR dB"],
        acc_rows,
        device=args.device,
        json_path=args.json,
        extra={"speed": speed_rows},
    )


if __name__ == "__main__":
    main()
