"""Tiny random-initialised transformers / diffusers models for the graph-level tests.

Every factory takes a ``seed`` and small size knobs (hypothesis draws them) and returns
``(model, inputs)`` where ``inputs`` is a kwargs dict; :func:`main_output` picks the tensor to
compare. Sizes are chosen so a no-Inductor compile takes about a second on 2 CPU cores.
"""

from __future__ import annotations

import torch

VOCAB = 96


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed + 1))


def llama(
    seed=0, hidden=32, layers=2, heads=4, kv_heads=2, batch=2, seq=12, attn_implementation="sdpa"
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        attn_implementation=attn_implementation,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), {"input_ids": _ids(batch, seq, seed)}


def qwen2(seed=0, hidden=32, layers=2, heads=4, kv_heads=2, batch=2, seq=12):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval(), {"input_ids": _ids(batch, seq, seed)}


def gpt2(seed=0, hidden=32, layers=2, heads=4, batch=2, seq=12):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256)
    return GPT2LMHeadModel(cfg).eval(), {"input_ids": _ids(batch, seq, seed)}


def bert(seed=0, hidden=32, layers=2, heads=4, batch=2, seq=12, attn_implementation="sdpa"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=256, attn_implementation=attn_implementation,
    )  # fmt: skip
    inputs = {
        "input_ids": _ids(batch, seq, seed),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }
    return BertModel(cfg).eval(), inputs


def pixart(seed=0, layers=2, heads=2, head_dim=8, batch=2, side=8, text=6):
    """PixArt DiT; ``side`` is the latent side, so the token grid is (side/2) x (side/2)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        sample_size=side, patch_size=2, in_channels=4, out_channels=8, num_layers=layers,
        num_attention_heads=heads, attention_head_dim=head_dim, cross_attention_dim=heads * head_dim,
        caption_channels=16, norm_type="ada_norm_single", use_additional_conditions=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "hidden_states": torch.randn(batch, 4, side, side, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text, 16, generator=gen),
        "timestep": torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        "return_dict": False,
    }
    return model.eval(), inputs


FACTORIES = {"llama": llama, "qwen2": qwen2, "gpt2": gpt2, "bert": bert, "pixart": pixart}


def main_output(out) -> torch.Tensor:
    if isinstance(out, tuple):
        return out[0]
    for name in ("logits", "last_hidden_state", "sample"):
        if hasattr(out, name):
            return getattr(out, name)
    raise TypeError(f"no main output in {type(out).__name__}")
