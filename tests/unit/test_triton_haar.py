"""The hand-written Triton Haar kernel (lowering/triton_haar.py) against the reference.

Without CUDA the kernel runs in the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before
``@triton.jit`` decorates it, i.e. before ``stamp_fx.lowering.triton_haar`` is first imported.
This module sets it at collection time (nothing imports the kernel module earlier: the lowering
registry imports it lazily). Triton itself may already be imported by then (Inductor imports it
when the compile tests are collected); that is fine because the kernel calls only device
functions of its own module, none of triton.language's pre-decorated helpers. With CUDA the
same tests run compiled on the GPU.

Integer codes and q/dq values (the kernel's test probe) must equal the reference exactly; the
output, computed from them by the inverse transform, within tests/tolerances.py's fused-kernel
tolerance (in the interpreter it is in fact bit-identical).
"""

import pytest
import torch

from tests.triton_interpreter import select_interpreter

select_interpreter("stamp_fx.lowering.triton_haar")


from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from stamp_fx.lowering import haar_ops, triton_haar  # noqa: E402, F401 (haar_ops: the ops)
from stamp_fx.lowering.haar_rows import MAX_ROWS_LEVELS  # noqa: E402
from stamp_fx.lowering.symbolic import haar_levels  # noqa: E402
from stamp_fx.lowering.triton_common import CHUNK_BLOCK  # noqa: E402

from stamp_fx import SitePolicy  # noqa: E402
from stamp_fx.quantizer import compute_qparams, dequantize, quantize  # noqa: E402
from stamp_fx.reference import transformed_tokens  # noqa: E402
from tests.strategies import randn, seeds  # noqa: E402
from tests.tolerances import FUSED_OUTPUT_ABS_F32_ULPS, FUSED_OUTPUT_ULPS  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Small enough for the interpreter (it runs every program in NumPy), with the awkward lengths.
short_lengths = st.one_of(st.integers(1, 9), st.sampled_from([31, 33, 63, 65, 100, 129]))


@st.composite
def kernel_cases(draw):
    """Shape, policy and kernel variant, drawing only combinations the kernel accepts: the
    ``rows`` variant takes at most ``MAX_ROWS_LEVELS`` levels, so where the levels (explicit, or
    auto for the length and target) are deeper only ``slab`` is drawn. The refusal has its own
    test (``test_rows_variant_refuses_deeper_tiles``)."""
    seq = draw(short_lengths)
    levels = draw(st.none() | st.integers(0, 4))
    sinks = draw(st.integers(0, 2))
    high_tokens = max(draw(st.integers(1, 12)), sinks)
    resolved = haar_levels(max(1, seq - sinks), -1 if levels is None else levels, high_tokens)
    variants = ["rows", "slab"] if resolved <= MAX_ROWS_LEVELS else ["slab"]
    return {
        "seq": seq,
        "levels": levels,
        "sinks": sinks,
        "high_tokens": high_tokens,
        "variant": draw(st.sampled_from(variants)),
    }


def reference_codes(x: torch.Tensor, policy: SitePolicy):
    """Integer codes and q/dq values of the quantized sequence, as the reference makes them."""
    t = policy.make_transform()
    z = transformed_tokens(x, t, sink_tokens=policy.sink_tokens, seq_dim=-2)
    bits = policy.bit_vector(t, x.shape[-2])
    params = compute_qparams(z, bits, token_dim=-2, symmetric=policy.symmetric)
    codes = quantize(z, params)
    return codes.flatten(-2), dequantize(codes, params, z.dtype)


def assert_fused_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    f32_ulp = torch.finfo(torch.float32).eps
    rtol = FUSED_OUTPUT_ULPS[out.dtype] * torch.finfo(out.dtype).eps
    atol = FUSED_OUTPUT_ABS_F32_ULPS * f32_ulp * ref.float().abs().max().item()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


def run_probe(x, policy, **kwargs):
    levels = policy.make_transform().levels_for(max(1, x.shape[-2] - policy.sink_tokens))
    return triton_haar.haar_fake_quant_probe(
        x, levels, policy.sink_tokens, policy.high_tokens, policy.high_bits, policy.low_bits,
        policy.symmetric, **kwargs,
    )  # fmt: skip


@settings(max_examples=15)
@given(
    batch=st.sampled_from([(1,), (2,), (2, 2)]),
    case=kernel_cases(),
    features=st.sampled_from([1, 3, 8, 24, 40, 72]),
    symmetric=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    split_features=st.booleans(),
    seed=seeds,
)
# Issue 14's case (6 auto levels), on the kernel that takes it.
@example(
    batch=(1,),
    case={"seq": 63, "levels": None, "sinks": 0, "high_tokens": 1, "variant": "slab"},
    features=1,
    symmetric=False,
    dtype=torch.float32,
    split_features=False,
    seed=0,
)
def test_kernel_codes_are_exact_and_output_matches_reference(
    batch, case, features, symmetric, dtype, split_features, seed
):
    seq, variant = case["seq"], case["variant"]
    policy = SitePolicy(
        levels=case["levels"],
        sink_tokens=case["sinks"],
        high_tokens=case["high_tokens"],
        symmetric=symmetric,
    )
    x = randn((*batch, seq, features), seed, dtype).to(DEVICE)
    # A narrow block_d splits the features over 2-3 programs per tile: the multi-chunk schedule
    # (the rows kernel takes multiples of 32 features, the slab kernel of 16).
    block_d = (32 if variant == "rows" else 16) if split_features else None
    out, codes, z_hat = run_probe(x, policy, block_d=block_d, variant=variant)
    ref_codes, ref_z_hat = reference_codes(x, policy)
    rows = ref_codes.reshape(-1, *ref_codes.shape[-2:])
    assert torch.equal(codes, rows)
    assert torch.equal(z_hat, ref_z_hat.reshape(rows.shape))
    assert out.dtype == dtype and out.shape == x.shape
    assert_fused_close(out, policy.apply(x, -2))


def test_rows_variant_refuses_deeper_tiles():
    """``variant='rows'`` with more than MAX_ROWS_LEVELS levels, explicit or auto (63 tokens
    at target 1 resolve to 6), is refused with a clear error; ``auto`` and ``slab`` take it."""
    x = randn((1, 63, 1), 3).to(DEVICE)
    deeper = MAX_ROWS_LEVELS + 1
    assert haar_levels(63, -1, 1) == deeper  # the premise: auto levels past the rows kernel
    message = f"variant: 'rows' takes up to {MAX_ROWS_LEVELS} levels .* got {deeper} levels"
    with pytest.raises(ValueError, match=message):
        triton_haar.haar_fake_quant_probe(x, deeper, 0, 1, variant="rows")
    with pytest.raises(ValueError, match=message):
        triton_haar.haar_fake_quant(x, -1, 0, 1, variant="rows")
    policy = SitePolicy(sink_tokens=0, high_tokens=1)
    for variant in ("auto", "slab"):
        out = triton_haar.haar_fake_quant(x, -1, 0, 1, variant=variant)
        assert_fused_close(out, policy.apply(x, 1))


@pytest.mark.parametrize("variant", ["rows", "slab"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_schedules_agree_bit_for_bit(symmetric, variant):
    x = randn((2, 77, 80), 7, torch.bfloat16).to(DEVICE)
    args = (3, 1, 9, 8, 4, symmetric)
    kw = {"variant": variant}
    local = triton_haar.haar_fake_quant(*(x, *args), block_d=128, schedule="local", **kw)
    split = triton_haar.haar_fake_quant(*(x, *args), block_d=32, schedule="split", **kw)
    assert torch.equal(local, split)
    policy = SitePolicy(levels=3, sink_tokens=1, high_tokens=9, symmetric=symmetric)
    assert torch.equal(local, policy.apply(x, 1))


@pytest.mark.parametrize("variant", ["rows", "slab"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_ranges_of_more_chunks_than_one_fold_step(symmetric, variant):
    """70 feature slabs per tile: the parameter fold reads the partial ranges in steps of
    CHUNK_BLOCK, the last one partial; codes must still equal the reference's."""
    chunks = 2 * int(CHUNK_BLOCK) + 6
    x = randn((1, 9, 32 * chunks - 5), 11, torch.float32).to(DEVICE)
    policy = SitePolicy(levels=2, sink_tokens=1, high_tokens=3, symmetric=symmetric)
    out, codes, z_hat = run_probe(x, policy, block_d=32, schedule="split", variant=variant)
    ref_codes, ref_z_hat = reference_codes(x, policy)
    assert torch.equal(codes, ref_codes.reshape(codes.shape))
    assert torch.equal(z_hat, ref_z_hat.reshape(z_hat.shape))
    assert_fused_close(out, policy.apply(x, -2))


def test_rounding_ties_match_the_reference_division():
    """A value whose quotient by the scale is exactly 13.5 (rounds to 14) while its product
    with the rounded reciprocal is 13.499999 (rounds to 13): the kernel multiplies by the
    reciprocal and must notice the tie and divide, like the reference."""
    scale = torch.tensor(1.0) / 7
    hi = scale * 15  # (hi - 0) / 15 == scale again, at 4 bits
    tie = 13.5 * (hi / 15)
    assert torch.round(tie / scale) != torch.round(tie * (1 / scale))  # the premise
    row = torch.stack([torch.tensor(0.0), tie, hi]).repeat(8)
    x = row.repeat(1, 4, 1).to(DEVICE)  # 4 identical tokens, no transform (levels=0)
    out, codes, _ = triton_haar.haar_fake_quant_probe(x, 0, 0, 0, 8, 4, False)
    assert codes[0, 0, 1].item() == 14.0
    assert torch.equal(out, SitePolicy(levels=0, high_tokens=0).apply(x, 1))


def test_auto_levels_and_the_paper_default():
    """levels=-1 resolves like SitePolicy (target max(1, high_tokens)): 300 tokens, 64 at 8 bit."""
    x = randn((1, 300, 16), 11).to(DEVICE)
    out = triton_haar.haar_fake_quant(x, -1, 1, 64, 8, 4, False)
    torch.testing.assert_close(out, SitePolicy(sink_tokens=1).apply(x, 1), rtol=0, atol=0)


def test_op_is_a_registered_triton_op():
    x = randn((2, 19, 8), 2).to(DEVICE)
    out = torch.ops.stamp.haar_fake_quant(x, 2, 1, 4, 8, 4, False, -1)
    assert torch.equal(out, SitePolicy(levels=2, sink_tokens=1, high_tokens=4).apply(x, 1))


def test_eligibility_routes_only_the_default_haar_case():
    x = torch.zeros(2, 64, 8, device=DEVICE)
    assert triton_haar.eligible(x, SitePolicy(sink_tokens=1), 1)
    assert triton_haar.eligible(x, SitePolicy(symmetric=True), -2)
    assert not triton_haar.eligible(x, SitePolicy(transform="dct"), 1)
    assert not triton_haar.eligible(x, SitePolicy(group_size=4), 1)
    assert not triton_haar.eligible(x, SitePolicy(levels=triton_haar.MAX_LEVELS + 1), 1)
    assert not triton_haar.eligible(x.view(2, 64, 2, 4), SitePolicy(), 1)  # seq not at dim -2
    assert not triton_haar.eligible(x.double(), SitePolicy(), 1)


def test_invalid_arguments_raise_clear_errors():
    x = torch.zeros(1, 8, 4, device=DEVICE)
    with pytest.raises(ValueError, match="levels"):
        triton_haar.haar_fake_quant(x, triton_haar.MAX_LEVELS + 1)
    with pytest.raises(ValueError, match="schedule"):
        triton_haar.haar_fake_quant(x, 1, schedule="fast")
    with pytest.raises(ValueError, match="one feature slab"):
        triton_haar.haar_fake_quant(
            torch.zeros(1, 8, 64, device=DEVICE), 1, block_d=32, schedule="local"
        )
    with pytest.raises(ValueError, match="variant"):
        triton_haar.haar_fake_quant(x, 1, variant="fastest")
    with pytest.raises(ValueError, match="block_d.*multiples of 32"):
        triton_haar.haar_fake_quant(torch.zeros(1, 8, 64, device=DEVICE), 1, block_d=48)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        triton_haar.haar_fake_quant(x.double(), 1)
    if triton_haar.interpreted():
        with pytest.raises(ValueError, match="interpreter"):
            triton_haar.haar_fake_quant(torch.zeros(1, 8, 64), 1, block_d=32, schedule="fused")


def test_kernels_call_no_triton_standard_library_helpers():
    """triton.language.standard's helpers (tl.cdiv, tl.max, ...) are @triton.jit functions
    decorated when triton is first imported; called from an interpreted kernel they fail when
    triton was imported before TRITON_INTERPRET=1 (the whole suite imports Inductor first).
    The kernels must use builtins and this package's own device functions only."""
    import inspect
    import re

    import triton.language.standard as standard
    from stamp_fx.lowering import haar_grid, haar_rows, haar_slab, triton_common

    helpers = {name for name, obj in vars(standard).items() if hasattr(obj, "fn")}
    assert {"cdiv", "max", "min", "sum"} <= helpers  # the premise: these are jit helpers
    for module in (triton_haar, haar_rows, haar_grid, haar_slab, triton_common):
        called = set(re.findall(r"\btl\.(\w+)\(", inspect.getsource(module)))
        assert not called & helpers, (module.__name__, called & helpers)


@pytest.mark.parametrize("shape", [(3, 40, 32), (2, 2, 33, 16)])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_masked_kernel_op_equals_the_padded_reference(shape, padding):
    """Padded batches on the kernel: each row's real tokens are a sequence of their own."""
    from stamp_fx.ops import masked_apply

    x = randn(shape, 11, torch.float32).to(DEVICE)
    batch, seq = shape[0], shape[-2]
    mask = torch.ones(batch, seq, dtype=torch.long, device=DEVICE)
    if padding == "left":
        mask[0, :7], mask[-1, :1] = 0, 0
    elif padding == "right":
        mask[0, -9:] = 0
    policy = SitePolicy(sink_tokens=1, high_tokens=4)
    ref = masked_apply(policy, x, mask, len(shape) - 2)
    out = torch.ops.stamp.haar_fake_quant_masked(x, mask, -1, 1, 4, 8, 4, False, -1)
    if DEVICE == "cpu":
        assert torch.equal(out, ref)
    else:
        assert_fused_close(out, ref)


def test_every_haar_kernel_op_passes_the_gradient_straight_through():
    """Each op gets its gradient count from its schema (a hand count went stale when the ops
    gained ``depth_target``, and backward raised)."""
    x = randn((2, 1 + 4 * 4, 8), 9).to(DEVICE).requires_grad_()
    mask = torch.ones(2, 17, dtype=torch.long, device=x.device)
    policy_args = (1, 4, 8, 4, False, -1)  # sinks .. depth_target, after the levels
    calls = (
        lambda: torch.ops.stamp.haar_fake_quant(x, 2, *policy_args),
        lambda: torch.ops.stamp.haar2d_fake_quant(x, 4, 4, 1, *policy_args),
        lambda: torch.ops.stamp.haar_fake_quant_dynamic(x, -1, *policy_args),
        lambda: torch.ops.stamp.haar_fake_quant_masked(x, mask, -1, *policy_args),
    )
    for call in calls:
        x.grad = None
        call().sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))
