"""The ``inductor`` lowering (lowering/decompositions.py) through CPU Inductor.

On the CPU Inductor's C++ divides exactly and never contracts multiply-adds, so the compiled
decomposition must equal the reference bit for bit. Compiles are the slow part (a few seconds
each): hypothesis examples put several sites in one graph so one compile checks several configs.
"""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stamp_fx.lowering import available_lowerings, get_lowering
from stamp_fx.lowering.decompositions import (
    decomposable_transforms,
    stamp_fake_quant_traceable,
    token_qmax,
)
from torch._inductor.utils import run_and_get_code

from stamp_fx import SitePolicy, SpectralBitPlan, StampCompiler, StampConfig
from stamp_fx.ops import op_args
from tests import models
from tests.helpers import assert_no_worse_than_eager, compile_and_run
from tests.strategies import randn, seeds, seq_lengths

INDUCTOR = get_lowering("inductor")

bands = st.sampled_from(
    [None, SpectralBitPlan((0.25, 1.0), (8, 4)), SpectralBitPlan((0.1, 0.35, 1.0), (8, 6, 3))]
)
policies = st.builds(
    SitePolicy,
    transform=st.sampled_from(["identity", "haar", "dct", "wht"]),
    levels=st.none() | st.integers(0, 3),
    sink_tokens=st.integers(0, 2),
    high_tokens=st.integers(1, 9),
    high_bits=st.sampled_from([8, 6]),
    low_bits=st.sampled_from([4, 3, 2]),
    bands=bands,
    symmetric=st.booleans(),
    group_size=st.none() | st.just(4),
    clip_ratio=st.sampled_from([1.0, 0.9, 0.7]),
    high_clip_ratio=st.sampled_from([1.0, 0.95]),
)
# (shape builder, seq_dim): [B, S, D] linear inputs, [B, H, S, Dh] attention K/V, bare [S, D],
# and a transposed (non-contiguous) [B, S, D].
layouts = st.sampled_from(["bsd", "bhsd", "sd", "transposed"])


def make_input(layout: str, seq: int, seed: int, dtype: torch.dtype):
    if layout == "bsd":
        return randn((2, seq, 8), seed, dtype), 1
    if layout == "bhsd":
        return randn((1, 2, seq, 4), seed, dtype), 2
    if layout == "sd":
        return randn((seq, 12), seed, dtype), 0
    return randn((2, 8, seq), seed, dtype).transpose(1, 2), 1


def fake_quant(x, policy, seq_dim):
    return torch.ops.stamp.fake_quant(x, *op_args(policy, seq_dim), None)


def compiled(fn, **kwargs):
    torch._dynamo.reset()
    return torch.compile(fn, backend=INDUCTOR.compile_fx, **kwargs)


def stamp_lines(code: str) -> list[str]:
    """Lines of generated code that call into a stamp:: op (comments excluded)."""
    return [
        line for line in code.splitlines() if "stamp" in line and not line.lstrip().startswith("#")
    ]


# -- the decomposition itself, eagerly (cheap: many examples) ------------------------------------


@given(policy=policies, layout=layouts, seq=seq_lengths, seed=seeds)
def test_traceable_decomposition_equals_reference_eagerly(policy, layout, seq, seed):
    x, seq_dim = make_input(layout, seq, seed, torch.float32)
    out = stamp_fake_quant_traceable(x, policy, seq_dim)
    assert out.is_contiguous()
    assert torch.equal(out, policy.apply(x, seq_dim))


def test_bits_follow_the_policy_bit_vector():
    policy = SitePolicy(sink_tokens=2, bands=SpectralBitPlan((0.1, 0.35, 1.0), (8, 6, 3)))
    for coeffs in (1, 7, 40, 129):
        qmax = token_qmax(policy, 2, coeffs, device=torch.device("cpu"), dtype=torch.float32)
        bits = policy.quantized_bits(2 + coeffs, 2)
        assert qmax.tolist() == [float(2**b - 1) for b in bits]


# -- through Inductor ------------------------------------------------------------------------


@settings(max_examples=6)
@given(
    sites=st.lists(st.tuples(policies, layouts, seq_lengths), min_size=4, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=seeds,
)
def test_compiled_decomposition_is_bit_identical_to_reference(sites, dtype, seed):
    inputs = [make_input(layout, seq, seed + i, dtype) for i, (_, layout, seq) in enumerate(sites)]
    policies_ = [policy for policy, _, _ in sites]
    seq_dims = [seq_dim for _, seq_dim in inputs]

    def fn(xs):
        return [fake_quant(x, p, sd) for x, p, sd in zip(xs, policies_, seq_dims)]

    outs = compiled(fn)([x for x, _ in inputs])
    for (x, seq_dim), policy, out in zip(inputs, policies_, outs):
        assert out.dtype == x.dtype
        assert torch.equal(out, policy.apply(x, seq_dim)), policy.describe()


def test_haar2d_is_decomposed_with_sinks():
    policy = SitePolicy(transform="haar2d", grid=(4, 5), sink_tokens=1, high_tokens=4)
    x = randn((2, 21, 8), 3)
    out, (code,) = run_and_get_code(compiled(lambda t: fake_quant(t, policy, 1)), x)
    assert torch.equal(out, policy.apply(x, 1))
    assert not stamp_lines(code)


def test_generated_code_has_no_stamp_call_and_one_cpp_kernel_per_site():
    """Every decomposable transform becomes generated C++ only; ``klt`` stays an extern call."""
    names = sorted(set(decomposable_transforms()) - {"haar2d"})
    policies_ = [SitePolicy(transform=name, sink_tokens=1, high_tokens=8) for name in names]
    xs = [randn((2, 300, 64), i) for i in range(len(names))]

    def fn(xs):
        return [fake_quant(x, p, 1) for x, p in zip(xs, policies_)]

    outs, (code,) = run_and_get_code(compiled(fn), xs)
    for x, policy, out in zip(xs, policies_, outs):
        assert torch.equal(out, policy.apply(x, 1))
    assert not stamp_lines(code)
    # The only extern call left is the DCT's matmul with its (generated) matrix.
    calls = code.split("def call")[1]
    assert calls.count("extern_kernels.") == calls.count("extern_kernels.mm(") == 2
    # Inductor's C++ backend fuses transform, reduction, q/dq and inverse of every site into
    # generated kernel functions (loop nests over the padded tokens); none per op.
    kernels = set(re.findall(r"\bcpp_fused_\w+", code))
    assert 1 <= len(kernels) <= 2 * len(names), kernels


def test_klt_stays_an_extern_call_to_the_reference():
    from stamp_fx import token_autocorrelation

    x = randn((2, 24, 8), 0)
    autocorr = token_autocorrelation(x, 1)
    policy = SitePolicy(transform="klt", autocorr_key="autocorr", high_tokens=4)

    def fn(x, a):
        return torch.ops.stamp.fake_quant(x, *op_args(policy, 1), a)

    out, (code,) = run_and_get_code(compiled(fn), x, autocorr)
    assert torch.equal(out, policy.apply(x, 1, {"autocorr": autocorr}))
    assert any("stamp.fake_quant" in line for line in stamp_lines(code))


def test_dynamic_lengths_compile_once_across_auto_level_brackets():
    calls = []

    def backend(gm, example_inputs):
        calls.append(1)
        return INDUCTOR.compile_fx(gm, example_inputs)

    fixed = SitePolicy(levels=2, sink_tokens=1, high_tokens=4)
    auto = SitePolicy(levels=None, high_tokens=8)  # lengths 12..22 all give 1 level
    # The op's arguments built outside the traced function, as the stamp pass builds them
    # (constants of the graph): Dynamo tracing the policy's float attributes would make them
    # graph inputs, whose handling under dynamic=True is Dynamo's business, not the lowering's.
    fixed_args, auto_args = op_args(fixed, 1), op_args(auto, 1)

    def fn(x, y):
        stamp = torch.ops.stamp.fake_quant
        return stamp(x, *fixed_args, None), stamp(y, *auto_args, None)

    torch._dynamo.reset()
    run = torch.compile(fn, backend=backend, dynamic=True)
    for seq in (13, 18, 21):
        x, y = randn((2, seq + 24, 8), seq), randn((2, seq, 8), seq + 1)
        out_x, out_y = run(x, y)
        assert torch.equal(out_x, fixed.apply(x, 1))
        assert torch.equal(out_y, auto.apply(y, 1))
    assert len(calls) == 1
    # A length with another auto level count runs on the same graph: the auto-depth site is
    # an extern call that decides its depth per call (decomposing it would guard on the
    # bracket and recompile), the fixed-depth one stays generated code.
    x, y = randn((2, 40, 8), 0), randn((2, 30, 8), 1)
    out_x, out_y = run(x, y)
    assert torch.equal(out_x, fixed.apply(x, 1))
    assert torch.equal(out_y, auto.apply(y, 1))
    assert len(calls) == 1
    torch._dynamo.reset()
    _, (code,) = run_and_get_code(torch.compile(fn, backend=backend, dynamic=True), x, y)
    calls = [line for line in stamp_lines(code) if "= torch.ops.stamp.fake_quant" in line]
    assert len(calls) == 1 and "'haar', -1," in calls[0], calls


def test_triton_lowering_on_cpu_is_the_inductor_decomposition():
    policy = SitePolicy(levels=3, sink_tokens=1, high_tokens=8)
    x = randn((2, 45, 16), 5, torch.bfloat16)
    torch._dynamo.reset()
    run = torch.compile(
        lambda t: fake_quant(t, policy, 1), backend=get_lowering("triton").compile_fx
    )
    out, (code,) = run_and_get_code(run, x)
    assert torch.equal(out, policy.apply(x, 1))
    assert not stamp_lines(code) and "triton" not in code


def test_registry_lists_the_lowerings_and_rejects_unknown_names():
    assert {"auto", "reference", "inductor", "triton"} <= set(available_lowerings())
    with pytest.raises(ValueError, match="valid lowerings: auto, inductor, reference, triton"):
        get_lowering("cuda")
    with pytest.raises(ValueError, match="decomposable"):
        stamp_fake_quant_traceable(torch.zeros(2, 4), SitePolicy(transform="klt"), 0)


def test_llama_through_the_stamp_backend_with_the_inductor_kernel():
    model, inputs = models.llama(layers=1)
    compiler = StampCompiler(StampConfig(high_tokens=4), lowering="inductor")
    out = compile_and_run(model, inputs, compiler, fullgraph=True)
    assert_no_worse_than_eager(out, model, inputs, compiler.last.plan)
