"""Weight quantization (RTN with MSE clip search, GPTQ) alone and under STaMP activations.

SmolLM2-135M: WikiText-2 test perplexity over ``--windows`` non-overlapping windows of
``--window`` tokens; GPTQ calibrates on the ``--calib-windows`` windows that follow them (never on
evaluated text). SmolLM2's weights are stored Q4_1 (4-bit, blocks of 32) in its only available
file, so they already sit on a 4-bit grid: its W4 rows are FLATTERING. MiniLM (all-MiniLM-L6-v2,
real fp32 weights) carries the weight-quantization claims: hidden-state SQNR and mean-pooled
embedding cosine versus the float model. Activations are quantized through
``torch.compile(backend="stamp")`` without Inductor (the reference numerics); weights once, by
``stamp_fx.quantize_weights``, before compiling.

    python -m benchmarks.bench_weights --quick                 # smoke run: ~1-2 min on 2 cores
    python -m benchmarks.bench_weights --model smollm2         # 4 x 512 tokens, a few minutes
    python -m benchmarks.bench_weights --model minilm
"""

from __future__ import annotations

import copy
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import base_parser, emit
from stamp_fx import assets, quantize_weights, sqnr_db
from stamp_fx.evaluation import Method, average_bits, compile_method, perplexity, token_windows

STAMP = {
    "default": Method(
        "STaMP", {}, "the backend's defaults: haar, 64 tokens at 8, rest 4, sinks auto"
    ),
    "hadamard": Method(
        "STaMP+H", {"feature_transform": "hadamard"}, "the defaults plus the online block-Hadamard"
    ),
}


def _weights(model, spec, calib):
    """A deep copy of ``model`` with weights quantized by ``spec`` (None: float), and seconds."""
    m = copy.deepcopy(model)
    if spec is None:
        return m, 0.0, None
    start = time.perf_counter()
    wplan = quantize_weights(
        m,
        method=spec["method"],
        bits=spec["bits"],
        group_size=spec["group"],
        batches=calib if spec["method"] == "gptq" else None,
        show_progress=False,
    )
    return m, time.perf_counter() - start, wplan


def _wname(spec) -> str:
    if spec is None:
        return "W16"
    g = f"g{spec['group']}" if spec["group"] else "per-ch"
    return f"W{spec['bits']} {spec['method'].upper()} {g}"


def smollm2(args) -> list[list[object]]:
    loaded = assets.load_model("smollm2-135m")
    text = assets.load_text("wikitext2")
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[0]
    windows = token_windows(ids, args.window, args.windows + args.calib_windows)
    evals, calib = windows[: args.windows], windows[args.windows :]
    calib_batches = [{"input_ids": w.unsqueeze(0)} for w in calib]
    g = args.smollm2_group
    specs = [
        None,
        {"method": "rtn", "bits": 4, "group": g},
        {"method": "gptq", "bits": 4, "group": g},
        {"method": "rtn", "bits": 4, "group": None},
        {"method": "gptq", "bits": 4, "group": None},
    ]
    if args.quick:  # GPTQ over SmolLM2's 210 linears is a minute or more on 2 cores
        specs = specs[:2]
    if args.stamp_only:
        specs = specs[:3]
    rows, base = [], None
    for spec in specs:
        wmodel, wsec, _ = _weights(loaded.model, spec, calib_batches)
        stamp = STAMP[args.stamp]
        acts = [None, stamp] if spec is None or spec["group"] == g else [None]
        if args.stamp_only:
            acts = [None, stamp] if spec is None else [stamp]
        for act in acts:
            method = act or Method("A16", None)
            model, compiler = compile_method(wmodel, method, inductor=False)
            res = perplexity(model, evals, show_progress=False)
            bits = (
                16.0
                if compiler is None
                else average_bits(compiler.last.plan, compiler.last.sites, args.window)
            )
            base = res.ppl if base is None else base
            flat = "flattering (Q4_1 source grid)" if spec is not None else ""
            name = f"{_wname(spec)} A{'16' if act is None else f'{bits:.3f} {act.name}'}"
            rows.append(
                [name, round(base, 3), round(res.ppl, 3), f"{100 * (res.ppl / base - 1):+.1f}%",
                 round(wsec, 1), flat]
            )  # fmt: skip
            print(f"  {name}: ppl {res.ppl:.3f} (weights {wsec:.1f} s)", file=sys.stderr)
    emit(
        f"SmolLM2-135M WikiText-2 perplexity, {len(evals)} x {args.window} tokens "
        f"(GPTQ calibrated on the next {len(calib)} windows)",
        ["method", "W16A16 ppl (baseline)", "ppl", "vs W16A16", "weight quant s", "note"],
        rows,
        device="cpu",
        json_path=args.json.with_name(args.json.stem + "_smollm2.json") if args.json else None,
    )
    return rows


def minilm(args) -> list[list[object]]:
    loaded = assets.load_model("all-minilm-l6-v2")
    text = assets.load_text("wikitext2")
    tok = loaded.tokenizer
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = args.minilm_windows + args.calib_windows
    pieces = [
        torch.cat([torch.tensor([tok.cls_token_id]), w, torch.tensor([tok.sep_token_id])])
        for w in token_windows(ids, args.minilm_window - 2, n)
    ]
    inputs = [
        {"input_ids": p[None], "attention_mask": torch.ones(1, p.numel(), dtype=torch.long)}
        for p in pieces
    ]
    evals, calib = inputs[: args.minilm_windows], inputs[args.minilm_windows :]
    with torch.no_grad():
        reference = [loaded.model(**x).last_hidden_state for x in evals]
    ref_emb = [F.normalize(h.mean(1), dim=-1) for h in reference]
    specs = [
        {"method": "rtn", "bits": 4, "group": 128},
        {"method": "gptq", "bits": 4, "group": 128},
        {"method": "rtn", "bits": 4, "group": None},
        {"method": "gptq", "bits": 4, "group": None},
        {"method": "rtn", "bits": 8, "group": None},
    ]
    if args.quick:
        specs = specs[:2]
    rows = []
    for spec in specs:
        model, wsec, _ = _weights(loaded.model, spec, calib)
        with torch.no_grad():
            outs = [model(**x).last_hidden_state for x in evals]
        sq = sum(sqnr_db(r, o) for r, o in zip(reference, outs)) / len(outs)
        cos = sum(
            float((F.normalize(o.mean(1), dim=-1) * e).sum()) for o, e in zip(outs, ref_emb)
        ) / len(outs)
        rows.append(
            [f"{_wname(spec)} A16", "inf (fp32)", round(sq, 2), round(cos, 5), round(wsec, 1)]
        )
        print(f"  {_wname(spec)}: SQNR {sq:.2f} dB, cosine {cos:.5f}", file=sys.stderr)
    emit(
        f"all-MiniLM-L6-v2 (real fp32 weights), weights only, {len(evals)} x {args.minilm_window} "
        f"tokens of WikiText-2 (GPTQ calibrated on the next {len(calib)})",
        [
            "method",
            "baseline SQNR dB",
            "hidden-state SQNR dB",
            "embedding cosine",
            "weight quant s",
        ],
        rows,
        device="cpu",
        json_path=args.json.with_name(args.json.stem + "_minilm.json") if args.json else None,
    )
    return rows


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "minilm", "both"), default="both")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument(
        "--smollm2-group", type=int, default=64, help="576 features: 128 does not divide them"
    )
    parser.add_argument("--minilm-window", type=int, default=256)
    parser.add_argument("--minilm-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--stamp",
        choices=tuple(STAMP),
        default="default",
        help="activation setting of the STaMP rows (hadamard: + online block-Hadamard)",
    )
    parser.add_argument(
        "--stamp-only",
        action="store_true",
        help="SmolLM2: only W16A16 and the STaMP rows of W16 / W4 RTN / W4 GPTQ (grouped)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.window, args.windows, args.calib_windows = 128, 1, 1
        args.minilm_window, args.minilm_windows = 128, 2
    if args.model in ("minilm", "both"):
        minilm(args)
    if args.model in ("smollm2", "both"):
        smollm2(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
