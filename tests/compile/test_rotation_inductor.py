"""Full-width feature rotations (``stamp::rotate``) through CPU Inductor and the eager FX path.

The decomposition is the reference's own torch code (butterflies, one matmul by the core, one
scale), so each compiled op must agree with eager bit for bit: CPU Inductor keeps the matmul an ATen
call on the same (contiguous) operands and does not reassociate the butterflies' adds.
"""

import pytest
import torch
from stamp_fx.lowering import get_lowering
from torch._inductor.utils import run_and_get_code

from stamp_fx import StampCompiler, StampConfig
from stamp_fx.rotations import feature_rotation
from tests import models
from tests.helpers import assert_no_worse_than_eager, compile_and_run, stamp_calls
from tests.strategies import randn

INDUCTOR = get_lowering("inductor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_rotation_equals_the_reference_bit_for_bit(dtype):
    import stamp_fx.ops  # noqa: F401  (registers stamp::rotate)

    widths = (48, 576, 7, 6, 1536)  # Paley I x 4, Paley II x 16, random dense, random x 2, 12 x 128
    xs = [randn((2, 5, w), i, dtype) for i, w in enumerate(widths)]

    blocks = [(w, inverse) for w in widths for inverse in (False, True)] + [(12, True)]
    inputs = [xs[i // 2] for i in range(2 * len(widths))] + [xs[0]]

    def fn(xs):
        # Independent ops in one graph (one compile): each decomposition against its reference.
        # Pointwise user code between two ops is Inductor's to fuse (and may then round
        # differently); the whole-model tests below hold that to the model-level rule.
        return [torch.ops.stamp.rotate(x, b, inv) for x, (b, inv) in zip(xs, blocks, strict=True)]

    torch._dynamo.reset()
    outs, codes = run_and_get_code(torch.compile(fn, backend=INDUCTOR.compile_fx), inputs)
    assert not stamp_calls("\n".join(codes)), stamp_calls("\n".join(codes))[:3]
    for x, (b, inverse), out in zip(inputs, blocks, outs, strict=True):
        ref = feature_rotation(x, b, inverse)
        assert out.dtype == dtype
        assert torch.equal(out, ref), (b, inverse, (out - ref).abs().max().item())


def _llama48():
    # hidden 48 = 12 x 4 (Paley I core), MLP 96 = 12 x 8: no power of two covers either.
    return models.llama(layers=1, hidden=48, heads=4, kv_heads=2, seq=20)


@pytest.mark.parametrize("block", ["full", 12])
def test_llama_with_an_odd_width_full_rotation(block):
    model, inputs = _llama48()
    config = StampConfig(
        high_tokens=4, feature_transform="hadamard", feature_block=block, quantize_kv=True
    )
    torch._dynamo.reset()
    compiler = StampCompiler(config)  # the default lowering
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    with torch.no_grad():
        out, codes = run_and_get_code(lambda: models.main_output(compiled(**inputs)))
    code = "\n".join(codes)
    assert not stamp_calls(code), stamp_calls(code)[:3]
    plan = compiler.last.plan
    assert plan.sites and all(p.feature_block == block for p in plan.sites.values())
    targets = [n.target for n in compiler.last.graph.graph.nodes]
    assert torch.ops.stamp.rotate.default in targets
    assert torch.ops.stamp.hadamard.default not in targets
    assert_no_worse_than_eager(out, model, inputs, plan)


def test_eager_fx_path_and_default_block_unchanged():
    model, inputs = _llama48()
    full = StampCompiler(
        StampConfig(high_tokens=4, feature_transform="hadamard", feature_block="full"),
        inductor=False,
    )
    out = compile_and_run(model, inputs, full)
    assert_no_worse_than_eager(out, model, inputs, full.last.plan)
    # The default block is the power of two (16 of 48): stamp::hadamard only, as before.
    default = StampCompiler(
        StampConfig(high_tokens=4, feature_transform="hadamard"), inductor=False
    )
    out_default = compile_and_run(model, inputs, default)
    targets = [n.target for n in default.last.graph.graph.nodes]
    assert torch.ops.stamp.hadamard.default in targets
    assert torch.ops.stamp.rotate.default not in targets
    assert {p.rotation_block(48) for p in default.last.plan.sites.values()} == {16}
    assert not torch.equal(out, out_default)  # the option changes what runs
