"""Which linears and attention inputs does the backend find, quantize and skip, per architecture?

Tiny random-weight models of many transformers / diffusers families (different linear and
attention code: fused QKV, Conv1D, bias-free, GQA, MoE experts, encoder-only, encoder-decoder,
patch embeddings, joint text-image attention), compiled with ``backend=StampCompiler(config,
inductor=False)`` (the rewritten graph run eagerly: the analysis is the same as under Inductor).
Columns: linear-input sites found, quantized, skipped (with the commonest reasons), K/V sites
(``quantize_kv=True``), and how many graphs Dynamo handed over (graph breaks). A family that
fails to build or to compile is a row saying why.

    python -m benchmarks.bench_coverage          # about two minutes on a CPU
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch

from benchmarks.harness import base_parser, emit
from stamp_fx import StampCompiler, StampConfig

SEQ, BATCH = 16, 2


def _lm(config_name: str, model_name: str, **kw):
    import transformers

    cfg = getattr(transformers, config_name)(**kw)
    model = getattr(transformers, model_name)(cfg).eval()
    ids = torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}


def _small(**extra):
    return dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **extra)  # fmt: skip


def families():
    """name -> zero-argument builder of (model, inputs)."""
    out = {
        "Llama": lambda: _lm("LlamaConfig", "LlamaForCausalLM", **_small(num_key_value_heads=2)),
        "Qwen2": lambda: _lm("Qwen2Config", "Qwen2ForCausalLM", **_small(num_key_value_heads=2)),
        "Qwen3": lambda: _lm("Qwen3Config", "Qwen3ForCausalLM", **_small(num_key_value_heads=2, head_dim=8)),
        "Mistral": lambda: _lm("MistralConfig", "MistralForCausalLM", **_small(num_key_value_heads=2)),
        "Mixtral (MoE)": lambda: _lm("MixtralConfig", "MixtralForCausalLM", **_small(num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)),
        "Gemma": lambda: _lm("GemmaConfig", "GemmaForCausalLM", **_small(num_key_value_heads=2, head_dim=8)),
        "Phi3 (fused qkv)": lambda: _lm("Phi3Config", "Phi3ForCausalLM", **_small(num_key_value_heads=4, pad_token_id=0)),
        "GPT-2 (Conv1D)": lambda: _lm("GPT2Config", "GPT2LMHeadModel", vocab_size=64, n_embd=32, n_layer=2, n_head=4),
        "GPT-NeoX": lambda: _lm("GPTNeoXConfig", "GPTNeoXForCausalLM", **_small()),
        "OPT": lambda: _lm("OPTConfig", "OPTForCausalLM", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
        "Falcon": lambda: _lm("FalconConfig", "FalconForCausalLM", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        "Bloom": lambda: _lm("BloomConfig", "BloomForCausalLM", vocab_size=64, hidden_size=32, n_layer=2, n_head=4),
        "BERT": lambda: _lm("BertConfig", "BertModel", **_small()),
        "RoBERTa": lambda: _lm("RobertaConfig", "RobertaModel", **_small(pad_token_id=1)),
        "DistilBERT": lambda: _lm("DistilBertConfig", "DistilBertModel", vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64),
    }  # fmt: skip

    def vit():
        import transformers

        cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)  # fmt: skip
        return transformers.ViTModel(cfg).eval(), {"pixel_values": torch.randn(BATCH, 3, 32, 32)}

    def t5():
        import transformers

        cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)  # fmt: skip
        ids = torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        return transformers.T5Model(cfg).eval(), {"input_ids": ids, "decoder_input_ids": ids[:, :8]}

    def pixart():
        from tests.models import pixart as build

        return build()

    def dit():
        from diffusers import DiTTransformer2DModel

        m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)  # fmt: skip
        return m.eval(), {"hidden_states": torch.randn(BATCH, 4, 8, 8), "timestep": torch.tensor([1, 5]), "class_labels": torch.tensor([0, 3]), "return_dict": False}  # fmt: skip

    def sd3():
        from diffusers import SD3Transformer2DModel

        m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)  # fmt: skip
        return m.eval(), {"hidden_states": torch.randn(BATCH, 4, 8, 8), "encoder_hidden_states": torch.randn(BATCH, 6, 16), "pooled_projections": torch.randn(BATCH, 8), "timestep": torch.tensor([1, 5]), "return_dict": False}  # fmt: skip

    out.update({"ViT": vit, "T5 (enc-dec)": t5, "PixArt (diffusers)": pixart, "DiT (diffusers)": dit, "SD3 (diffusers, joint attn)": sd3})  # fmt: skip
    return out


def coverage(build) -> list:
    model, inputs = build()
    found = quantized = kv = graphs = 0
    reasons: Counter = Counter()
    compiler = StampCompiler(StampConfig(high_tokens=4, quantize_kv=True), inductor=False)
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(model, backend=compiler)(**inputs)
    for record in compiler.records:
        graphs += 1
        for site in record.sites:
            if site.slot.startswith(("k", "v")):
                kv += site.key in record.plan.sites
                continue
            found += 1
            if site.key in record.plan.sites:
                quantized += 1
            else:
                reasons[record.plan.skipped.get(site.key, site.reason or "not planned")] += 1
    top = "; ".join(f"{n} x {r[:60]}" for r, n in reasons.most_common(3))
    return [found, quantized, found - quantized, kv, graphs, top]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=None)
    args = parser.parse_args()
    rows = []
    for name, build in families().items():
        if args.families and name.split()[0] not in args.families:
            continue
        try:
            rows.append([name, *coverage(build)])
        except Exception as err:  # a family that does not build or compile is a finding
            rows.append([name, "-", "-", "-", "-", "-", f"{type(err).__name__}: {str(err)[:80]}"])
        print(rows[-1], flush=True)
    emit(
        "sites per architecture (tiny random models, quantize_kv=True, inductor=False)",
        [
            "family",
            "linear sites",
            "quantized",
            "skipped",
            "K/V quantized",
            "graphs",
            "skip reasons",
        ],
        rows,
        device="cpu",
        json_path=args.json,
    )


if __name__ == "__main__":
    main()
