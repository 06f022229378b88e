"""all-MiniLM-L6-v2 (real fp32 weights) under STaMP: SQNR of the final hidden states and cosine
similarity of mean-pooled sentence embeddings versus the float model, per method.

Inputs are WikiText-2 test passages (or ``--text``) cut into ``--window``-token pieces, one per
forward (batch 1: no padding to distort the transform). ``high_tokens`` scales with the window
(``--high-fraction`` of it, 1/16 by default: 16 of 256 tokens, 4.25 bits at the rule).

    python -m benchmarks.bench_encoder --quick
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks.harness import base_parser, emit
from stamp_fx import assets, sqnr_db
from stamp_fx.evaluation import Method, average_bits, compile_method, token_windows


def rows_for(high: int) -> list[Method]:
    out = [
        Method("FP", None),
        Method("A4 RTN", {"transform": "identity", "high_tokens": 0}),
        Method(
            f"A4 + first {high} raw at 8",
            {"transform": "identity", "high_tokens": high, "sink_tokens": 0},
        ),
    ]
    for h in (False, True):
        ft = {"feature_transform": "hadamard"} if h else {}
        suffix = " +H" if h else ""
        if h:
            out.append(Method("A4 RTN +H", {"transform": "identity", "high_tokens": 0, **ft}))
            out.append(
                Method(
                    f"A4 + first {high} raw at 8 +H",
                    {"transform": "identity", "high_tokens": high, "sink_tokens": 0, **ft},
                )
            )
        for t in ("haar", "dct", "wht"):
            for s in (0, 1):
                out.append(
                    Method(
                        f"STaMP {t} {high}@8 sinks={s}{suffix}",
                        {"transform": t, "high_tokens": high, "sink_tokens": s, **ft},
                    )
                )
    return out


@torch.no_grad()
def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--text", default="wikitext2")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--high-fraction", type=float, default=1 / 16)
    args = parser.parse_args()
    if args.quick:
        args.window, args.windows = 128, 2
    try:
        text = assets.load_text(args.text)
    except FileNotFoundError as err:
        print(f"skipping: {err}")
        return 0
    loaded = assets.load_model("all-minilm-l6-v2")
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    cls, sep = loaded.tokenizer.cls_token_id, loaded.tokenizer.sep_token_id
    pieces = [
        torch.cat([torch.tensor([cls]), w, torch.tensor([sep])])
        for w in token_windows(ids, args.window - 2, args.windows)
    ]
    inputs = [
        {"input_ids": p[None], "attention_mask": torch.ones(1, p.numel(), dtype=torch.long)}
        for p in pieces
    ]
    reference = [loaded.model(**x).last_hidden_state for x in inputs]
    ref_emb = [F.normalize(h.mean(1), dim=-1) for h in reference]
    high = max(1, round(args.high_fraction * args.window))
    table = []
    for method in rows_for(high):
        model, compiler = compile_method(loaded.model, method, inductor=False)
        outs = [model(**x).last_hidden_state for x in inputs]
        sq = sum(sqnr_db(r, o) for r, o in zip(reference, outs)) / len(outs)
        cos = sum(
            float((F.normalize(o.mean(1), dim=-1) * e).sum()) for o, e in zip(outs, ref_emb)
        ) / len(outs)
        bits = (
            32.0
            if compiler is None
            else average_bits(compiler.last.plan, compiler.last.sites, args.window)
        )
        table.append([method.name, round(bits, 4), round(sq, 2), round(cos, 5)])
        print(f"  {method.name}: SQNR {sq:.2f} dB, cosine {cos:.5f}", file=sys.stderr)
    emit(
        f"all-MiniLM-L6-v2 (real fp32 weights), {len(inputs)} x {args.window} tokens of {args.text}",
        ["method", "avg act bits", "hidden-state SQNR dB", "embedding cosine"],
        table,
        device="cpu",
        json_path=args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
