"""The ``stamp-fx`` command.

``stamp-fx demo``: SmolLM2-135M on English text that ships with CPython (or ``--text FILE``):
float vs 4-bit per-token RTN vs STaMP perplexity, the site summary, and graph dumps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import assets
from .evaluation import BASE_METHODS, average_bits, compile_method, perplexity, token_windows


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    start = time.perf_counter()
    loaded = assets.load_model(args.model)
    text = assets.load_text(args.text)
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[0]
    windows = token_windows(ids, args.window, args.windows)
    print(
        f"model {loaded.name} ({loaded.note}); text {args.text}: {ids.numel()} tokens, "
        f"{len(windows)} windows of {args.window}; loaded in {time.perf_counter() - start:.1f}s\n"
    )
    methods = BASE_METHODS
    rows, stamp_record = [], None
    for method in methods:
        debug = {"debug_dir": str(args.debug_dir)} if method.name == "STaMP haar, 64 at 8" else {}
        extra = {"inductor": False, **debug} if method.options is not None else {}
        model, compiler = compile_method(loaded.model, method, **extra)
        result = perplexity(model, windows, desc=method.name, show_progress=not args.quiet)
        bits = (
            32.0
            if compiler is None
            else average_bits(compiler.last.plan, compiler.last.sites, args.window)
        )
        rows.append((method.name, bits, result.ppl, result.seconds))
        if debug:
            stamp_record = compiler.last
    width = max(len(r[0]) for r in rows)
    print(f"\n{'method'.ljust(width)}  avg act bits  perplexity  seconds")
    for name, bits, ppl, seconds in rows:
        print(f"{name.ljust(width)}  {bits:12.3f}  {ppl:10.2f}  {seconds:7.1f}")
    if stamp_record is not None:
        quantized = len(stamp_record.plan.sites)
        print(
            f"\nSTaMP sites: {quantized} quantized of {len(stamp_record.sites)} (first rows of the table):"
        )
        print("\n".join(stamp_record.site_table().splitlines()[:10]))
        print(f"... full table, plan.json and graph dumps in {stamp_record.debug_dir}")
    print(f"\ntotal {time.perf_counter() - start:.0f}s")
    return 0


def _load_lm(name_or_path: str, gguf_dir: Path | None = None):
    """A registered model name, or a local Hugging Face causal-LM folder."""
    if name_or_path in assets.available_models():
        return assets.load_model(name_or_path, **({"gguf_dir": gguf_dir} if gguf_dir else {}))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path)
    if not path.is_dir():
        raise SystemExit(
            f"--model {name_or_path!r}: not a folder nor one of {', '.join(assets.available_models())}"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return assets.LoadedModel(path.name, model, AutoTokenizer.from_pretrained(path), str(path))


def _tune(args: argparse.Namespace) -> int:
    from .tuning import tune

    loaded = _load_lm(args.model, args.gguf_dir)
    loaded.model.to(args.device)
    ids = (
        loaded.tokenizer(assets.load_text(args.text), return_tensors="pt")
        .input_ids[0]
        .to(args.device)
    )
    # Held-out windows first (the same ones bench_llm_ppl evaluates), calibration after them.
    windows = token_windows(ids, args.window, args.eval_windows + args.calib_windows)
    held_out, calib = windows[: args.eval_windows], windows[args.eval_windows :]
    options = {"transform": args.transform, "feature_transform": args.feature_transform}
    result = tune(
        loaded.model,
        [{"input_ids": w[None]} for w in calib],
        args.avg_bits,
        objective=args.objective,
        high_token_grid=args.high_tokens,
        low_bits_grid=args.low_bits,
        show_progress=not args.quiet,
        **options,
    )
    out = Path(args.out)
    result.plan.save(out)
    (out.parent / (out.stem + "_report.txt")).write_text(result.report() + "\n")
    plots = result.plot(str(out.parent / out.stem))
    print(result.report().splitlines()[-1])
    print(
        f"plan: {out}; report and plots: {out.stem}_report.txt, {', '.join(Path(p).name for p in plots)}"
    )
    if held_out:
        from .evaluation import Method

        rule = _uniform_rule_for(result, options)
        for name, opts in (
            ("tuned plan", {"plan": result.plan}),
            (f"uniform rule ({rule['high_tokens']} tokens at 8)", rule),
        ):
            model, compiler = compile_method(loaded.model, Method(name, opts), inductor=False)
            res = perplexity(model, held_out, desc=name, show_progress=not args.quiet)
            bits = average_bits(compiler.last.plan, compiler.last.sites, args.window)
            print(
                f"{name}: perplexity {res.ppl:.3f} at {bits:.4f} bits on {len(held_out)} held-out windows"
            )
    return 0


def _uniform_rule_for(result, options: dict) -> dict:
    """The paper's uniform rule at the tuned budget: the largest common high_tokens (at the
    config's low_bits) within it."""
    from .tuning import Option

    low = result.plan.meta["config"]["low_bits"]
    grid = sorted({o.high_tokens for s in result.sites.values() for o in s.bits})
    fitting = [h for h in grid if _uniform_average(result, Option(h, low)) <= result.budget + 1e-9]
    return {**options, "high_tokens": max(fitting) if fitting else grid[0]}


def _uniform_average(result, option) -> float:
    total = weight = 0.0
    for s in result.sites.values():
        if option not in s.bits:
            return float("inf")
        total += s.tokens * s.features * s.bits[option]
        weight += s.tokens * s.features
    return total / weight if weight else float("inf")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stamp-fx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="FP vs A4 vs STaMP perplexity on a real model and real text")
    demo.add_argument("--model", default="smollm2-135m", choices=assets.available_models())
    demo.add_argument(
        "--text", default="pydoc", help=f"a file, or one of: {', '.join(assets.available_texts())}"
    )
    demo.add_argument("--window", type=int, default=512, help="tokens per evaluation window")
    demo.add_argument("--windows", type=int, default=4, help="number of windows")
    demo.add_argument("--debug-dir", type=Path, default=Path("stamp_debug/demo"))
    demo.add_argument("--quiet", action="store_true", help="no progress lines")
    demo.set_defaults(run=_demo)
    tn = sub.add_parser("tune", help="per-site bit budgets for a global average, written as a plan")
    tn.add_argument(
        "--model", default="smollm2-135m", help="a registered model or a local HF causal-LM folder"
    )
    tn.add_argument(
        "--text",
        default="wikitext2",
        help=f"a file, or one of: {', '.join(assets.available_texts())}",
    )
    tn.add_argument("--avg-bits", type=float, default=4.25)
    tn.add_argument("--window", type=int, default=2048)
    tn.add_argument("--calib-windows", type=int, default=2)
    tn.add_argument(
        "--eval-windows",
        type=int,
        default=0,
        help="held-out windows: tuned plan vs the uniform rule",
    )
    tn.add_argument("--transform", default="haar")
    tn.add_argument("--feature-transform", default="hadamard", choices=["none", "hadamard"])
    from .tuning import DEFAULT_HIGH_TOKEN_GRID, DEFAULT_OBJECTIVE, OBJECTIVES

    tn.add_argument(
        "--objective",
        default=DEFAULT_OBJECTIVE,
        choices=sorted(OBJECTIVES),
        help="what the budget solver minimises (fisher: predicted loss increase)",
    )
    tn.add_argument(
        "--high-tokens",
        type=_ints,
        default=DEFAULT_HIGH_TOKEN_GRID,
        help="candidate 8-bit token counts per site, comma-separated",
    )
    tn.add_argument(
        "--low-bits",
        type=_ints,
        default=None,
        help="candidate low bit widths per site, comma-separated (default: the config's, 4)",
    )
    tn.add_argument("--quiet", action="store_true", help="no progress lines")
    tn.add_argument("--out", default="stamp_plan.json")
    tn.add_argument("--device", default="cpu")
    tn.add_argument(
        "--gguf-dir",
        type=Path,
        default=None,
        help="folder with the SmolLM2 GGUF (default: the wheel)",
    )
    tn.set_defaults(run=_tune)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
