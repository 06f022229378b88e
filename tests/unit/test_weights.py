"""Weight quantizer properties (RTN grid, MSE clip search) and its option validation."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stamp_fx.weights import (
    WeightQuantConfig,
    clip_ratios,
    fake_quant_weight,
    rtn_quantize,
    weight_qparams,
)
from tests.tolerances import HALF_STEP_SLACK_ULPS, IDEMPOTENT_RTOL


@st.composite
def weights(draw):
    rows = draw(st.integers(1, 6))
    group = draw(st.sampled_from([1, 3, 4, 8, 12]))
    n_groups = draw(st.integers(1, 4))
    per_group = draw(st.booleans())
    bits = draw(st.sampled_from([4, 8]))
    symmetric = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, group * n_groups, generator=gen, dtype=dtype)
    if draw(st.booleans()):  # a few outliers, where clipping matters
        w = w * (1 + 20 * (torch.rand(w.shape, generator=gen, dtype=dtype) > 0.9))
    if draw(st.booleans()):
        w = w.abs() + 0.5  # all-positive rows: the range must still hold zero
    return w, (group if per_group else None), bits, symmetric


@given(weights())
def test_error_within_half_a_step(case):
    w, group, bits, symmetric = case
    scale, zero, qmin, qmax, ratio = weight_qparams(
        w, bits, group_size=group, symmetric=symmetric, clip_search=False
    )
    assert torch.all(ratio == 1.0)
    w_hat = fake_quant_weight(w, scale, zero, qmin, qmax)
    n_groups = scale.shape[1]
    err = (w_hat - w).abs().unflatten(1, (n_groups, -1))
    eps = torch.finfo(w.dtype).eps * HALF_STEP_SLACK_ULPS
    bound = scale / 2 + eps * w.abs().unflatten(1, (n_groups, -1)).amax(-1, keepdim=True)
    assert torch.all(err <= bound), float((err - bound).max())


@given(weights(), st.booleans())
def test_idempotent(case, clip):
    w, group, bits, symmetric = case
    cfg = WeightQuantConfig(bits=bits, group_size=group, symmetric=symmetric, clip_search=clip)
    once, _ = rtn_quantize(w, cfg)
    twice, _ = rtn_quantize(once, cfg)
    torch.testing.assert_close(twice, once, rtol=IDEMPOTENT_RTOL, atol=IDEMPOTENT_RTOL)


@given(weights())
def test_group_shapes_and_levels(case):
    w, group, bits, symmetric = case
    scale, zero, qmin, qmax, ratio = weight_qparams(w, bits, group_size=group, symmetric=symmetric)
    n_groups = 1 if group is None else w.shape[1] // group
    assert scale.shape == zero.shape == ratio.shape == (w.shape[0], n_groups, 1)
    assert (qmin, qmax) == (
        (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    )
    w_hat = fake_quant_weight(w, scale, zero, qmin, qmax)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    codes = torch.round(w_hat.unflatten(1, (n_groups, -1)).to(scale.dtype) / scale) + zero
    assert torch.all((codes >= qmin) & (codes <= qmax))
    for r in range(w.shape[0]):
        for g in range(n_groups):
            size = w.shape[1] // n_groups
            assert w_hat[r, g * size : (g + 1) * size].unique().numel() <= 2**bits
    if group is not None and n_groups > 1:  # groups are independent of each other
        w2 = w.clone()
        w2[:, :group] *= 7.0
        again = fake_quant_weight(
            w2, *weight_qparams(w2, bits, group_size=group, symmetric=symmetric)[:4]
        )
        assert torch.equal(again[:, group:], w_hat[:, group:])


@given(weights())
def test_clip_never_widens_and_never_hurts(case):
    w, group, bits, symmetric = case
    plain = weight_qparams(w, bits, group_size=group, symmetric=symmetric, clip_search=False)
    clipped = weight_qparams(w, bits, group_size=group, symmetric=symmetric, clip_search=True)
    grid = torch.tensor(clip_ratios(), dtype=clipped[4].dtype)
    ratio = clipped[4]
    assert torch.all(ratio <= 1.0) and torch.all(ratio >= 0.5)
    assert torch.all((ratio.unsqueeze(-1) - grid).abs().amin(-1) < 1e-6)  # from the grid
    assert torch.all(clipped[0] <= plain[0] * (1 + 1e-6))  # step (so range) never grows
    n_groups = plain[0].shape[1]

    def group_err(params):
        e = (fake_quant_weight(w, *params[:4]) - w).double().square()
        return e.unflatten(1, (n_groups, -1)).sum(-1)

    assert torch.all(group_err(clipped) <= group_err(plain) * (1 + 1e-6) + 1e-30)


def test_clip_search_helps_outliers():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    w[:, 0] *= 12  # one outlier column per row
    plain, _ = rtn_quantize(w, WeightQuantConfig(bits=4, group_size=None, clip_search=False))
    clipped, stats = rtn_quantize(w, WeightQuantConfig(bits=4, group_size=None))
    assert stats["mean_clip_ratio"] < 1.0
    assert (clipped - w).norm() < 0.98 * (plain - w).norm()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 3}, r"weight_bits: must be one of 4, 8"),
        ({"bits": 16}, r"weight_bits: must be one of 4, 8"),
        ({"bits": True}, r"weight_bits"),
        ({"group_size": 0}, r"weight_group_size"),
        ({"method": "awq"}, r"method: .*valid: rtn, gptq"),
        ({"damp": 0.0}, r"damp"),
        ({"min_ratio": 1.5}, r"min_ratio"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightQuantConfig(**kwargs)


def test_group_must_divide_columns():
    with pytest.raises(ValueError, match="weight_group_size 128 does not divide the 576"):
        rtn_quantize(torch.randn(4, 576), WeightQuantConfig(group_size=128))
