"""What a ``generate()`` costs in average activation bits, prefill and decode apart.

SmolLM2-135M-Instruct (real activations; Q4_1 weights dequantized), a ``--prompt``-token prompt
from WikiText-2 (or ``--text``), ``--new`` greedy tokens, ``model.forward`` compiled by the
stamp backend (``inductor=False``: the bit count does not depend on the lowering), counted by
:func:`stamp_fx.generation_bits` (each quantized tensor once; K/V, with ``quantize_kv``, once
when the cache stores them). ``--quick`` runs a tiny random-weight Llama instead.

    python -m benchmarks.bench_generate_bits            # SmolLM2, 256-token prompt, 32 new
    python -m benchmarks.bench_generate_bits --quick
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks.harness import base_parser, emit
from stamp_fx import StampCompiler, assets, generation_bits

ROWS = (
    ("default", {}),
    ("decode_bits=4", {"decode_bits": 4}),
    ("quantize_kv", {"quantize_kv": True}),
    ("quantize_kv, decode_bits=4", {"quantize_kv": True, "decode_bits": 4}),
)


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), None


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="new tokens")
    parser.add_argument("--text", default="wikitext2", help="registered text name or a file")
    args = parser.parse_args(argv)
    if args.quick:
        model, _ = _tiny()
        prompt, new = 24, 6
        ids = torch.randint(0, 96, (1, prompt), generator=torch.Generator().manual_seed(1))
        name = "tiny random Llama"
    else:
        loaded = assets.load_model("smollm2-135m")
        model, prompt, new, name = loaded.model, args.prompt, args.new, loaded.name
        ids = loaded.tokenizer(assets.load_text(args.text), return_tensors="pt").input_ids
        ids = ids[:, :prompt]
    rows = []
    for label, options in ROWS:
        compiler = StampCompiler.from_options({**options, "inductor": False})
        torch._dynamo.reset()
        start = time.perf_counter()
        meter = generation_bits(
            model, compiler, input_ids=ids, attention_mask=torch.ones_like(ids),
            max_new_tokens=new, min_new_tokens=new, do_sample=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        rows.append(
            [
                label,
                meter.average(),
                meter.average("prefill"),
                meter.average("decode"),
                f"{meter.calls['prefill']}+{meter.calls['decode']}",
                len(compiler.records),
                seconds,
            ]
        )
    emit(
        f"generate() average activation bits: {name}, {prompt}-token prompt, {new} new tokens",
        ["options", "avg bits", "prefill", "decode", "calls", "graphs", "wall s"],
        rows,
        device=args.device,
        json_path=args.json,
        extra={"prompt": prompt, "new": new, "model": name},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
