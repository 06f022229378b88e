"""The Haar kernel on square tiles of an image grid (haar2d) against the reference.

``transform="haar2d"`` is block-local like the 1-D Haar: a ``2**J x 2**J`` square of the padded
grid gives exactly its own ``4**J`` coefficients. The rows kernel takes such a square as one
tile (``grid=`` in :func:`stamp_fx.lowering.triton_haar.haar_fake_quant`,
``stamp::haar2d_fake_quant`` as an op). Integer codes and q/dq values (the kernel's probe)
must equal the reference's exactly, the output too (the inverse transform is the reference's
butterflies in its order). Without CUDA the kernel runs in the Triton interpreter.
"""

import pytest
import torch

from tests.triton_interpreter import select_interpreter

select_interpreter("stamp_fx.lowering.triton_haar")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from stamp_fx.lowering import haar_ops, triton_haar  # noqa: E402, F401 (haar_ops: the ops)

from stamp_fx import SitePolicy  # noqa: E402
from stamp_fx.quantizer import compute_qparams, dequantize, quantize  # noqa: E402
from stamp_fx.reference import transformed_tokens  # noqa: E402
from stamp_fx.transforms import auto_haar2d_levels  # noqa: E402
from tests.strategies import randn, seeds  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@st.composite
def grid_cases(draw):
    """A grid (sides not multiples of the tile side drawn often), a depth the kernel takes
    (explicit or auto), sinks and a high-token count (the LL band or not)."""
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    levels = draw(st.none() | st.integers(0, triton_haar.MAX_GRID_LEVELS))
    high_tokens = draw(st.integers(1, 10))
    if levels is None and auto_haar2d_levels(h, w, high_tokens) > triton_haar.MAX_GRID_LEVELS:
        levels = triton_haar.MAX_GRID_LEVELS
    return {"grid": (h, w), "levels": levels, "sinks": draw(st.integers(0, 2)),
            "high_tokens": high_tokens}  # fmt: skip


def policy_of(case, symmetric=False) -> SitePolicy:
    return SitePolicy(
        transform="haar2d", grid=case["grid"], levels=case["levels"],
        sink_tokens=case["sinks"], high_tokens=case["high_tokens"], symmetric=symmetric,
    )  # fmt: skip


def probe(x, policy: SitePolicy, **kwargs):
    levels = policy.make_transform().levels
    return triton_haar.haar_fake_quant_probe(
        x, levels, policy.sink_tokens, policy.high_tokens, policy.high_bits, policy.low_bits,
        policy.symmetric, grid=policy.grid, **kwargs,
    )  # fmt: skip


def reference_codes(x, policy: SitePolicy):
    t = policy.make_transform()
    z = transformed_tokens(x, t, sink_tokens=policy.sink_tokens, seq_dim=-2)
    params = compute_qparams(
        z, policy.bit_vector(t, x.shape[-2]), token_dim=-2, symmetric=policy.symmetric
    )
    codes = quantize(z, params)
    return codes, dequantize(codes, params, z.dtype)


@settings(max_examples=12)
@given(
    batch=st.sampled_from([(1,), (2,)]),
    case=grid_cases(),
    features=st.sampled_from([1, 5, 32, 40]),
    symmetric=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    split_features=st.booleans(),
    seed=seeds,
)
def test_grid_kernel_codes_and_output_equal_the_reference(
    batch, case, features, symmetric, dtype, split_features, seed
):
    policy = policy_of(case, symmetric)
    h, w = case["grid"]
    x = randn((*batch, case["sinks"] + h * w, features), seed, dtype).to(DEVICE)
    # block_d=32 splits 40 features over two programs per tile (the multi-chunk schedule).
    block_d = 32 if split_features else None
    out, codes, z_hat = probe(x, policy, block_d=block_d)
    ref_codes, ref_z_hat = reference_codes(x, policy)
    assert torch.equal(codes, ref_codes.reshape(codes.shape))
    assert torch.equal(z_hat, ref_z_hat.reshape(z_hat.shape))
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, policy.apply(x, -2))


def test_pixart_tile_depth_with_split_features_is_exact():
    """The 64-token tiles of a 3-level grid (PixArt's auto depth at 64 x 64), a ragged 20 x 13
    grid, one sink, features over three programs per tile."""
    policy = SitePolicy(transform="haar2d", grid=(20, 13), levels=3, sink_tokens=1, high_tokens=6)
    x = randn((1, 1 + 20 * 13, 72), 5, torch.bfloat16).to(DEVICE)
    out = triton_haar.haar_fake_quant(x, 3, 1, 6, 8, 4, False, grid=(20, 13), block_d=32)
    assert torch.equal(out, policy.apply(x, -2))


def test_op_is_registered_and_takes_auto_levels():
    x = randn((2, 1 + 6 * 10, 16), 3).to(DEVICE)
    out = torch.ops.stamp.haar2d_fake_quant(x, 6, 10, -1, 1, 4, 8, 4, False, -1)
    policy = SitePolicy(transform="haar2d", grid=(6, 10), sink_tokens=1, high_tokens=4)
    assert torch.equal(out, policy.apply(x, 1))
    # A depth target apart from high_tokens: a 16-token band (depth 1, not 2) with 4 tokens at 8.
    out = torch.ops.stamp.haar2d_fake_quant(x, 6, 10, -1, 1, 4, 8, 4, False, 16)
    policy = SitePolicy(
        transform="haar2d", grid=(6, 10), sink_tokens=1, high_tokens=4, depth_target=16
    )
    assert policy.make_transform().levels == 1  # the premise
    assert torch.equal(out, policy.apply(x, 1))


def test_eligibility_of_grid_sites():
    x = torch.zeros(2, 64, 8, device=DEVICE)
    site = SitePolicy(transform="haar2d", grid=(8, 8), high_tokens=4)
    assert triton_haar.eligible(x, site, 1)
    assert not triton_haar.eligible(x, SitePolicy(transform="haar2d", grid=(4, 8)), 1)
    too_deep = SitePolicy(transform="haar2d", grid=(8, 8), levels=triton_haar.MAX_GRID_LEVELS + 1)
    assert not triton_haar.eligible(x, too_deep, 1)
    grouped = SitePolicy(transform="haar2d", grid=(8, 8), group_size=4)
    assert not triton_haar.eligible(x, grouped, 1)
    # Auto depth past the kernel's: 64 x 64 tokens at target 1 is 6 levels.
    big = torch.zeros(1, 4096, 8, device=DEVICE)
    assert not triton_haar.eligible(
        big, SitePolicy(transform="haar2d", grid=(64, 64), high_tokens=1), 1
    )
    assert triton_haar.eligible(big, SitePolicy(transform="haar2d", grid=(64, 64)), 1)


def test_invalid_grid_arguments_raise_clear_errors():
    x = torch.zeros(1, 16, 8, device=DEVICE)
    with pytest.raises(ValueError, match="grid: \\(4, 5\\) holds 20 tokens"):
        triton_haar.haar_fake_quant(x, 1, grid=(4, 5))
    with pytest.raises(ValueError, match="levels: the Triton haar2d kernel takes 0..3"):
        triton_haar.haar_fake_quant(x, 4, grid=(4, 4))
    with pytest.raises(ValueError, match="variant: haar2d runs on the 'rows' kernel only"):
        triton_haar.haar_fake_quant(x, 1, grid=(4, 4), variant="slab")


@settings(max_examples=25)
@given(
    grid=st.none() | st.tuples(st.integers(1, 64), st.integers(1, 64)),
    levels=st.none() | st.integers(0, 8),
    sinks=st.integers(0, 3),
    high_tokens=st.integers(0, 128),
    depth_target=st.none() | st.integers(1, 256),
    bits=st.tuples(st.integers(2, 16), st.integers(2, 16)),
    symmetric=st.booleans(),
)
def test_kernel_arguments_decode_to_the_policy_they_encode(
    grid, levels, sinks, high_tokens, depth_target, bits, symmetric
):
    from stamp_fx.lowering.kernel_choice import _haar_kernel_args, haar_kernel_policy

    policy = SitePolicy(
        transform="haar" if grid is None else "haar2d", grid=grid, levels=levels,
        depth_target=depth_target, sink_tokens=sinks, high_tokens=high_tokens, high_bits=max(bits), low_bits=min(bits),
        symmetric=symmetric,
    )  # fmt: skip
    assert haar_kernel_policy(*_haar_kernel_args(policy), grid=grid) == policy


def test_dynamic_op_past_the_kernel_depth_runs_the_reference():
    """600 tokens at target 1 resolve to more Haar levels than the kernel takes: the dynamic op
    decodes its arguments back to the policy and runs the reference; 40 tokens run the kernel."""
    from stamp_fx.lowering.symbolic import haar_levels

    assert haar_levels(600, -1, 1) > triton_haar.MAX_LEVELS  # the premise
    for seq in (600, 40):
        x = randn((1, seq, 4), seq).to(DEVICE)
        out = torch.ops.stamp.haar_fake_quant_dynamic(x, -1, 1, 1, 8, 4, False, -1)
        assert torch.equal(out, SitePolicy(sink_tokens=1, high_tokens=1).apply_sequence(x, -2))
    # The depth follows depth_target, not high_tokens: 600 tokens at a 64-token band (3
    # levels, on the kernel) with one token at 8 bits.
    x = randn((1, 600, 4), 7).to(DEVICE)
    out = torch.ops.stamp.haar_fake_quant_dynamic(x, -1, 1, 1, 8, 4, False, 64)
    policy = SitePolicy(sink_tokens=1, high_tokens=1, depth_target=64)
    assert policy.make_transform().levels_for(599) <= triton_haar.MAX_LEVELS  # the premise
    assert torch.equal(out, policy.apply_sequence(x, -2))
