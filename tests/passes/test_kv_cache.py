"""K/V quantize-on-write with a KV cache (issue 12 item 3).

A prefill block is STaMP-quantized along its sequence once, as the cache stores it; a decode
token is quantized once by the decode rule; entries already in the cache are never quantized
again. Checked against the eager oracle of ``tests/kv_oracle.py`` (config and module names
only), with a DynamicCache and a StaticCache, counting compiled graphs.
"""

from __future__ import annotations

import pytest
import torch

from stamp_fx import StampCompiler, StampConfig
from tests import models
from tests.kv_oracle import decode_rule, make_cache, oracle_generate, sequence_rule

PROMPT, NEW = 9, 8
CONFIG = StampConfig(high_tokens=3, quantize_kv=True)
STAMP = torch.ops.stamp.fake_quant.default


def _compiled_generate(model, compiler, kind, input_ids, new_tokens, cache=None):
    cache = cache if cache is not None else make_cache(kind, model, None, PROMPT + new_tokens)
    forward = model.forward
    torch._dynamo.reset()
    model.forward = torch.compile(forward, backend=compiler)
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, cache=cache, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                return_dict_in_generate=True,
            )  # fmt: skip
    finally:
        model.forward = forward
    return out, cache


def _kv(cache, layer, length):
    lay = cache.layers[layer]
    return lay.keys[:, :, :length], lay.values[:, :, :length]


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("decode_bits", [None, 4])
def test_generate_equals_quantize_on_write_oracle(kind, decode_bits):
    config = StampConfig(high_tokens=3, quantize_kv=True, decode_bits=decode_bits)
    model, inputs = models.llama(batch=1, seq=PROMPT)
    ids = inputs["input_ids"]
    compiler = StampCompiler(config, inductor=False)
    got, got_cache = _compiled_generate(model, compiler, kind, ids, NEW)
    want, want_cache = oracle_generate(model, config, kind, ids, NEW)
    assert torch.equal(got.sequences, want.sequences)
    # The same ops on the same values: bit-identical with a DynamicCache. With a StaticCache
    # the eager attention over the masked buffer rounds one float32 ulp differently from the
    # traced graph after a few steps (seen from step 6: 3e-8 on logits, 6e-8 on one later
    # cache entry); a K/V quantized differently (re-quantized, or by another rule) differs by
    # a quantization step, ~1e-2 here.
    tol = 0 if kind == "dynamic" else 1e-6
    for g, w in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    total = PROMPT + NEW - 1  # the last token is generated, never fed back
    for layer in range(2):
        for g, w in zip(_kv(got_cache, layer, total), _kv(want_cache, layer, total), strict=True):
            assert torch.equal(g[:, :, :PROMPT], w[:, :, :PROMPT])  # the prefill block: exact
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    # A bounded number of graphs: one prefill, and decode graphs that do not grow with the
    # number of steps (DynamicCache: a static-length one, then one with a dynamic cache
    # length; StaticCache: one).
    decode = [r for r in compiler.records if r.extra["decode"]]
    assert len(compiler.records) - len(decode) == 1
    assert 1 <= len(decode) <= (2 if kind == "dynamic" else 1), len(decode)
    for rec in decode:
        kv = {k: p for k, p in rec.plan.sites.items() if k.endswith((":k", ":v"))}
        assert len(kv) == 4 and set(kv.values()) == {decode_rule(config)}
        # Nothing in the decode graph quantizes a tensor holding the cache: every K/V
        # quantizer reads the one new token.
        for node in rec.graph.graph.nodes:
            if node.target is STAMP and node.args[1] == 2:
                assert node.args[0].meta["example_value"].shape[2] == 1


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cached_prefill_entries_are_never_requantized(kind):
    model, inputs = models.llama(batch=1, seq=PROMPT)
    ids = inputs["input_ids"]
    compiler = StampCompiler(CONFIG, inductor=False)
    cache = make_cache(kind, model, None, PROMPT + 4)
    torch._dynamo.reset()
    step = torch.compile(model, backend=compiler)
    with torch.no_grad():
        out = step(input_ids=ids, cache=cache, use_cache=True)
        prefill = [tuple(t.clone() for t in _kv(cache, i, PROMPT)) for i in range(2)]
        # What the prefill wrote is the sequence rule applied to the float K/V of the prompt
        # (layer 0's K/V depend only on the quantized input of k_proj/v_proj).
        float_cache = make_cache(kind, model, None, PROMPT)
        from tests.kv_oracle import linear_hooks

        with linear_hooks(model, CONFIG):
            model(input_ids=ids, cache=float_cache, use_cache=True)
        for g, f in zip(prefill[0], _kv(float_cache, 0, PROMPT), strict=True):
            assert torch.equal(g, sequence_rule(CONFIG).apply(f, 2))
        token = out.logits[:, -1:].argmax(-1)
        for n in range(3):  # decode steps
            out = step(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            for i in range(2):
                for g, p in zip(_kv(cache, i, PROMPT), prefill[i], strict=True):
                    assert torch.equal(g, p), (n, i)  # bit-identical: never re-quantized
    assert any(r.extra["decode"] for r in compiler.records)


def test_no_cache_forward_quantizes_attention_input():
    """Without a cache the K/V site is the attention input (no write to find): the same
    values as quantizing where the cache would be written."""
    model, inputs = models.llama(batch=1, seq=PROMPT)
    compiler = StampCompiler(CONFIG, inductor=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=compiler)(**inputs, use_cache=False)
    kv = [s for s in compiler.last.sites if s.slot in ("k", "v")]
    assert len(kv) == 4 and all("cache_write" not in s.extra for s in kv)
    assert all(s.key in compiler.last.plan.sites for s in kv)


def test_decode_kv_without_a_cache_write_is_skipped_with_a_warning():
    """A decode graph whose K/V input is the cache but shows no recognised cache update
    (here: a cache passed in as plain tensors and concatenated by hand in another order)
    skips K/V quantization there with the reason, rather than re-quantizing the cache."""
    import torch.nn.functional as F

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x, past_k, past_v):
            q, k, v = self.qkv(x).view(1, 1, 3, 8).transpose(1, 2).chunk(3, dim=1)
            k = torch.cat([k, past_k], dim=2)  # new first: not a cache append
            v = torch.cat([v, past_v], dim=2)
            return F.scaled_dot_product_attention(q, k, v)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Attn()])

        def forward(self, x, past_k, past_v):
            return self.layers[0](x, past_k, past_v)

    compiler = StampCompiler(CONFIG, inductor=False, causal=True)
    torch._dynamo.reset()
    x, pk, pv = torch.randn(1, 1, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    with pytest.warns(UserWarning, match="decode step: this K/V attention input holds"):
        torch.compile(Model(), backend=compiler)(x, pk, pv)
    rec = compiler.last
    assert rec.extra["decode"]
    kv = [s.key for s in rec.sites if s.slot in ("k", "v")]
    assert kv and all("no cache update was found" in rec.plan.skipped[k] for k in kv)


def test_generation_bits_count_each_kv_entry_once():
    """The BitMeter counts a decode step's K/V as the one token it writes (not the cache)."""
    from stamp_fx import generation_bits

    model, inputs = models.llama(batch=1, seq=PROMPT)
    config = StampConfig(high_tokens=3, quantize_kv=True, decode_bits=4)
    compiler = StampCompiler(config, inductor=False)
    torch._dynamo.reset()
    meter = generation_bits(
        model, compiler, input_ids=inputs["input_ids"], max_new_tokens=NEW,
        min_new_tokens=NEW, do_sample=False,
    )  # fmt: skip
    # Per layer and token: q/k/v input 32, o 32, gate/up 32, down 64; K and V 2 heads x 8.
    per_token = 2 * (32 + 32 + 32 + 64 + 2 * 2 * 8)
    assert meter.elements["decode"] == (NEW - 1) * per_token
    assert meter.elements["prefill"] == PROMPT * per_token
    assert meter.average("decode") == 4.0
