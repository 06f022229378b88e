"""Per-token mixed-precision fake quantization: half-step error, idempotence, edge cases."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stamp_fx import TokenBits, compute_qparams, dequantize, fake_quant, quantize, sqnr_db
from stamp_fx.quantizer import token_bit_vector
from tests.strategies import batch_shapes, dtypes, randn, seeds, seq_lengths
from tests.tolerances import HALF_STEP_SLACK_ULPS, IDEMPOTENT_RTOL, SQNR_FLOOR_16BIT_DB

bit_widths = st.integers(2, 16)
group_sizes = st.sampled_from([None, 1, 2, 4])


def _bits_for(draw_kind, length, seed):
    gen = torch.Generator().manual_seed(seed)
    if draw_kind == "int":
        return int(torch.randint(2, 17, (1,), generator=gen))
    if draw_kind == "topk":
        return TokenBits(int(torch.randint(0, length + 2, (1,), generator=gen)), 8, 4)
    return torch.randint(2, 17, (length,), generator=gen)


@given(
    length=seq_lengths,
    batch=batch_shapes,
    dtype=dtypes,
    seed=seeds,
    kind=st.sampled_from(["int", "topk", "vector"]),
    symmetric=st.booleans(),
    group_size=group_sizes,
)
def test_error_within_half_step_and_codes_in_range(
    length, batch, dtype, seed, kind, symmetric, group_size
):
    features = 8
    x = randn((*batch, length, features), seed, dtype, scale=3.0)
    bits = _bits_for(kind, length, seed)
    params = compute_qparams(x, bits, token_dim=-2, symmetric=symmetric, group_size=group_size)
    assert params.scale.dtype == torch.float32  # float32 scales whatever the activation dtype
    codes = quantize(x, params, group_size=group_size)
    assert torch.equal(codes, codes.round())
    assert bool(((codes >= params.qmin) & (codes <= params.qmax)).all())
    deq32 = dequantize(codes, params, torch.float32)
    err = (
        deq32.unflatten(-1, (-1, group_size or features))
        - x.float().unflatten(-1, (-1, group_size or features))
    ).abs()
    ulp = torch.finfo(torch.float32).eps * x.float().abs().amax().clamp_min(1e-30)
    assert bool((err <= params.scale / 2 + HALF_STEP_SLACK_ULPS * ulp).all())
    out = fake_quant(x, bits, symmetric=symmetric, group_size=group_size)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, deq32.to(dtype))


@given(length=seq_lengths, seed=seeds, symmetric=st.booleans(), bits=bit_widths)
def test_fake_quant_is_idempotent(length, seed, symmetric, bits):
    x = randn((2, length, 16), seed, torch.float32)
    once = fake_quant(x, bits, symmetric=symmetric)
    twice = fake_quant(once, bits, symmetric=symmetric)
    torch.testing.assert_close(
        twice, once, rtol=IDEMPOTENT_RTOL, atol=IDEMPOTENT_RTOL * x.abs().max().item()
    )


@given(length=seq_lengths, seed=seeds, symmetric=st.booleans())
def test_16_bit_is_near_lossless(length, seed, symmetric):
    x = randn((length, 32), seed, torch.float32)
    assert sqnr_db(x, fake_quant(x, 16, symmetric=symmetric)) >= SQNR_FLOOR_16BIT_DB


def test_more_bits_never_worse_on_average():
    x = randn((4, 64, 64), 0, torch.float32)
    errs = [(fake_quant(x, b) - x).square().mean().item() for b in range(2, 17)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_constant_and_zero_tokens_are_exact_and_finite(dtype, symmetric):
    x = torch.zeros(3, 5, 8, dtype=dtype)
    x[:, 1] = 2.5  # constant token
    x[:, 2] = torch.linspace(-1, 1, 8, dtype=dtype)  # an ordinary token beside them
    out = fake_quant(x, TokenBits(1, 8, 4), symmetric=symmetric)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 0], x[:, 0])  # all-zero padding stays zero
    if not symmetric:
        assert torch.equal(out[:, 1], x[:, 1])  # constant token exact (asymmetric offset)


def test_per_token_bits_apply_along_the_chosen_token_dim():
    bits = [16, 2, 16, 2, 16, 2]
    x = randn((6, 3, 16), 1, torch.float32)  # tokens along dim 0, a batch dim in the middle
    out = fake_quant(x, bits, token_dim=0)
    err = (out - x).abs().amax((1, 2))
    assert bool((err[0::2] < 1e-3).all()) and bool((err[1::2] > 1e-2).all())
    moved = fake_quant(x.transpose(0, 1), bits, token_dim=1)
    assert torch.equal(moved.transpose(0, 1), out)


def test_asymmetric_uses_full_grid_per_token():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    params = compute_qparams(x, 2)
    assert quantize(x, params).flatten().tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(fake_quant(x, 2), x)


def test_per_group_ranges_are_independent():
    x = torch.cat([torch.full((1, 4), 100.0), torch.linspace(0, 1, 4).unsqueeze(0)], 1)
    grouped = fake_quant(x, 2, group_size=4)
    torch.testing.assert_close(grouped, x, atol=1e-6, rtol=0)  # each group exact on its own grid
    assert (fake_quant(x, 2) - x).abs().max() > 0.1  # one shared range is not


@pytest.mark.parametrize("bad", [1, 17, 0, -4, 4.0, 4.5, "8", True, None])
def test_bad_bits_raise_value_error(bad):
    with pytest.raises(ValueError, match="2..16"):
        fake_quant(torch.zeros(2, 4), bad)


def test_bad_shapes_and_options_raise():
    with pytest.raises(ValueError, match="2 entries but the sequence has 3"):
        fake_quant(torch.zeros(3, 4), [4, 8])
    with pytest.raises(ValueError, match="does not divide"):
        fake_quant(torch.zeros(3, 6), 4, group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        fake_quant(torch.zeros(3, 6), 4, group_size=0)
    with pytest.raises(ValueError, match="feature"):
        fake_quant(torch.zeros(3, 6), 4, token_dim=-1)
    with pytest.raises(ValueError, match="high_tokens"):
        TokenBits(-1)
    with pytest.raises(ValueError, match="high_bits"):
        TokenBits(4, 20, 4)


def test_token_bits_vector_and_average():
    assert TokenBits(2, 8, 4).vector(5) == [8, 8, 4, 4, 4]
    assert TokenBits(64, 8, 4).average(2048) == pytest.approx(4.125)
    assert TokenBits(64, 8, 4).average(4096) == pytest.approx(4.0625)
    assert token_bit_vector(TokenBits(9), 3) == [8, 8, 8]
    assert math.isclose(TokenBits(0).average(10), 4.0)


# -- clipping -----------------------------------------------------------------------------------


@given(
    length=seq_lengths, seed=seeds, symmetric=st.booleans(), bits=st.integers(2, 8),
    ratio=st.floats(0.3, 1.0),
)  # fmt: skip
def test_clip_shrinks_the_range_and_saturates(length, seed, symmetric, bits, ratio):
    x = randn((2, length, 16), seed) * 3
    y = fake_quant(x, bits, symmetric=symmetric, clip=ratio)
    params = compute_qparams(x, bits, symmetric=symmetric, clip=ratio)
    ulp = torch.finfo(torch.float32).eps * x.abs().amax().clamp_min(1e-30)
    slack = HALF_STEP_SLACK_ULPS * ulp
    if symmetric:
        lo = -x.abs().amax(-1, keepdim=True) * ratio
        hi = -lo
    else:
        lo, hi = x.amin(-1, keepdim=True) * ratio, x.amax(-1, keepdim=True) * ratio
    # Never wider than the clipped range [lo*c, hi*c]: what lies outside saturates at its edge.
    assert bool(((y >= lo - slack) & (y <= hi + slack)).all())
    # Inside it, the error is within half of the (smaller) step.
    inside = (x >= lo) & (x <= hi)
    step = params.scale.squeeze(-1)
    assert bool(((y - x).abs()[inside] <= (step / 2 + slack).expand_as(x)[inside]).all())


@given(length=seq_lengths, seed=seeds, symmetric=st.booleans(), group=st.sampled_from([None, 4]))
def test_clip_of_one_is_min_max_exactly(length, seed, symmetric, group):
    x = randn((length, 16), seed)
    plain = fake_quant(x, 4, symmetric=symmetric, group_size=group)
    assert torch.equal(fake_quant(x, 4, symmetric=symmetric, group_size=group, clip=1.0), plain)
    ones = [1.0] * length
    assert torch.equal(fake_quant(x, 4, symmetric=symmetric, group_size=group, clip=ones), plain)


def test_per_token_clip_applies_along_the_token_dim():
    x = randn((3, 10, 8), 5) * 4
    clip = [1.0] * 5 + [0.6] * 5
    y = fake_quant(x, 4, token_dim=1, clip=clip)
    assert torch.equal(y[:, :5], fake_quant(x[:, :5], 4, token_dim=1))
    assert torch.equal(y[:, 5:], fake_quant(x[:, 5:], 4, token_dim=1, clip=0.6))


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), "0.9", True])
def test_bad_clip_ratios_raise(bad):
    with pytest.raises(ValueError, match=r"clip.*\(0, 1\]"):
        fake_quant(randn((4, 8), 0), 4, clip=bad)
    with pytest.raises(ValueError, match=r"clip.*\(0, 1\]"):
        fake_quant(randn((4, 8), 0), 4, clip=[1.0, 1.0, bad, 1.0])
    with pytest.raises(ValueError, match="clip has 2 entries but the sequence has 4"):
        fake_quant(randn((4, 8), 0), 4, clip=[0.9, 0.9])
