"""bf16 / fp16 whole models and backward through CPU Inductor (issue 12 item 5); the eager-graph
twins are in tests/passes/test_dtypes_autograd.py."""

from __future__ import annotations

import copy

import pytest
import torch

from stamp_fx import StampCompiler, StampConfig
from tests import models
from tests.helpers import assert_no_worse_than_eager, config_plan
from tests.passes.test_dtypes_autograd import CONFIG, _compiled_grads, _grads, _loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_through_inductor(dtype):
    model, inputs = models.llama()
    half = copy.deepcopy(model).to(dtype)
    compiler = StampCompiler(CONFIG)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(half, backend=compiler)(**inputs).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    plan = config_plan(model, CONFIG, causal=True)
    assert set(plan.sites) == set(compiler.last.plan.sites)
    assert_no_worse_than_eager(out, model, inputs, plan, dtype)


def test_backward_through_inductor_straight_through():
    model, inputs = models.llama()
    want = _grads(model, _loss(inputs))
    config = StampConfig(high_tokens=4, high_bits=16, low_bits=16)
    got, compiler = _compiled_grads(model, config, inputs)
    assert len(compiler.last.plan.sites) == 14
    assert set(got) == set(want) and len(want) > 10
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], want[name], rtol=2e-3, atol=2e-5, msg=name)
