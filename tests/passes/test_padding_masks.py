"""Padded batches beyond the plain ``[batch, seq]`` integer mask (issue 12 item 4): a padded
batch of one, float 2-d masks, and 4-d (bool and additive float) attention masks. Each must
give, at every real position, the logits of the sequence run alone (float64 models)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stamp_fx import StampCompiler
from stamp_fx.padding import real_tokens
from tests import models
from tests.passes.test_padding import CONFIG, _alone_logits, _padded_batch, _stamp_ops

ATOL = 1e-9


def _causal_4d(mask: torch.Tensor, kind: str) -> torch.Tensor:
    """A 4-d ``[batch, 1, seq, seq]`` causal + padding mask: bool (True = attend) or additive
    float (0 / the dtype's minimum, HF's convention). Pad query rows attend nowhere in the
    bool form (SDPA then gives 0 or NaN there; real rows never read them)."""
    seq = mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = causal[None, None] & (mask[:, None, None, :] != 0)
    if kind == "bool":
        return allowed
    out = torch.zeros(allowed.shape, dtype=torch.float64)
    return out.masked_fill(~allowed, torch.finfo(torch.float64).min)


def _run(model, **inputs):
    compiler = StampCompiler(CONFIG, inductor=False)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(model, backend=compiler)(**inputs).logits
    return logits, compiler


def _check_rows(logits, ids, mask, lengths, model):
    alone = _alone_logits(model, ids, mask)
    for b, n in enumerate(lengths):
        got = logits[b][mask[b] == 1]
        assert got.shape[0] == n and torch.isfinite(got).all()
        torch.testing.assert_close(got, alone[b], rtol=ATOL, atol=ATOL)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_of_one_equals_the_sequence_alone(side):
    model, _ = models.llama(seed=3)
    model = model.double()
    ids, mask, pos, lengths = _padded_batch(5, side, batch=2)
    row = 1 if lengths[1] < lengths[0] else 0  # the padded row, alone in its batch
    ids, mask, pos = ids[row : row + 1], mask[row : row + 1], pos[row : row + 1]
    logits, compiler = _run(model, input_ids=ids, attention_mask=mask, position_ids=pos)
    ops = _stamp_ops(compiler.last.graph)
    assert ops["masked"] > 0 and ops["plain"] == 0, ops
    _check_rows(logits, ids, mask, [lengths[row]], model)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_4d_attention_mask_padded_batch_equals_each_sequence_alone(kind, side):
    model, _ = models.llama(seed=4)
    model = model.double()
    ids, mask, pos, lengths = _padded_batch(6, side)
    logits, compiler = _run(
        model, input_ids=ids, attention_mask=_causal_4d(mask, kind), position_ids=pos
    )
    ops = _stamp_ops(compiler.last.graph)
    assert ops["masked"] > 0 and ops["plain"] == 0, ops
    _check_rows(logits, ids, mask, lengths, model)


def test_float_2d_padding_mask_is_read_as_nonzero_real():
    model, _ = models.llama(seed=5)
    model = model.double()
    ids, mask, pos, lengths = _padded_batch(7, "left")
    logits, compiler = _run(
        model, input_ids=ids, attention_mask=mask.to(torch.float64), position_ids=pos
    )
    assert _stamp_ops(compiler.last.graph)["masked"] > 0
    _check_rows(logits, ids, mask, lengths, model)


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 3),
    seq=st.integers(1, 9),
    heads=st.sampled_from([1, 2]),
    kind=st.sampled_from(["bool", "float32", "float64", "int"]),
)
def test_real_tokens_of_a_4d_mask_is_the_padding(seed, batch, seq, heads, kind):
    gen = torch.Generator().manual_seed(seed)
    pad = (torch.rand(batch, seq, generator=gen) < 0.4).long()
    pad[:, -1] = 0  # left padding keeps the last token real (a row with no token is no row)
    padding = 1 - pad
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] & (
        padding[:, None, None] != 0
    )
    allowed = allowed.expand(batch, heads, seq, seq)
    if kind == "bool":
        mask = allowed
    elif kind == "int":
        mask = allowed.long()
    else:
        dtype = getattr(torch, kind)
        fill = float("-inf") if seed % 2 else torch.finfo(dtype).min
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, fill)
    assert torch.equal(real_tokens(mask), padding != 0)
    assert torch.equal(real_tokens(padding), padding != 0)
    assert torch.equal(real_tokens(padding.double()), padding != 0)


def test_real_tokens_rejects_other_ranks():
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, seq\]"):
        real_tokens(torch.ones(2, 3, 4))
