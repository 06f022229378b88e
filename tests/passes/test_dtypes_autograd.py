"""bf16 / fp16 whole models and backward through the compiled model (issue 12 item 5), on
the eager graph; tests/compile/test_dtypes_autograd.py does the same through CPU Inductor."""

from __future__ import annotations

import copy

import pytest
import torch

from stamp_fx import StampCompiler, StampConfig
from tests import models
from tests.helpers import assert_no_worse_than_eager, config_plan

CONFIG = StampConfig(high_tokens=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_no_worse_than_eager(dtype):
    model, inputs = models.llama()
    half = copy.deepcopy(model).to(dtype)
    compiler = StampCompiler(CONFIG, inductor=False)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(half, backend=compiler)(**inputs).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert len(compiler.last.plan.sites) == 14
    # The oracle's plan comes from the config and module names, not from the compile.
    plan = config_plan(model, CONFIG, causal=True)
    assert set(plan.sites) == set(compiler.last.plan.sites)
    assert_no_worse_than_eager(out, model, inputs, plan, dtype)


def _grads(model, loss_fn, run=None) -> dict[str, torch.Tensor]:
    """Gradients of ``loss_fn(run or model)`` on ``model``'s parameters."""
    model.zero_grad(set_to_none=True)
    loss_fn(run if run is not None else model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss(inputs):
    def fn(m):
        return m(**inputs).logits.float().square().mean()

    return fn


def _compiled_grads(model, config, inputs, **kw):
    compiler = StampCompiler(config, **kw)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler)
    return _grads(model, _loss(inputs), compiled), compiler


@pytest.mark.parametrize(
    "config",
    [
        StampConfig(enabled=False),
        # ops inserted, but 16 bits: the straight-through gradient is the float one to ~2^-16
        StampConfig(high_tokens=4, high_bits=16, low_bits=16, quantize_kv=True),
    ],
    ids=["disabled", "16bit"],
)
def test_backward_matches_float_when_quantization_is_off(config):
    model, inputs = models.llama()
    want = _grads(model, _loss(inputs))
    got, compiler = _compiled_grads(model, config, inputs, inductor=False)
    assert set(got) == set(want) and len(want) > 10
    tol = 0 if not config.enabled else 2e-3
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol * 1e-2, msg=name)
    assert bool(compiler.last.plan.sites) == config.enabled


def test_backward_through_quantized_padded_batch_is_finite():
    model, inputs = models.llama()
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, :5] = 0  # left padding: the masked op's straight-through gradient
    padded = {**inputs, "attention_mask": mask}
    got, compiler = _compiled_grads(model, StampConfig(high_tokens=4, quantize_kv=True), padded,
                                    inductor=False)  # fmt: skip
    targets = [n.target for n in compiler.last.graph.graph.nodes]
    assert torch.ops.stamp.fake_quant_masked.default in targets
    want = _grads(model, _loss(padded))
    assert set(got) == set(want)
    for name, g in got.items():
        assert torch.isfinite(g).all(), name
    # Quantized, so not the float gradient, but close to it (4-8 bit noise), never zero.
    block = [n for n in got if ".layers." in n and n.endswith("proj.weight")]
    assert len(block) == 14
    for name in block:
        assert got[name].abs().sum() > 0
        assert not torch.equal(got[name], want[name])
        cos = torch.nn.functional.cosine_similarity(got[name].flatten(), want[name].flatten(), 0)
        assert cos > 0.8, (name, cos)
