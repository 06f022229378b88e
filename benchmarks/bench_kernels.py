"""How close to memory speed is one STaMP node? (eager reference, Inductor decomposition, kernel)

The node alone, ``stamp::fake_quant`` on a [1, S, D] activation (bf16 by default) with the
default site policy (Haar along the sequence, auto levels, the first 64 transformed tokens at 8
bits, the rest at 4; ``--sinks`` sink tokens), for S in {1024, 2048, 4096, 8192} x D in
{2048, 4096, 8192}. Three implementations:

* ``eager``: the reference (``SitePolicy.apply``, what the ``reference`` lowering calls);
* ``inductor``: the ``inductor`` lowering's decomposition compiled by Inductor;
* ``kernel``: the hand-written fused Triton kernel (``stamp::haar_fake_quant``; the ``rows``
  kernel for tiles of up to 32 tokens, else the ``slab`` one), CUDA only (or the Triton
  interpreter with TRITON_INTERPRET=1, which is not a speed measurement);
* ``kernel-slab``: the ``slab`` kernel everywhere (the previous design, for comparison);
* ``kernel-split`` / ``kernel-fused`` (opt-in with ``--methods``): the default kernel forced
  to its two-launch ``split`` schedule (statistics, apply: the activation is read twice) or
  its one-launch ``fused`` one.

``--rotation`` adds, for every lowering in ``--lowerings`` (default: the library's default
lowering, the one ``backend="stamp"`` uses with no options, and ``inductor``), the whole site as
the backend emits it, compiled by that lowering's ``compile_fx``: ``site[<lowering>]`` is
``stamp::fake_quant`` alone and ``site+H[<lowering>]`` the site with the online feature rotation,
``hadamard(fake_quant(hadamard(x, b)), b)`` with ``b = feature_block_size(D)`` (the largest power
of two dividing D); its reference is ``SitePolicy(feature_transform="hadamard", ...).apply``.
Both move the same minimum traffic (one read, one write), so their copy % compare directly.

Each row: median time, effective bandwidth ``2 * S * D * itemsize / time`` (one read plus one
write, the minimum traffic) and that bandwidth as a percentage of the device-to-device copy
bandwidth measured for the same tensor in the same run (``copy %``) and of the best copy
bandwidth over all sizes (``peak %``). ``exact`` says whether the output equals the reference
bit for bit; ``timed`` says whether the time is a CUDA-graph replay (device time; the kernel
and the compiled node) or eager launches (the reference, which synchronises with the host).
Target (issue): kernel >= 80 % of copy bandwidth for S >= 2048, D >= 4096.

    python -m benchmarks.bench_kernels --quick            # seconds on a CPU
    python -m benchmarks.bench_kernels --quick --rotation --methods   # sites with/without H
    python -m benchmarks.bench_kernels --json out.json    # the full grid on a GPU
"""

from __future__ import annotations

from dataclasses import replace

import torch
from stamp_fx.lowering import get_lowering

from benchmarks.harness import base_parser, default_lowering, emit, time_ms
from stamp_fx import SitePolicy
from stamp_fx.ops import op_args
from stamp_fx.transforms import feature_block_size

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def graph_time_ms(fn, *, device: str, repeat: int) -> tuple[float, str]:
    """Median ms of ``fn()`` replayed from a CUDA graph (device time without Python launch
    overhead, which would otherwise dominate a ~10 us kernel), else plain :func:`time_ms`."""
    if device.startswith("cuda"):
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            return time_ms(graph.replay, device=device, repeat=repeat), "graph"
        except Exception:  # not capturable (host syncs): time the eager launches
            torch.cuda.synchronize()
    return time_ms(fn, device=device, repeat=repeat), "eager"


def compiled_node(policy: SitePolicy, lowering: str, device: str):
    """The node compiled alone with ``lowering`` (a fresh Dynamo cache per shape)."""
    torch._dynamo.reset()
    low = get_lowering(lowering)

    def node(x):
        return torch.ops.stamp.fake_quant(x, *op_args(policy, 1), None)

    return torch.compile(node, backend=low.compile_fx)


def compiled_site(policy: SitePolicy, lowering: str, *, rotation: bool):
    """The site as the backend emits it, compiled alone with ``lowering``: ``stamp::fake_quant``,
    between two ``stamp::hadamard`` feature rotations when ``rotation`` (a fresh Dynamo cache)."""
    torch._dynamo.reset()
    low = get_lowering(lowering)
    args = op_args(policy, 1)

    def site(x):
        if not rotation:
            return torch.ops.stamp.fake_quant(x, *args, None)
        block = feature_block_size(x.shape[-1])
        rotated = torch.ops.stamp.hadamard(x, block)
        return torch.ops.stamp.hadamard(torch.ops.stamp.fake_quant(rotated, *args, None), block)

    return torch.compile(site, backend=low.compile_fx)


def kernel_fn(policy: SitePolicy, device: str, schedule: str = "auto", variant: str = "auto"):
    """The hand-written kernel (``schedule``, ``variant``: see lowering/triton_haar.py), or
    None where it cannot run (CPU without the interpreter)."""
    try:
        from stamp_fx.lowering import haar_ops, triton_haar  # noqa: F401 (haar_ops: the ops)
    except ImportError:
        return None
    if device == "cpu" and not triton_haar.interpreted():
        return None

    if schedule != "auto" or variant != "auto":

        def scheduled(x):
            return triton_haar.haar_fake_quant(
                x, -1, policy.sink_tokens, policy.high_tokens, policy.high_bits,
                policy.low_bits, policy.symmetric, schedule=schedule, variant=variant,
            )  # fmt: skip

        return scheduled

    def run(x):
        return torch.ops.stamp.haar_fake_quant(
            x, -1, policy.sink_tokens, policy.high_tokens, policy.high_bits, policy.low_bits,
            policy.symmetric, -1 if policy.depth_target is None else policy.depth_target,
        )  # fmt: skip

    return run


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--sinks", type=int, default=0)
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--dims", type=int, nargs="*", default=None)
    parser.add_argument(
        "--methods", nargs="*", default=["eager", "inductor", "kernel-slab", "kernel"],
        choices=["eager", "inductor", "kernel", "kernel-slab", "kernel-split", "kernel-fused"],
    )  # fmt: skip
    parser.add_argument(
        "--rotation", action="store_true",
        help="also time the whole site without and with the feature rotation per lowering",
    )  # fmt: skip
    parser.add_argument(
        "--lowerings", nargs="*", default=None,
        help="lowerings for --rotation; 'default' is the library's default (default: default inductor)",
    )  # fmt: skip
    args = parser.parse_args()
    lowerings = args.lowerings or ["default", "inductor"]
    lowerings = list(dict.fromkeys(default_lowering() if n == "default" else n for n in lowerings))
    if args.quick and args.device == "cpu":
        torch.set_num_threads(1)  # a shared two-core machine: no OpenMP spinning in the timings
    dtype = DTYPES[args.dtype]
    lengths = args.lengths or ([64, 200] if args.quick else [1024, 2048, 4096, 8192])
    dims = args.dims or ([32, 64] if args.quick else [2048, 4096, 8192])
    repeat = 3 if args.quick else 10
    policy = SitePolicy(sink_tokens=args.sinks, high_tokens=max(64, args.sinks))
    rotated = replace(policy, feature_transform="hadamard")

    def eager(x):
        return policy.apply(x, 1)

    rows, copies = [], {}
    for seq in lengths:
        for dim in dims:
            x = torch.randn(1, seq, dim, device=args.device).to(dtype)
            y = torch.empty_like(x)
            nbytes = 2 * x.numel() * x.element_size()
            copy_ms, _ = graph_time_ms(
                lambda x=x, y=y: y.copy_(x), device=args.device, repeat=repeat
            )
            copies[(seq, dim)] = nbytes / copy_ms / 1e6
            refs = {False: policy.apply(x, 1)}
            makers = {
                "eager": lambda: eager,
                "inductor": lambda: compiled_node(policy, "inductor", args.device),
                "kernel": lambda: kernel_fn(policy, args.device),
                "kernel-slab": lambda: kernel_fn(policy, args.device, variant="slab"),
                "kernel-split": lambda: kernel_fn(policy, args.device, "split"),
                "kernel-fused": lambda: kernel_fn(policy, args.device, "fused"),
            }
            methods = [(m, False) for m in args.methods]
            if args.rotation:
                refs[True] = rotated.apply(x, 1)
                for low in lowerings:
                    for rot in (False, True):
                        name = f"site{'+H' if rot else ''}[{low}]"
                        makers[name] = lambda low=low, rot=rot: compiled_site(
                            policy, low, rotation=rot
                        )
                        methods.append((name, rot))
            for method, rot in methods:
                fn = makers[method]()
                ref = refs[rot]
                if fn is None:
                    rows.append([seq, dim, method, "n/a", "", "", "", "needs CUDA", ""])
                    continue
                out = fn(x)  # compile / warm up outside the timing
                ms, how = graph_time_ms(lambda fn=fn, x=x: fn(x), device=args.device, repeat=repeat)
                gbs = nbytes / ms / 1e6
                rows.append(
                    [seq, dim, method, ms, gbs, 100 * gbs / copies[(seq, dim)], None,
                     "yes" if torch.equal(out, ref) else f"max|d|={(out.float() - ref.float()).abs().max().item():.2g}",
                     how]
                )  # fmt: skip
                print(rows[-1], flush=True)  # a run cut short by a time limit keeps its rows
            del x, y, refs
    peak = max(copies.values())
    for row in rows:
        if isinstance(row[4], float):
            row[6] = 100 * row[4] / peak
    levels = [policy.make_transform().levels_for(s - args.sinks) for s in lengths]
    site = f"; site rows: lowerings {lowerings}, H = block-Hadamard" if args.rotation else ""
    emit(
        f"STaMP node alone, {args.dtype} [1, S, D], haar J={levels} for S={lengths}, "
        f"64 tokens at 8 bit, sinks={args.sinks}; copy peak {peak:.0f} GB/s{site}",
        ["S", "D", "method", "ms", "GB/s", "copy %", "peak %", "exact", "timed"],
        rows,
        device=args.device,
        json_path=args.json,
        extra={"copy_gbs": {f"{s}x{d}": v for (s, d), v in copies.items()}},
    )


if __name__ == "__main__":
    main()
