"""Decode steps (issue 12 item 3): the rule a one-token step gets, and honest generate() bits."""

from __future__ import annotations

import pytest
import torch

from stamp_fx import StampCompiler, StampConfig, generation_bits
from stamp_fx.plan import SitePolicy
from tests import models

PROMPT, NEW = 12, 32


@pytest.mark.parametrize("decode_bits", [None, 4])
def test_generate_bits_prefill_and_decode(decode_bits):
    model, inputs = models.llama(batch=1, seq=PROMPT)
    config = StampConfig(high_tokens=4, decode_bits=decode_bits)
    compiler = StampCompiler(config, inductor=False)
    torch._dynamo.reset()
    meter = generation_bits(
        model, compiler, input_ids=inputs["input_ids"], max_new_tokens=NEW,
        min_new_tokens=NEW, do_sample=False,
    )  # fmt: skip
    assert meter.calls == {"prefill": 1, "decode": NEW - 1} and meter.unmeasured == 0
    # Prefill: the sequence rule over the prompt (sink + Haar, padding coefficients counted).
    policy = SitePolicy.from_config(config, sink_tokens=1)
    vector = policy.bit_vector(policy.make_transform(), PROMPT)
    assert meter.average("prefill") == pytest.approx(sum(vector) / PROMPT)
    assert 4 < meter.average("prefill") < 8
    # Decode: every new token at decode_bits (default high_bits), per token.
    assert meter.average("decode") == (8.0 if decode_bits is None else 4.0)
    # Every call quantizes the same tensors, so elements are proportional to tokens.
    want = (PROMPT * meter.average("prefill") + (NEW - 1) * meter.average("decode")) / (
        PROMPT + NEW - 1
    )
    assert meter.average() == pytest.approx(want)
    decode_records = [r for r in compiler.records if r.extra["decode"]]
    prefill_records = [r for r in compiler.records if not r.extra["decode"]]
    assert decode_records and len(prefill_records) == 1
    for rec in decode_records:
        linear = {k: p for k, p in rec.plan.sites.items() if k.endswith(":in")}
        assert len(linear) == 14  # 2 layers x (q, k, v, o, gate, up, down)
        for p in linear.values():
            assert (p.transform, p.sink_tokens, p.high_tokens) == ("identity", 0, 0)
            assert p.low_bits == (8 if decode_bits is None else 4)
    assert all(p.transform == "haar" for p in prefill_records[0].plan.sites.values())
    # Outside the meter nothing is counted.
    assert compiler._meter is None


def test_decode_bits_is_validated():
    with pytest.raises(ValueError, match="decode_bits"):
        StampConfig(decode_bits=1)
    with pytest.raises(ValueError, match="decode_bits"):
        StampConfig.from_dict({"decode_bits": "4"})


def test_eager_attention_decode_steps_get_the_decode_rule():
    """Decode detection reads eager (softmax) attention too: its one-token steps get the
    decode rule; K/V quantization, asked for, is not done there and says so."""
    model, inputs = models.llama(batch=1, seq=PROMPT, attn_implementation="eager")
    config = StampConfig(high_tokens=4, decode_bits=4, quantize_kv=True)
    compiler = StampCompiler(config, inductor=False)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="eager attention: K/V quantization"):
        meter = generation_bits(
            model, compiler, input_ids=inputs["input_ids"], max_new_tokens=4,
            min_new_tokens=4, do_sample=False,
        )  # fmt: skip
    assert meter.calls == {"prefill": 1, "decode": 3}
    assert meter.average("decode") == 4.0
    decode = [r for r in compiler.records if r.extra["decode"]]
    assert decode and all(
        (p.transform, p.low_bits) == ("identity", 4) for r in decode for p in r.plan.sites.values()
    )
