"""Through CPU Inductor: the compiled model matches the eager application of its plan within
DESIGN.md section 5's whole-model tolerance; dynamic lengths do not recompile."""

import torch

from stamp_fx import StampCompiler, StampConfig
from tests import models
from tests.helpers import assert_no_worse_than_eager, compile_and_run, eager_with_plan
from tests.tolerances import INDUCTOR_F32_TOL, QUANTIZED_DIFFERS_ATOL


def test_llama_through_inductor_dynamic_lengths_and_fullgraph():
    model, _ = models.llama()
    compiler = StampCompiler(StampConfig(high_tokens=4))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for seq in (12, 19, 33):
            inputs = {"input_ids": models._ids(2, seq, seq)}
            out = compiled(**inputs).logits
            assert_no_worse_than_eager(out, model, inputs, compiler.last.plan)
    assert len(compiler.records) == 1
    assert compiler.last.passes[0].stats["stamp_ops"] == 8


def test_pixart_through_inductor():
    model, inputs = models.pixart()
    compiler = StampCompiler(StampConfig(high_tokens=4, quantize_kv=True))
    out = compile_and_run(model, inputs, compiler, fullgraph=True)
    plan = compiler.last.plan
    assert len(plan.sites) == 28  # 20 linear inputs + K/V of 4 attention calls
    assert_no_worse_than_eager(out, model, inputs, plan)
    torch.testing.assert_close(out, eager_with_plan(model, inputs, plan), **INDUCTOR_F32_TOL)


def test_fx_graph_cache_hits_on_a_second_compile():
    from torch._dynamo.utils import counters

    model, inputs = models.llama(layers=1)
    with torch._inductor.config.patch(fx_graph_cache=True):
        compile_and_run(model, inputs, StampCompiler(StampConfig(high_tokens=4)))
        counters.clear()
        compile_and_run(model, inputs, StampCompiler(StampConfig(high_tokens=4)))
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1
    assert counters["inductor"]["fxgraph_cache_bypass"] == 0


def test_chains_and_unflattened_mlp_sites_through_inductor_dynamic():
    """The nodes the pass creates for a layout chain and for an unflattened [B*S, F] site
    (symbolic sizes) lower through Inductor, equal to the eager run of the same graph."""
    from tests.passes.test_linears import FlattenedGeluMLP, FlattenedMLP, Stack

    torch.manual_seed(0)
    model = Stack(FlattenedMLP(), FlattenedGeluMLP()).eval()
    config = StampConfig(high_tokens=2, low_bits=3)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(b, s, 8, generator=gen) for b, s in ((2, 6), (3, 9))]
    outs = {}
    for name, compiler in (
        ("fast", StampCompiler(config)),
        ("slow", StampCompiler(config, inductor=False)),
    ):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=compiler, dynamic=True, fullgraph=True)
        with torch.no_grad():
            outs[name] = [compiled(x) for x in xs]
        assert len(compiler.records) == 1  # no recompile for the second shape
        if name == "fast":
            fast = compiler
    for x, out, ref in zip(xs, outs["fast"], outs["slow"], strict=True):
        torch.testing.assert_close(out, ref, **INDUCTOR_F32_TOL)
        with torch.no_grad():
            assert not torch.allclose(out, model(x), atol=QUANTIZED_DIFFERS_ATOL)  # quantized
    assert set(fast.last.plan.sites) == {
        "layers.0.proj.fc:in", "layers.1.proj.fc1:in", "layers.1.proj.fc2:in"
    }  # fmt: skip
