"""Issue 6 sweep: one fisher sensitivity pass on SmolLM2 (low bits 4 and 5, calibration windows
17-20 of WikiText-2 at 512 tokens), re-solved for 4.125/4.5 bits, objectives and option sets;
held-out perplexity on windows 1-16. Usage: python -m benchmarks.bench_tune_sweep 4,5 4 TAG,...
(TAG: fisher-low4@4.5, fisher-low45@4.125, output_nsr-low4@4.5, uniform-64, ...)."""

import sys
import time
from collections import Counter
from pathlib import Path

import torch

from stamp_fx import assets
from stamp_fx.evaluation import Method, average_bits, compile_method, perplexity, token_windows
from stamp_fx.tuning import tune

torch.manual_seed(0)
lows = tuple(int(v) for v in sys.argv[1].split(",")) if len(sys.argv) > 1 else (4, 5)
calib_n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
evals = sys.argv[3].split(",") if len(sys.argv) > 3 else None
loaded = assets.load_model("smollm2-135m")
ids = loaded.tokenizer(assets.load_text("wikitext2"), return_tensors="pt").input_ids[0]
windows = token_windows(ids, 512, 16 + calib_n)
held, calib = windows[:16], windows[16:]
opts = {"transform": "haar", "feature_transform": "hadamard"}
t = time.time()
res = tune(
    loaded.model,
    [{"input_ids": w[None]} for w in calib],
    4.5,
    objective="fisher",
    low_bits_grid=lows,
    **opts,
)
print(f"tune {time.time() - t:.0f}s", flush=True)
low4 = [o for s in res.sites.values() for o in s.bits if o.low_bits == 4]
plans = {}
Path("bench_out/tune_sweep").mkdir(parents=True, exist_ok=True)
for budget in (4.125, 4.5):
    for obj in ("fisher", "output_nsr"):
        for name, options in (("low4", low4), (f"low{''.join(map(str, lows))}", None)):
            r = res.resolve(budget, objective=obj, options=options)
            tag = f"{obj}-{name}@{budget}"
            plans[tag] = r
            print(
                tag,
                f"achieved {r.avg_bits:.4f}",
                Counter(r.choice.values()).most_common(8),
                flush=True,
            )
            r.plan.save(f"bench_out/tune_sweep/plan_{tag}.json")
if evals is None:
    sys.exit(0)
rows = []
for tag in evals:
    if tag.startswith("uniform"):
        h = int(tag.split("-")[1])
        method = Method(tag, {**opts, "high_tokens": h})
    else:
        method = Method(tag, {"plan": plans[tag].plan})
    model, compiler = compile_method(loaded.model, method, inductor=False)
    r = perplexity(model, held, desc=tag, show_progress=False)
    bits = average_bits(compiler.last.plan, compiler.last.sites, 512)
    print(f"RESULT {tag}: ppl {r.ppl:.3f} bits {bits:.4f} ({r.seconds:.0f}s)", flush=True)
