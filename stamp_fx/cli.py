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
    methods = [m for m in BASE_METHODS if args.all or m.name != "STaMP haar, 64 at 8, +Hadamard"]
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
    demo.add_argument("--all", action="store_true", help="also the +Hadamard row")
    demo.add_argument("--quiet", action="store_true", help="no progress lines")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
