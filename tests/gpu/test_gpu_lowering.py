"""GPU tier (``pytest -m gpu tests/gpu``): the lowerings on CUDA in bfloat16 and float16.

* The hand-written Triton kernel: integer codes and q/dq values equal to the reference run on
  the same GPU, bit for bit (its multiplies are PTX ``mul.rn``, never contracted into FMAs);
  the output within the fused-kernel tolerance; every schedule (local, fused, two-pass).
* The ``inductor`` decomposition through Inductor's Triton code: equal to the reference up to
  rounding ties (reciprocal multiplies and FMAs, see tests/tolerances.py).
* The ``triton`` lowering: the generated code launches the kernel (no call to a stamp op),
  agrees with the ``inductor`` lowering up to ties, and does not recompile for new lengths.
"""

import pytest
import torch
from stamp_fx.lowering import get_lowering
from torch._inductor.utils import run_and_get_code

from stamp_fx import SitePolicy, StampCompiler, StampConfig
from stamp_fx.ops import op_args
from stamp_fx.quantizer import compute_qparams, dequantize, quantize
from stamp_fx.reference import transformed_tokens
from tests.tolerances import FUSED_OUTPUT_ABS_F32_ULPS, FUSED_OUTPUT_ULPS, GPU_TIE_FRACTION

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.bfloat16, torch.float16]
# (shape, policy): the paper default with a sink, a symmetric site, length 1, a K/V-shaped
# input with a non-power-of-two length, and LLM-sized rows that take the fused schedule.
# (Every (levels, slab, flags) combination is a separate kernel compile, hence few cases.)
CASES = [
    ((2, 300, 64), SitePolicy(sink_tokens=1)),
    ((1, 129, 96), SitePolicy(levels=3, high_tokens=9, symmetric=True)),
    ((3, 1, 32), SitePolicy(sink_tokens=1)),
    ((1, 4, 77, 64), SitePolicy(levels=2, sink_tokens=1, high_tokens=16)),
    ((1, 2048, 4096), SitePolicy(sink_tokens=1)),
]


def randn(shape, seed, dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


def fake_quant(x, policy, seq_dim):
    return torch.ops.stamp.fake_quant(x, *op_args(policy, seq_dim), None)


def qparams(x, policy, seq_dim):
    t = policy.make_transform()
    z = transformed_tokens(x, t, sink_tokens=policy.sink_tokens, seq_dim=seq_dim)
    bits = policy.bit_vector(t, x.shape[seq_dim])
    params = compute_qparams(
        z, bits, token_dim=seq_dim, symmetric=policy.symmetric, group_size=policy.group_size
    )
    return z, params


def assert_fused_close(out, ref):
    rtol = FUSED_OUTPUT_ULPS[out.dtype] * torch.finfo(out.dtype).eps
    atol = FUSED_OUTPUT_ABS_F32_ULPS * torch.finfo(torch.float32).eps * ref.float().abs().max()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol.item())


def assert_close_up_to_ties(out, ref, x, policy, seq_dim):
    """All but GPU_TIE_FRACTION of the elements fused-close; none off by more than two steps."""
    _, params = qparams(x, policy, seq_dim)
    step = params.scale.max().item()
    rtol = FUSED_OUTPUT_ULPS[out.dtype] * torch.finfo(out.dtype).eps
    diff = (out.float() - ref.float()).abs()
    tol = rtol * ref.float().abs() + FUSED_OUTPUT_ABS_F32_ULPS * 1.2e-7 * ref.float().abs().max()
    assert (diff > tol).float().mean().item() <= GPU_TIE_FRACTION
    assert diff.max().item() <= 2 * step + tol.max().item()


def levels_of(x, policy):
    return policy.make_transform().levels_for(max(1, x.shape[-2] - policy.sink_tokens))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_kernel_is_exact_on_cuda(dtype, case):
    from stamp_fx.lowering import triton_haar

    shape, policy = CASES[case]
    x = randn(shape, case, dtype)
    levels = levels_of(x, policy)
    z, params = qparams(x, policy, -2)
    ref_codes = quantize(z, params).flatten(-2)
    ref_z_hat = dequantize(quantize(z, params), params, z.dtype)
    ref = policy.apply(x, -2)
    # Default tiling, then a narrow chunk (several programs per tile) with each schedule.
    narrow = max(32, shape[-1] // 4 // 32 * 32)
    runs = [("auto", None), ("split", narrow), ("fused", narrow)]
    for variant in ("rows", "slab"):
        for schedule, block_d in runs:
            out, codes, z_hat = triton_haar.haar_fake_quant_probe(
                x, levels, policy.sink_tokens, policy.high_tokens, policy.high_bits,
                policy.low_bits, policy.symmetric, block_d=block_d, schedule=schedule,
                variant=variant,
            )  # fmt: skip
            what = (variant, schedule, block_d)
            assert torch.equal(codes, ref_codes.reshape(codes.shape)), what
            assert torch.equal(z_hat, ref_z_hat.reshape(z_hat.shape)), what
            assert_fused_close(out, ref)


@pytest.mark.parametrize("variant", ["rows", "slab"])
def test_division_is_exact_at_near_ties(variant):
    """Millions of quotients within an ulp or two of a half-integer (no transform, so the
    quotient is the input's): the reciprocal multiply plus corrections must round like the
    reference's IEEE division every time."""
    from stamp_fx.lowering import triton_haar

    gen = torch.Generator(device="cuda").manual_seed(5)
    rows, feats = 4096, 1024
    scale = torch.rand(rows, 1, generator=gen, device="cuda") * 4 + 0.01
    k = torch.randint(0, 255, (rows, feats), generator=gen, device="cuda").float()
    x = (k + 0.5) * scale
    nudge = torch.randint(-2, 3, x.shape, generator=gen, device="cuda")
    x = torch.nextafter(x, torch.where(nudge > 0, torch.inf, -torch.inf).to(x)).where(nudge != 0, x)
    x[:, 0], x[:, 1] = 0.0, 255 * scale[:, 0]  # pin each row's range to [0, 255 * scale]
    x = x[None]
    policy = SitePolicy(levels=0, high_tokens=rows, high_bits=8)
    z, params = qparams(x, policy, -2)
    ref_codes = quantize(z, params).flatten(-2)
    _, codes, _ = triton_haar.haar_fake_quant_probe(x, 0, 0, rows, 8, 4, False, variant=variant)
    assert torch.equal(codes, ref_codes.reshape(codes.shape))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inductor_lowering_matches_reference_up_to_ties(dtype):
    sites = [
        ((2, 300, 64), SitePolicy(sink_tokens=1), 1),
        ((2, 4, 77, 32), SitePolicy(transform="dct", high_tokens=8), 2),
        ((2, 100, 64), SitePolicy(transform="wht", symmetric=True, group_size=16), 1),
        ((1, 2048, 512), SitePolicy(levels=5, bands=None, high_tokens=64), 1),
    ]
    xs = [randn(shape, i, dtype) for i, (shape, _, _) in enumerate(sites)]

    def fn(xs):
        return [fake_quant(x, p, sd) for x, (_, p, sd) in zip(xs, sites)]

    torch._dynamo.reset()
    outs, (code,) = run_and_get_code(
        torch.compile(fn, backend=get_lowering("inductor").compile_fx), xs
    )
    assert "stamp.fake_quant.default(" not in code
    for x, (_, policy, seq_dim), out in zip(xs, sites, outs):
        assert_close_up_to_ties(out, policy.apply(x, seq_dim), x, policy, seq_dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_lowering_launches_the_kernel_and_agrees_with_inductor(dtype):
    policy = SitePolicy(sink_tokens=1)
    x = randn((2, 2048, 4096), 3, dtype)

    def fn(t):
        return fake_quant(t, policy, 1)

    def two_sites(t):
        return fake_quant(t, policy, 1), fake_quant(t * 2, policy, 1)

    from stamp_fx.lowering.kernel_analysis import analysis_cache_info

    torch._dynamo.reset()
    before = analysis_cache_info()
    triton_fx = get_lowering("triton").compile_fx
    (out, twice), (code,) = run_and_get_code(torch.compile(two_sites, backend=triton_fx), x)
    assert "rows_kernel" in code  # 2048 tokens: 32-token tiles, the rows kernel
    assert "stamp.fake_quant.default(" not in code
    assert_fused_close(twice, policy.apply(x * 2, 1))
    # The second site's launches are the first's again: torch's analysis of them is cached.
    after = analysis_cache_info()
    assert after["hits"] - before["hits"] >= after["misses"] - before["misses"] > 0
    assert_fused_close(out, policy.apply(x, 1))
    torch._dynamo.reset()
    via_inductor = torch.compile(fn, backend=get_lowering("inductor").compile_fx)(x)
    assert_close_up_to_ties(out, via_inductor, x, policy, 1)


def test_triton_lowering_does_not_recompile_for_new_lengths():
    calls = []
    triton = get_lowering("triton")

    def backend(gm, inputs):
        calls.append(1)
        return triton.compile_fx(gm, inputs)

    policy = SitePolicy(levels=5, sink_tokens=1)
    args = op_args(policy, 1)  # built outside the traced function, as the stamp pass does

    def fn(t):
        return torch.ops.stamp.fake_quant(t, *args, None)

    run = torch.compile(fn, backend=backend, dynamic=True)
    x = randn((2, 1000, 1024), 0, torch.bfloat16)
    out, (code,) = run_and_get_code(run, x)  # (resets Dynamo first, so only for the first call)
    assert "rows_kernel" in code
    assert_fused_close(out, policy.apply(x, 1))
    for seq in (1500, 2047):
        x = randn((2, seq, 1024), seq, torch.bfloat16)
        assert_fused_close(run(x), policy.apply(x, 1))
    assert len(calls) == 1


def test_llama_through_the_stamp_backend_with_the_triton_kernel():
    from tests import models
    from tests.helpers import assert_no_worse_than_eager

    model, inputs = models.llama(layers=1, seq=40)
    model = model.cuda()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    compiler = StampCompiler(StampConfig(high_tokens=4), lowering="triton")
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=compiler, fullgraph=True)(**inputs).logits
    assert_no_worse_than_eager(out, model, inputs, compiler.last.plan)
