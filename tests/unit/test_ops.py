"""The stamp:: custom op: opcheck (schema, fake impl, autograd registration) and reference equality."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from stamp_fx import SitePolicy, SpectralBitPlan
from stamp_fx.ops import op_args, policy_from_op_args
from tests.strategies import randn, seeds

policies = st.builds(
    SitePolicy,
    transform=st.sampled_from(["identity", "haar", "dct", "wht"]),
    levels=st.none() | st.integers(0, 3),
    sink_tokens=st.integers(0, 2),
    high_tokens=st.integers(2, 8),
    bands=st.none() | st.just(SpectralBitPlan((0.25, 1.0), (8, 4))),
    symmetric=st.booleans(),
    group_size=st.none() | st.just(4),
    clip_ratio=st.sampled_from([1.0, 0.8]),
    high_clip_ratio=st.sampled_from([1.0, 0.9]),
)


@given(policy=policies, seed=seeds, seq=st.integers(1, 40), transpose=st.booleans())
def test_op_equals_reference_and_round_trips_policy(policy, seed, seq, transpose):
    x = randn((2, seq, 8), seed)
    if transpose:  # a non-contiguous input, as attention K/V often are
        x = randn((2, 8, seq), seed).transpose(1, 2)
    args = op_args(policy, 1)
    out = torch.ops.stamp.fake_quant(x, *args, None)
    assert out.is_contiguous()
    assert torch.equal(out, policy.apply(x, 1))
    assert policy_from_op_args(*args[1:], False) == policy


def test_opcheck_passes_for_contiguous_and_strided_inputs():
    policy = SitePolicy(high_tokens=4, sink_tokens=1)
    for x in (torch.randn(2, 12, 8), torch.randn(2, 8, 12).transpose(1, 2)):
        torch.library.opcheck(torch.ops.stamp.fake_quant.default, (x, *op_args(policy, 1), None))


def test_gradient_is_straight_through():
    x = torch.randn(1, 10, 8, requires_grad=True)
    y = torch.ops.stamp.fake_quant(x, *op_args(SitePolicy(high_tokens=2), 1), None)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
