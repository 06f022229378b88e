"""GPTQ against RTN and against a plain float64 column-by-column reference; weight plans
round-trip (JSON + safetensors, no pickle); a W4 tiny Llama with STaMP activations through the
backend equals the eager application of its plan."""

import json

import pytest
import torch

import stamp_fx
from stamp_fx import AllocationPlan, StampCompiler, load_plan, load_weight_plan, quantize_weights
from stamp_fx.gptq import gptq_quantize
from stamp_fx.weights import WeightQuantConfig, block_linears, rtn_quantize
from tests.helpers import assert_no_worse_than_eager, compile_and_run, eager
from tests.models import llama


def correlated_inputs(n, d, seed):
    """Inputs whose channels are strongly correlated (a rank-d/4 signal plus a little noise),
    with unequal channel energies, like a transformer's hidden states."""
    gen = torch.Generator().manual_seed(seed)
    rank = max(1, d // 4)
    signal = torch.randn(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen)
    scales = torch.logspace(0, 1, d)
    return (signal + 0.3 * torch.randn(n, d, generator=gen)) * scales


def hessian(x):
    x = x.double()
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("group, act_order", [(None, False), (16, False), (16, True)])
def test_gptq_beats_rtn_on_layer_output(seed, group, act_order):
    gen = torch.Generator().manual_seed(100 + seed)
    w = torch.randn(32, 64, generator=gen)
    x = correlated_inputs(512, 64, seed)
    cfg = WeightQuantConfig(method="gptq", bits=4, group_size=group, act_order=act_order)
    w_gptq, _ = gptq_quantize(w, hessian(x), cfg)
    w_rtn, _ = rtn_quantize(w, cfg)
    err_gptq = (x @ (w_gptq - w).T).norm()
    err_rtn = (x @ (w_rtn - w).T).norm()
    assert err_gptq < 0.9 * err_rtn, (float(err_gptq), float(err_rtn))


def _plain_grid(cols, bits, symmetric):
    """Min-max grid of the given columns' rows, written out plainly: (scale, zero, qmin, qmax)."""
    lo = cols.min(1).values.clamp(max=0)
    hi = cols.max(1).values.clamp(min=0)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        return scale, torch.zeros_like(scale), -qmax, qmax
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    return scale, torch.round(-lo / scale).clamp(0, qmax), 0, qmax


def gptq_reference(w, h, *, bits, group, symmetric, damp, act_order):
    """GPTQ as the paper states it, one column at a time in float64: quantize column j, spread
    its error over the remaining columns with the inverse Hessian of the remaining columns,
    then remove column j from that inverse (the OBS update). No blocks, no Cholesky, no lazy
    updates. With ``act_order`` columns go by decreasing diag(H) and group grids are fixed
    from the original weights beforehand."""
    W = w.double().clone()
    H = h.double().clone()
    cols = W.shape[1]
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    order = list(range(cols))
    if act_order:
        order = torch.argsort(torch.diag(h.double()), descending=True).tolist()
    static = {}
    if group is None:
        static = dict.fromkeys(range(cols), _plain_grid(W, bits, symmetric))
    elif act_order:
        for j in range(cols):
            g = j // group
            static[j] = _plain_grid(W[:, g * group : (g + 1) * group], bits, symmetric)
    Hinv = torch.linalg.inv(H)
    remaining = list(order)
    grid = None
    Q = torch.zeros_like(W)
    for j in order:
        if j in static:
            grid = static[j]
        elif j % group == 0:
            grid = _plain_grid(W[:, j : j + group], bits, symmetric)
        scale, zero, qmin, qmax = grid
        q = ((torch.round(W[:, j] / scale) + zero).clamp(qmin, qmax) - zero) * scale
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        remaining.remove(j)
        for k in remaining:
            W[:, k] -= err * Hinv[j, k]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q


@pytest.mark.parametrize(
    "group, act_order, symmetric, block",
    [
        (None, False, False, 4),
        (4, False, False, 4),
        (4, False, True, 3),
        (4, True, False, 5),
        (None, True, True, 2),
    ],
)
def test_gptq_equals_plain_float64_reference(group, act_order, symmetric, block):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    x = correlated_inputs(40, 12, 3).double()
    h = hessian(x)
    cfg = WeightQuantConfig(
        method="gptq", bits=4, group_size=group, symmetric=symmetric, act_order=act_order,
        clip_search=False, block_size=block,
    )  # fmt: skip
    got, _ = gptq_quantize(w, h, cfg)
    want = gptq_reference(
        w, h, bits=4, group=group, symmetric=symmetric, damp=0.01, act_order=act_order
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert not torch.equal(got, rtn_quantize(w, cfg)[0])  # GPTQ really moved off RTN


def test_weight_plan_round_trip_without_pickle(tmp_path):
    model, inputs = llama(seed=1)
    fresh, _ = llama(seed=1)
    wplan = quantize_weights(model, method="rtn", bits=4, group_size=16, show_progress=False)
    assert set(wplan.sites) == set(block_linears(model))
    assert "none folded" in wplan.meta["rotation"]
    path = wplan.save(tmp_path / "weights.json")
    side = tmp_path / "weights.weights.safetensors"
    raw = side.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header])  # a safetensors JSON header, not a pickle
    assert b"\x80\x04" not in raw[:2] and raw[:2] != b"PK"
    loaded = load_weight_plan(path)
    assert loaded.to_dict() == wplan.to_dict()
    for fqn, t in wplan.tensors.items():
        assert torch.equal(loaded.tensors[fqn], t)
    assert not torch.equal(
        fresh.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight
    )
    written = loaded.apply(fresh)
    assert sorted(written) == sorted(wplan.sites)
    torch.testing.assert_close(eager(fresh, inputs), eager(model, inputs), rtol=0, atol=0)
    # The activation plan records the weight method per linear-input site and round-trips too.
    plan = wplan.attach(AllocationPlan(sites={}))
    assert plan.meta["weights"]["model.layers.0.self_attn.q_proj:in"] == "rtn w4 g16 asym"
    plan.save(tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json").meta["weights"] == plan.meta["weights"]


def test_apply_rejects_mismatched_model(tmp_path):
    model, _ = llama(seed=1)
    wplan = quantize_weights(model, method="rtn", bits=8, group_size=None, show_progress=False)
    other, _ = llama(seed=1, hidden=16, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="weight plan: .*weight is"):
        wplan.apply(other)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w4_llama_with_stamp_through_backend_matches_eager(method):
    model, inputs = llama(seed=2)
    before = eager(model, inputs)
    batches = [llama(seed=s)[1] for s in (10, 11)] if method == "gptq" else None
    wplan = quantize_weights(
        model, method=method, bits=4, group_size=16, batches=batches, show_progress=False
    )
    assert len(wplan.sites) == 2 * 7 and not wplan.skipped
    assert all(s.rel_error > 0 for s in wplan.sites.values())
    w4_float_acts = eager(model, inputs)
    assert not torch.allclose(w4_float_acts, before)
    compiler = StampCompiler(inductor=False)
    out = compile_and_run(model, inputs, compiler)
    plan = compiler.last.plan
    assert len(plan.sites) == 2 * 7
    assert_no_worse_than_eager(out, model, inputs, plan)
    assert not torch.allclose(out, w4_float_acts)  # activations are quantized on top


def test_gptq_needs_batches_and_backend_rejects_weight_options():
    model, inputs = llama(seed=3)
    with pytest.raises(ValueError, match="batches: method='gptq' needs calibration batches"):
        quantize_weights(model, method="gptq", show_progress=False)
    with pytest.raises(ValueError, match="batches: method='rtn' uses no calibration"):
        quantize_weights(model, method="rtn", batches=[inputs], show_progress=False)
    with pytest.raises(ValueError, match="weight_bits"):
        quantize_weights(model, bits=2, show_progress=False)
    for key in ("weight_bits", "weight_group_size"):
        with pytest.raises(ValueError, match=r"not a compile option.*stamp_fx.quantize_weights"):
            StampCompiler.from_options({key: 4})
    assert stamp_fx.quantize_weights is quantize_weights


def test_hessians_come_from_each_linears_own_inputs():
    from stamp_fx.gptq import collect_hessians

    model, inputs = llama(seed=4)
    captured, handles = {}, []
    for fqn, module in block_linears(model).items():

        def hook(mod, args, fqn=fqn):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            captured[fqn] = captured.get(fqn, 0) + x.T @ x

        handles.append(module.register_forward_pre_hook(hook))
    eager(model, inputs)
    for h in handles:
        h.remove()
    tokens = inputs["input_ids"].numel()
    hessians = collect_hessians(model, [inputs], show_progress=False)
    assert set(hessians) == set(captured)
    for fqn, (h, n) in hessians.items():
        assert n == tokens
        torch.testing.assert_close(h, 2 * captured[fqn] / tokens, rtol=1e-6, atol=1e-8)
