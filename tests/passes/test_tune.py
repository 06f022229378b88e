"""Per-layer tuning on a tiny model: objectives, budget, plan round trip, the backend honouring
the plan, option validation, and a tiny-model `stamp-fx tune` through the CLI."""

import copy
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import stamp_fx
from stamp_fx import StampCompiler
from stamp_fx.tuning import OBJECTIVES, TUNE_META_SCHEMA, LossGradients, next_token_loss, tune
from tests import models
from tests.helpers import compile_and_run, eager_with_plan
from tests.tolerances import BUDGET_SLACK_BITS, F32_REORDER_TOL

GRID = (0, 4, 8, 16, 32)
LOWS = (4, 5)
SEQ = 64


def _batches(n=2, seq=SEQ):
    return [{"input_ids": models._ids(1, seq, s)} for s in range(n)]


@pytest.fixture(scope="module")
def tuned():
    """One sensitivity pass with loss gradients; every other budget/objective is a re-solve."""
    model, _ = models.llama(seq=SEQ)
    torch._dynamo.reset()
    result = tune(
        model, _batches(), avg_bits=5.0, high_token_grid=GRID, low_bits_grid=LOWS,
        show_progress=False,
    )  # fmt: skip
    return model, result


def _plan_average(result) -> float:
    """Activation-size-weighted average bits of the plan's policies, as the backend lays them."""
    length = result.plan.meta["tune"]["calibration_length"]
    total = weight = 0.0
    for key, s in result.sites.items():
        policy = result.plan.sites[key]
        bits = policy.bit_vector(policy.make_transform(), length)
        total += s.tokens * s.features * sum(bits) / len(bits)
        weight += s.tokens * s.features
    return total / weight


def _top(result, objective) -> float:
    """The average at which every site sits at its least-error option (the end of its hull)."""
    err = OBJECTIVES[objective].error
    total = sum(s.tokens * s.features for s in result.sites.values())
    return (
        sum(
            s.tokens * s.features * s.bits[min(s.bits, key=lambda o, s=s: (err(s, o), s.bits[o]))]
            for s in result.sites.values()
        )
        / total
    )


def _slack(result) -> float:
    """The most a greedy solver may leave unspent: one option step of the largest site."""
    total = sum(s.tokens * s.features for s in result.sites.values())
    steps = [
        (b - a) * s.tokens * s.features / total
        for s in result.sites.values()
        for a, b in zip(sorted(set(s.bits.values())), sorted(set(s.bits.values()))[1:])
    ]
    return max(steps)


def test_default_objective_is_fisher_and_recorded(tuned):
    _, result = tuned
    meta = result.plan.meta["tune"]
    assert result.objective == meta["objective"] == "fisher"
    assert meta["schema"] == TUNE_META_SCHEMA
    assert meta["low_bits_grid"] == list(LOWS)
    assert meta["calibration_length"] == SEQ
    assert "objective fisher" in result.report()
    for key, (h, low) in meta["chosen"].items():
        assert (result.plan.sites[key].high_tokens, result.plan.sites[key].low_bits) == (h, low)
    # Fisher values are predicted loss increases: non-negative, and measured for every option.
    for s in result.sites.values():
        assert set(s.fisher) == set(s.error) and all(v >= 0 for v in s.fisher.values())


def test_budget_is_met_and_equals_the_plan(tuned):
    _, result = tuned
    assert result.avg_bits <= 5.0 + BUDGET_SLACK_BITS
    assert result.avg_bits >= 5.0 - _slack(result)
    assert _plan_average(result) == pytest.approx(result.avg_bits, abs=BUDGET_SLACK_BITS)
    # Not uniform: the solver spends bits where the predicted loss increase says they help.
    assert len(set(result.choice.values())) > 1
    assert all(o.high_tokens in (*GRID, 1) and o.low_bits in LOWS for o in result.choice.values())
    assert "budget 5.0000 bits, achieved" in result.report()


@given(budget=st.floats(4.1, 7.5), objective=st.sampled_from(sorted(OBJECTIVES)))
def test_resolve_never_exceeds_any_budget(tuned, budget, objective):
    _, result = tuned
    r = result.resolve(budget, objective=objective)
    assert r.avg_bits <= budget + BUDGET_SLACK_BITS
    assert r.avg_bits >= min(budget, _top(result, objective)) - _slack(result) - BUDGET_SLACK_BITS
    assert _plan_average(r) == pytest.approx(r.avg_bits, abs=BUDGET_SLACK_BITS)
    assert r.plan.meta["tune"]["objective"] == objective


def test_resolve_restricted_to_low4_keeps_low_bits(tuned):
    _, result = tuned
    low4 = [o for s in result.sites.values() for o in s.bits if o.low_bits == 4]
    r = result.resolve(4.5, options=low4)
    assert {o.low_bits for o in r.choice.values()} == {4}
    assert r.plan.meta["tune"]["low_bits_grid"] == [4, 5]  # what was measured
    assert all(row[1] == 4 for rows in r.plan.meta["tune"]["curves"].values() for row in rows)


def test_error_curves_fall_with_bits(tuned):
    _, result = tuned
    for s in result.sites.values():
        for low in LOWS:
            opts = sorted(o for o in s.error if o.low_bits == low)
            assert s.error[opts[0]] >= s.error[opts[-1]]
            assert s.fisher[opts[0]] >= s.fisher[opts[-1]]
        assert all(s.bound[o] >= 0 for o in s.bound)


def test_fisher_follows_the_loss_where_output_error_cannot(tuned):
    """Scaling one o_proj's weight by 1e-3 leaves its output noise-to-signal ratio unchanged but
    makes its error nearly irrelevant to the loss: fisher drops that site to its cheapest
    option, output_nsr keeps spending on it."""
    model, _ = tuned
    model = copy.deepcopy(model)
    key = "model.layers.1.self_attn.o_proj:in"
    with torch.no_grad():
        model.get_submodule(key.split(":")[0]).weight.mul_(1e-3)
    torch._dynamo.reset()
    result = tune(model, _batches(), avg_bits=5.0, high_token_grid=GRID, show_progress=False)
    s = result.sites[key]
    cheapest = min(s.bits, key=lambda o: (s.bits[o], o))
    assert result.choice[key] == cheapest
    nsr = result.resolve(objective="output_nsr")
    assert nsr.sites[key].bits[nsr.choice[key]] > s.bits[cheapest]
    # The ranking of this site against another changes with the objective.
    other = "model.layers.0.self_attn.o_proj:in"
    ratio = {
        name: OBJECTIVES[name].error(s, cheapest)
        / OBJECTIVES[name].error(result.sites[other], cheapest)
        for name in OBJECTIVES
    }
    assert ratio["fisher"] < 1e-3 * ratio["output_nsr"]


def test_loss_gradients_are_per_consumer(tuned):
    """q/k/v read one tensor; each gets the gradient through its own projection, and together
    they add up to the gradient of the shared input."""
    model, _ = tuned
    keys = [f"model.layers.0.self_attn.{p}_proj:in" for p in "qkv"]
    batch = _batches(1)[0]
    grads = LossGradients(model)(keys, batch)
    assert set(grads) == set(keys)
    assert not torch.allclose(grads[keys[0]], grads[keys[1]])
    captured = {}
    norm = model.model.layers[0].input_layernorm
    handle = norm.register_forward_hook(lambda m, a, out: captured.setdefault("x", out))
    try:
        loss = next_token_loss(model, batch)
        (total,) = torch.autograd.grad(loss, captured["x"])
    finally:
        handle.remove()
    torch.testing.assert_close(sum(grads.values()), total, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_fisher_reaches_key_value_sites(tuned):
    model, _ = tuned
    torch._dynamo.reset()
    result = tune(
        model, _batches(1, 16), 5.0, quantize_kv=True, high_token_grid=(0, 4),
        show_progress=False,
    )  # fmt: skip
    kv = [k for k in result.sites if k.endswith((":k", ":v"))]
    assert len(kv) == 4
    for key in kv:
        assert all(v > 0 for v in result.sites[key].fisher.values())


def test_tuned_plan_round_trips_and_the_backend_honours_it(tuned, tmp_path):
    model, result = tuned
    path = result.plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["meta"]["tune"]["budget"] == 5.0
    loaded = stamp_fx.load_plan(path)
    assert loaded.sites == result.plan.sites
    assert loaded.meta["tune"] == json.loads(json.dumps(result.plan.meta["tune"]))
    inputs = {"input_ids": models._ids(1, SEQ, 7)}
    compiler = StampCompiler(inductor=False, plan=str(path), debug_dir=str(tmp_path / "dump"))
    out = compile_and_run(model, inputs, compiler)
    # Site bits in the dumped plan equal the JSON.
    dumped = json.loads(next((tmp_path / "dump").glob("graph_*/plan.json")).read_text())
    pick = ("high_tokens", "high_bits", "low_bits")
    assert {k: [v[f] for f in pick] for k, v in dumped["sites"].items()} == {
        k: [v[f] for f in pick] for k, v in data["sites"].items()
    }
    torch.testing.assert_close(out, eager_with_plan(model, inputs, loaded), **F32_REORDER_TOL)


def test_hand_edited_plan_is_honoured(tuned, tmp_path):
    model, result = tuned
    data = json.loads(result.plan.to_json())
    key = "model.layers.1.mlp.down_proj:in"
    data["sites"][key].update(high_bits=8, low_bits=8)  # force one layer to 8 bits
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    compiler = StampCompiler(inductor=False, plan=str(path))
    compile_and_run(model, {"input_ids": models._ids(1, SEQ, 3)}, compiler)
    assert compiler.last.plan.sites[key].low_bits == 8
    node = next(
        n
        for n in compiler.last.graph.graph.nodes
        if n.meta.get("stamp") and key in str(n.meta["stamp"])
    )
    assert "bits=8x" in str(node.meta["stamp"]) and "/8" in str(node.meta["stamp"])


def test_malformed_tuned_plan_names_field_and_site(tuned):
    _, result = tuned
    data = json.loads(result.plan.to_json())
    key = "model.layers.0.mlp.up_proj:in"
    data["sites"][key]["low_bits"] = 99
    with pytest.raises(ValueError, match=r"up_proj:in.*low_bits"):
        stamp_fx.load_plan(data)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"objective": "hessian"}, r"objective 'hessian' is not one of: fisher, output_nsr"),
        ({"low_bits_grid": (4, 99)}, r"low_bits_grid: .*2\.\.16"),
        ({"low_bits_grid": ()}, r"low_bits_grid must not be empty"),
        ({"high_token_grid": (0, -1)}, r"high_token_grid: .*non-negative"),
        ({"high_token_grid": "16"}, r"high_token_grid must be a sequence of ints"),
        ({"loss_fn": 3}, r"loss_fn must be callable"),
        ({"avg_bits": float("nan")}, r"avg_bits must be a finite number"),
    ],
)
def test_bad_options_raise_naming_the_option(kwargs, match):
    model, _ = models.llama(seq=8)
    args = {"avg_bits": 4.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        tune(model, _batches(1, 8), show_progress=False, **args)


def test_fisher_needs_a_loss(tuned):
    model, _ = tuned
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"objective 'fisher' needs a loss.*loss_fn"):
        tune(model, [models._ids(1, 8, 0)], avg_bits=4.5, show_progress=False)


def test_resolve_cannot_invent_fisher(tuned):
    model, _ = tuned
    torch._dynamo.reset()
    nsr = tune(
        model, _batches(1, 16), 4.5, objective="output_nsr", high_token_grid=(0, 4),
        show_progress=False,
    )  # fmt: skip
    assert all(not s.fisher for s in nsr.sites.values())
    with pytest.raises(ValueError, match=r"needs loss gradients.*objective='fisher'"):
        nsr.resolve(objective="fisher")
    assert nsr.resolve(4.25).avg_bits <= 4.25 + BUDGET_SLACK_BITS


class _ByteTokenizer:
    """Enough of a tokenizer for the CLI: bytes modulo the tiny vocabulary."""

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([list(text.encode()[:4096])]) % models.VOCAB

        class Out:
            input_ids = ids

        return Out()


def test_cli_tune_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    from stamp_fx import assets, cli

    model, _ = models.llama(seq=32)
    loaded = assets.LoadedModel("tiny-llama", model, _ByteTokenizer(), "random weights")
    monkeypatch.setattr(cli, "_load_lm", lambda name, gguf_dir=None: loaded)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "tiny_plan.json"
    torch._dynamo.reset()
    code = cli.main(
        [
            "tune", "--model", "tiny", "--text", str(text), "--avg-bits", "4.5", "--window", "32",
            "--calib-windows", "2", "--eval-windows", "1", "--high-tokens", "0,4,8",
            "--low-bits", "4,5", "--quiet", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "objective fisher" in printed
    assert "tuned plan: perplexity" in printed and "uniform rule (" in printed
    plan = stamp_fx.load_plan(out)
    assert plan.meta["tune"]["objective"] == "fisher"
    assert plan.meta["tune"]["achieved"] <= 4.5 + BUDGET_SLACK_BITS
    assert (tmp_path / "tiny_plan_report.txt").is_file()
    assert (tmp_path / "tiny_plan_bits.png").is_file()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_projection_matches_the_module_even_for_square_weights(name):
    # GPT-2's attention c_proj is a square Conv1D ([in, out]); a shape test cannot tell it from
    # an nn.Linear ([out, in]) and used to transpose it.
    from stamp_fx.tuning import linear_projection

    model, _ = models.FACTORIES[name]()
    checked = square = 0
    gen = torch.Generator().manual_seed(0)
    for fqn, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if not (isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"):
            continue
        features = weight.shape[0] if type(mod).__name__ == "Conv1D" else weight.shape[1]
        x = torch.randn(3, features, generator=gen)
        m = linear_projection(mod, features)
        bias = mod.bias if getattr(mod, "bias", None) is not None else 0
        with torch.no_grad():
            torch.testing.assert_close(x @ m, mod(x) - bias, **F32_REORDER_TOL, msg=fqn)
        checked += 1
        square += weight.shape[0] == weight.shape[1]
    assert checked >= 8 and square >= 2


def test_report_and_plots_go_by_depth(tuned, tmp_path):
    from stamp_fx.tuning import depth_order, layer_and_role

    names = ["m.layers.10.mlp:in", "m.layers.2.attn:in", "lm_head:in", "m.layers.9.mlp:in"]
    assert sorted(names, key=depth_order) == [
        "lm_head:in", "m.layers.2.attn:in", "m.layers.9.mlp:in", "m.layers.10.mlp:in",
    ]  # fmt: skip
    assert layer_and_role("m.layers.10.mlp:in") == (10, "mlp:in")
    assert layer_and_role("lm_head:in") == (None, "lm_head:in")
    _, result = tuned
    keys = result.keys_by_depth()
    assert sorted(keys) == sorted(result.choice)
    layers = [layer_and_role(k)[0] for k in keys]
    assert layers == sorted(layers, key=lambda v: (v is None, v or 0))
    listed = [line.split()[0] for line in result.report().splitlines()[1:-1]]
    assert listed == keys
    bits_png, sqnr_png = result.plot(str(tmp_path / "plan"))
    assert bits_png.endswith("_bits.png") and sqnr_png.endswith("_sqnr.png")
    for path in (bits_png, sqnr_png):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
