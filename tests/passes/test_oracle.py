"""Compiled models against the independent, name-based oracle (tests.helpers.config_plan):
the eager application of the config to every linear in the repeated blocks. A site the
analysis misses (or invents) changes the output and fails here, unlike a comparison with the
compiler's own plan."""

import pytest
import torch

from stamp_fx import StampCompiler, StampConfig
from tests import models
from tests.helpers import compile_and_run, config_plan, eager, eager_with_plan
from tests.tolerances import F32_REORDER_TOL, QUANTIZED_DIFFERS_ATOL

CASES = {
    "llama": dict(causal=True),
    "gpt2": dict(causal=True),
    "bert": dict(causal=False),
    "pixart": dict(causal=False, cross=(r".*\.attn2\.to_[kv]",)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_equals_the_name_based_oracle(name):
    model, inputs = models.FACTORIES[name]()
    config = StampConfig(high_tokens=3, low_bits=3, feature_transform="hadamard")
    compiler = StampCompiler(config, inductor=False)
    out = compile_and_run(model, inputs, compiler)
    oracle = config_plan(model, config, **CASES[name])
    assert set(compiler.merged_plan().sites) == set(oracle.sites)
    assert not torch.allclose(out, eager(model, inputs), atol=QUANTIZED_DIFFERS_ATOL)
    torch.testing.assert_close(out, eager_with_plan(model, inputs, oracle), **F32_REORDER_TOL)


def test_the_oracle_sees_a_linear_subclass_the_analysis_must_find():
    from tests.passes.test_linears import Stack, SubclassLinear

    torch.manual_seed(0)
    model = Stack(SubclassLinear(8, 8), SubclassLinear(8, 8)).eval()
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    config = StampConfig(high_tokens=2, low_bits=3)
    compiler = StampCompiler(config, inductor=False)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=compiler)(x)
    oracle = config_plan(model, config, causal=False)
    assert set(oracle.sites) == {"layers.0.proj:in", "layers.1.proj:in"}
    from stamp_fx import apply_plan_eager

    handles = apply_plan_eager(model, oracle)
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, expected, **F32_REORDER_TOL)
