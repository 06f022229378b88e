"""Eager probe for issue 13 item 4: which tokens should stay out of the Haar transform at 8 bits?

Not a backend feature: forward pre-hooks on every in-block linear of SmolLM2-135M apply, in the
reference's steps, STaMP with the full-width rotation and 64 tokens at 8 bits *in total*, where
the tokens kept out of the transform (quantized alone, per token, at 8 bits) are chosen per call:

* ``sink0``: position 0 (what ``sink_tokens=1`` does; reproduces the backend's row exactly);
* ``top:CRIT:K``: the K tokens of largest CRIT instead of position 0;
* ``sink0+top:CRIT:K``: position 0 and the K tokens of largest CRIT after it.

CRIT is a per-token statistic of the site's input: ``absmax`` (max |x|), ``range`` (max - min),
or ``rotated_range`` (max - min after the feature rotation, what sets the min-max step). The rest
of the tokens are Haar-transformed as one sequence (auto depth, 64-token band), with
``64 - kept`` coefficients at 8 bits, so every variant spends the same bits.

    python -m benchmarks.probe_outlier_tokens sink0 sink0+top:absmax:1 --windows 4 --window 1024
"""

from __future__ import annotations

import argparse
import time

import torch

from stamp_fx import assets
from stamp_fx.evaluation import perplexity, token_windows
from stamp_fx.plan import SitePolicy
from stamp_fx.quantizer import fake_quant
from stamp_fx.rotations import feature_rotation, resolve_block

CRITERIA = {
    "absmax": lambda x, xr: x.abs().amax(-1),
    "range": lambda x, xr: x.amax(-1) - x.amin(-1),
    "rotated_range": lambda x, xr: xr.amax(-1) - xr.amin(-1),
}
HIGH_TOKENS = 64


def kept_tokens(variant: str, crit: str | None, k: int, x, xr) -> torch.Tensor:
    if variant == "sink0":
        return torch.tensor([0])
    score = CRITERIA[crit](x, xr)[0].clone()
    if variant == "top":
        return score.topk(k).indices.sort().values
    score[0] = -float("inf")
    return torch.cat([torch.tensor([0]), score.topk(k).indices]).sort().values


def make_hook(variant: str, crit: str | None, k: int):
    def hook(module, args):
        x = args[0]  # [1, S, D]
        block = resolve_block("full", x.shape[-1])
        xr = feature_rotation(x, block)
        keep = kept_tokens(variant, crit, k, x, xr)
        rest = torch.ones(x.shape[1], dtype=torch.bool)
        rest[keep] = False
        policy = SitePolicy(high_tokens=HIGH_TOKENS - len(keep), depth_target=HIGH_TOKENS)
        out = torch.empty_like(xr)
        out[:, rest] = policy.apply_sequence(xr[:, rest], 1)
        out[:, keep] = fake_quant(xr[:, keep], 8, token_dim=1)
        return (feature_rotation(out, block, True), *args[1:])

    return hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="sink0 | top:CRIT:K | sink0+top:CRIT:K")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=1024)
    args = parser.parse_args()
    loaded = assets.load_model("smollm2-135m")
    ids = loaded.tokenizer(assets.load_text("wikitext2"), return_tensors="pt").input_ids[0]
    windows = token_windows(ids, args.window, args.windows)
    print("| variant | criterion | extra tokens | perplexity |\n|---|---|---|---|")
    for spec in args.variants:
        variant, crit, k = (spec.split(":") + ["", "1"])[:3]
        if variant not in ("sink0", "top", "sink0+top"):
            raise SystemExit(f"variant: unknown {variant!r}; valid: sink0, top, sink0+top")
        if variant != "sink0" and crit not in CRITERIA:
            raise SystemExit(f"criterion: unknown {crit!r}; valid: {', '.join(CRITERIA)}")
        handles = [
            m.register_forward_pre_hook(make_hook(variant, crit or None, int(k)))
            for name, m in loaded.model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in name
        ]
        start = time.perf_counter()
        with torch.no_grad():
            result = perplexity(loaded.model, windows, show_progress=False)
        for h in handles:
            h.remove()
        extra = 0 if variant == "sink0" else int(k)
        print(
            f"| {variant} | {crit or '-'} | {extra} | {result.ppl:.3f} |"
            f"  ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
