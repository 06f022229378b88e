"""Quantize-on-write K/V through Inductor: a StaticCache generate() (the cache is a mutated
graph input) matches the eager quantize-on-write oracle, in two graphs."""

from __future__ import annotations

import torch

from stamp_fx import StampCompiler, StampConfig
from tests import models
from tests.kv_oracle import oracle_generate
from tests.passes.test_kv_cache import PROMPT, _compiled_generate, _kv

NEW = 5


def test_static_cache_generate_through_inductor_matches_the_oracle():
    config = StampConfig(high_tokens=3, quantize_kv=True, decode_bits=4)
    model, inputs = models.llama(batch=1, seq=PROMPT)
    ids = inputs["input_ids"]
    compiler = StampCompiler(config, inductor=True)
    got, got_cache = _compiled_generate(model, compiler, "static", ids, NEW)
    want, want_cache = oracle_generate(model, config, "static", ids, NEW)
    assert len(compiler.records) == 2  # one prefill graph, one decode graph for every step
    assert torch.equal(got.sequences, want.sequences)
    # Inductor fuses the float32 arithmetic around the quantizers (measured: 1.2e-7 at most);
    # a K/V entry quantized by another rule, or twice, is off by a quantization step (~1e-2).
    for g, w in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    total = PROMPT + NEW - 1
    for layer in range(2):
        for g, w in zip(_kv(got_cache, layer, total), _kv(want_cache, layer, total), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
