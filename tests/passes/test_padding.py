"""Padded batches (issue 12 item 4): pad positions change no real token's quantization.

A padded batch (left or right padding, random lengths) must give, at every real position, the
logits each sequence gives alone. float64 models, so "the same" means float rounding: a
rounding difference that moved a value across a quantization tie would need ~1e-16 luck.
"""

from __future__ import annotations

import pytest
import torch

from stamp_fx import StampCompiler, StampConfig
from stamp_fx.ops import masked_apply
from stamp_fx.plan import SitePolicy
from tests import models

MASKED = torch.ops.stamp.fake_quant_masked.default
PLAIN = torch.ops.stamp.fake_quant.default
# high_tokens=3 so 4-bit tokens exist in these short sequences; K/V quantized too.
CONFIG = StampConfig(high_tokens=3, quantize_kv=True)


def _padded_batch(seed: int, side: str, batch: int = 3, longest: int = 11):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, longest + 1, (batch,), generator=gen).tolist()
    lengths[0] = longest  # one unpadded row
    ids = torch.randint(1, models.VOCAB, (batch, longest), generator=gen)
    mask = torch.zeros(batch, longest, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, longest - n :] = 1
        else:
            mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids, lengths


def _stamp_ops(gm) -> dict:
    targets = [n.target for n in gm.graph.nodes]
    return {"masked": targets.count(MASKED), "plain": targets.count(PLAIN)}


def _alone_logits(model, ids, mask):
    """Each row's real tokens run alone (batch of one, no mask) through the eager-graph backend."""
    compiler = StampCompiler(CONFIG, inductor=False)
    torch._dynamo.reset()
    fn = torch.compile(model, backend=compiler)
    out = []
    with torch.no_grad():
        for b in range(ids.shape[0]):
            real = ids[b][mask[b] == 1][None]
            pos = torch.arange(real.shape[1])[None]
            out.append(fn(input_ids=real, position_ids=pos).logits[0])
    for rec in compiler.records:  # a batch of one compiles exactly as before: no masked op
        assert _stamp_ops(rec.graph)["masked"] == 0
        assert _stamp_ops(rec.graph)["plain"] > 0
    return out


# Inductor's fused code rounds the float32 steps inside the float64 model (HF's RMSNorm
# computes in float32) differently from eager: agreement to float32 rounding. A real token
# quantized differently (a pad in its range or transform) moves logits by ~1e-2.
ATOL = {False: 1e-9, True: 1e-5}


def _check_padded(model, side, seed, inductor):
    ids, mask, pos, lengths = _padded_batch(seed, side)
    compiler = StampCompiler(CONFIG, inductor=inductor)
    torch._dynamo.reset()
    with torch.no_grad():
        padded = torch.compile(model, backend=compiler)(
            input_ids=ids, attention_mask=mask, position_ids=pos
        ).logits
    ops = _stamp_ops(compiler.last.graph)
    assert ops["masked"] > 0 and ops["plain"] == 0, ops  # every site (linears and K/V) masked
    alone = _alone_logits(model, ids, mask)
    for b, n in enumerate(lengths):
        got = padded[b][mask[b] == 1]
        assert got.shape[0] == n
        torch.testing.assert_close(got, alone[b], rtol=ATOL[inductor], atol=ATOL[inductor])
    return compiler


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("seed", [0, 1])
def test_padded_batch_equals_each_sequence_alone(side, seed):
    model, _ = models.llama(seed=seed)
    _check_padded(model.double(), side, seed, inductor=False)


def test_padded_batch_equals_each_sequence_alone_inductor():
    model, _ = models.llama(seed=2)
    compiler = _check_padded(model.double(), "left", 2, inductor=True)
    nodes = compiler.last.graph.graph.nodes
    labels = [n.meta.get("stamp_kernel") for n in nodes if n.target is MASKED]
    assert labels and set(labels) == {"reference"}


def test_unmasked_graph_has_no_masked_op():
    model, inputs = models.llama()
    compiler = StampCompiler(CONFIG, inductor=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=compiler)(**inputs)
    ops = _stamp_ops(compiler.last.graph)
    assert ops["masked"] == 0 and ops["plain"] > 0


def test_masked_apply_quantizes_real_tokens_alone_and_keeps_pads():
    gen = torch.Generator().manual_seed(0)
    policy = SitePolicy(high_tokens=2, sink_tokens=1)
    x = torch.randn(2, 9, 8, generator=gen, dtype=torch.float64)
    x[0, :4] *= 50.0  # large pads: unmasked quantization would spread their range
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    out = masked_apply(policy, x, mask, 1)
    assert torch.equal(out[0, :4], x[0, :4]) and torch.equal(out[1, 6:], x[1, 6:])
    assert torch.equal(out[0, 4:], policy.apply_sequence(x[0:1, 4:], 1)[0])
    assert torch.equal(out[1, :6], policy.apply_sequence(x[1:2, :6], 1)[0])
    unmasked = policy.apply_sequence(x, 1)
    assert (unmasked[0, 4:] - out[0, 4:]).abs().max() > 1e-3  # the bug this fixes
    # Through the op, and K/V layout [B, H, S, D] along dim 2.
    kv = x.view(2, 9, 2, 4).transpose(1, 2).contiguous()
    from stamp_fx.ops import op_args

    got = MASKED(kv, mask, *op_args(policy, 2), None)
    assert torch.equal(got[0, :, 4:], policy.apply_sequence(kv[0:1, :, 4:], 2)[0])
    assert torch.equal(got[1, :, :6], policy.apply_sequence(kv[1:2, :, :6], 2)[0])
    assert torch.equal(got[0, :, :4], kv[0, :, :4])
    with pytest.raises(ValueError, match="attention_mask must be"):
        masked_apply(policy, x, mask[:, :5], 1)
