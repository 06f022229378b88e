"""The backend end to end without Inductor: equivalence with the eager hook-based reference,
options, plans, overrides, shapes, idempotence, debug dumps, explain and calibrate."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stamp_fx
from stamp_fx import StampCompiler, StampConfig
from stamp_fx.passes import PassContext, run_passes
from tests import models
from tests.helpers import (
    assert_no_worse_than_eager,
    compile_and_run,
    config_plan,
    eager,
    eager_with_plan,
)
from tests.tolerances import F32_REORDER_TOL, QUANTIZED_DIFFERS_ATOL, QUANTIZED_DIFFERS_ATOL_SMALL

model_settings = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def arch_and_inputs(draw):
    name = draw(st.sampled_from(["llama", "qwen2", "gpt2", "bert", "pixart"]))
    seed = draw(st.integers(0, 1000))
    batch = draw(st.integers(1, 2))
    if name == "pixart":
        return name, models.pixart(
            seed=seed,
            layers=draw(st.integers(1, 2)),
            batch=batch,
            side=draw(st.sampled_from([4, 8, 12])),
        )
    seq = draw(st.sampled_from([1, 2, 5, 12, 31, 40]))
    return name, models.FACTORIES[name](
        seed=seed, layers=draw(st.integers(1, 2)), batch=batch, seq=seq
    )


configs = st.builds(
    StampConfig,
    transform=st.sampled_from(["identity", "haar", "dct", "wht"]),
    feature_transform=st.sampled_from(["none", "hadamard"]),
    levels=st.none() | st.integers(0, 3),
    high_tokens=st.integers(1, 8),  # >= sink_tokens, which counts inside it
    sink_tokens=st.none() | st.integers(0, 1),
    low_bits=st.sampled_from([3, 4]),
    symmetric=st.booleans(),
    group_size=st.none() | st.just(8),
    quantize_kv=st.booleans(),
)


@model_settings
@given(case=arch_and_inputs(), config=configs)
def test_compiled_equals_eager_application_of_the_same_plan(case, config):
    name, (model, inputs) = case
    compiler = StampCompiler(config, inductor=False)
    out = compile_and_run(model, inputs, compiler)
    plan = compiler.merged_plan()
    # The linear sites are exactly the ones the name-based oracle finds (not the compiler's say).
    oracle = config_plan(model, config.replace(quantize_kv=False), causal=False)
    assert {k for k in plan.sites if k.endswith(":in")} == set(oracle.sites)
    # Same ops in the same order as the eager hooks: equal to float32 rounding.
    torch.testing.assert_close(out, eager_with_plan(model, inputs, plan), **F32_REORDER_TOL)
    assert_no_worse_than_eager(out, model, inputs, plan)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "pixart"])
def test_quantization_disabled_equals_eager(name):
    model, inputs = models.FACTORIES[name]()
    compiler = StampCompiler(StampConfig(enabled=False), inductor=False)
    out = compile_and_run(model, inputs, compiler)
    assert torch.equal(out, eager(model, inputs))
    assert compiler.last.plan.sites == {}


def test_quantization_changes_the_output():
    model, inputs = models.llama()
    out = compile_and_run(
        model, inputs, StampCompiler(StampConfig(high_tokens=0, low_bits=2), inductor=False)
    )
    assert not torch.allclose(out, eager(model, inputs), atol=QUANTIZED_DIFFERS_ATOL)


def test_string_backend_via_entry_point_with_options():
    model, inputs = models.llama()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(
            model,
            backend="stamp",
            options={"inductor": False, "high_tokens": 4, "transform": "dct"},
        )(**inputs)
    compiler = StampCompiler(StampConfig(high_tokens=4, transform="dct"), inductor=False)
    assert torch.equal(out.logits, compile_and_run(model, inputs, compiler))


def _backend_error(options, mode=None):
    model, inputs = models.llama(layers=1)
    torch._dynamo.reset()
    with pytest.raises(Exception) as info, torch.no_grad():
        torch.compile(model, backend="stamp", options=options, mode=mode)(**inputs)
    err = info.value
    while err is not None and not isinstance(err, (ValueError, TypeError)):
        err = getattr(err, "inner_exception", None) or err.__cause__
    assert err is not None, info.value
    return str(err)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"bitz": 4},
            "unknown stamp option(s) ['bitz']; valid options: allocation_metric, allowed_bits",
        ),
        ({"high_bits": 17}, "high_bits must be in 2..16"),
        ({"low_bits": 1}, "low_bits must be in 2..16"),
        ({"transform": "fft"}, "valid: dct, haar, haar2d, identity, klt, wht"),
        ({"transform": "haar2d"}, "haar2d' needs the token grid"),
        ({"overrides": {"re:.*": {"bits": 4}}}, "unknown field(s) ['bits']"),
        ({"plan": "/nonexistent/plan.json"}, "no such file"),
        ({"lowering": "cuda"}, "lowering: unknown 'cuda'; valid lowerings: "),
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    assert message in _backend_error({"inductor": False, **options})


def test_mode_is_mapped_or_rejected():
    assert "valid modes: default, reduce-overhead, max-autotune" in _backend_error(
        None, mode="turbo"
    )
    # torch.compile refuses mode= with options=, so options may carry the mode.
    assert "inductor=False" in _backend_error({"inductor": False, "mode": "max-autotune"})
    assert (
        StampCompiler.from_options({}, mode="max-autotune").config_patches["max_autotune"] is True
    )
    assert StampCompiler.from_options({}, mode="default").config_patches == {}


def test_overrides_exact_regex_default_and_skip():
    model, inputs = models.llama()
    overrides = {
        "_default": {"high_tokens": 3},
        "re:model\\.layers\\.\\d+\\.mlp\\.down_proj": {"low_bits": 8, "transform": "dct"},
        "model.layers.0.self_attn.o_proj": "skip",
        "model.layers.1.self_attn.q_proj:in": {"high_bits": 6},
    }
    compiler = StampCompiler(StampConfig(overrides=overrides), inductor=False)
    compile_and_run(model, inputs, compiler)
    plan = compiler.last.plan
    assert plan.sites["model.layers.0.mlp.down_proj:in"].transform == "dct"
    assert plan.sites["model.layers.1.mlp.down_proj:in"].low_bits == 8
    assert plan.sites["model.layers.0.mlp.up_proj:in"].high_tokens == 3
    assert plan.skipped["model.layers.0.self_attn.o_proj:in"] == "skipped by override"
    assert plan.sites["model.layers.1.self_attn.q_proj:in"].high_bits == 6
    assert plan.sites["model.layers.1.self_attn.k_proj:in"].high_bits == 8
    # 4 ops per layer, minus layer 0's skipped o_proj, plus layer 1's q split from k/v.
    assert compiler.last.passes[0].stats["stamp_ops"] == 8 - 1 + 1


def test_override_matching_nothing_warns():
    model, inputs = models.llama(layers=1)
    with pytest.warns(UserWarning, match="'re:.*nonexistent.*' matches no site"):
        compile_and_run(
            model,
            inputs,
            StampCompiler(StampConfig(overrides={"re:.*nonexistent.*": "skip"}), inductor=False),
        )


def test_plan_json_round_trip_reproduces_outputs(tmp_path):
    model, inputs = models.gpt2()
    compiler = StampCompiler(
        StampConfig(high_tokens=4, overrides={"re:.*c_fc": {"transform": "wht"}}), inductor=False
    )
    out = compile_and_run(model, inputs, compiler)
    path = compiler.last.plan.save(tmp_path / "plan.json")
    loaded = stamp_fx.load_plan(path)
    assert loaded.sites == compiler.last.plan.sites and loaded.skipped == compiler.last.plan.skipped
    # A loaded plan is used verbatim, whatever the config says.
    again = StampCompiler(
        StampConfig(transform="identity", high_tokens=60), inductor=False, plan=str(path)
    )
    assert torch.equal(compile_and_run(model, inputs, again), out)
    assert (
        json.loads(path.read_text())["sites"]["transformer.h.0.mlp.c_fc:in"]["transform"] == "wht"
    )


def test_malformed_plan_names_site_and_field():
    with pytest.raises(ValueError, match=r"plan site 'a:in': field 'bands' must be"):
        stamp_fx.load_plan({"version": 1, "sites": {"a:in": {"bands": [4]}}})
    with pytest.raises(ValueError, match=r"plan site 'a:in': unknown field\(s\) \['bitz'\]"):
        stamp_fx.load_plan({"version": 1, "sites": {"a:in": {"bitz": 4}}})
    with pytest.raises(ValueError, match="high_bits must be in 2..16"):
        stamp_fx.load_plan({"version": 1, "sites": {"a:in": {"high_bits": 40}}})
    with pytest.raises(ValueError, match="field 'version' must be 1"):
        stamp_fx.load_plan({"version": 7, "sites": {}})


def test_pass_is_idempotent():
    model, inputs = models.llama()
    compiler = StampCompiler(StampConfig(high_tokens=4), inductor=False)
    out = compile_and_run(model, inputs, compiler)
    rec = compiler.last
    gm = rec.graph
    before = gm.code
    from stamp_fx.analysis import find_sites

    stats = run_passes(gm, PassContext(sites=find_sites(gm), plan=rec.plan))
    assert stats[0].stats["stamp_ops"] == 0 and stats[0].stats["already_quantized"] > 0
    assert gm.code == before
    assert not torch.allclose(
        out, eager(model, inputs), atol=QUANTIZED_DIFFERS_ATOL_SMALL
    )  # the first pass quantized


def test_every_touched_node_carries_stamp_meta():
    model, inputs = models.gpt2()
    compiler = StampCompiler(StampConfig(high_tokens=4), inductor=False)
    compile_and_run(model, inputs, compiler)
    gm = compiler.last.graph
    stamp_nodes = [n for n in gm.graph.nodes if n.target is torch.ops.stamp.fake_quant.default]
    assert len(stamp_nodes) == 8
    for n in stamp_nodes:
        line = str(n.meta["stamp"])
        assert (
            line.startswith("site=transformer.h.")
            and "xform" not in line
            and "haar(J=auto) bits=8x4/4 sinks=1" in line
        )
        for user in n.users:  # the re-applied view and then the Conv1D addmm
            assert "stamp" in user.meta


def test_dynamic_sequence_length_does_not_recompile_and_length_one_works():
    model, _ = models.llama()
    compiler = StampCompiler(StampConfig(high_tokens=4), inductor=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler, dynamic=True)
    with torch.no_grad():
        for seq in (9, 23, 40):
            ids = models._ids(2, seq, seq)
            out = compiled(input_ids=ids).logits
            torch.testing.assert_close(
                out,
                eager_with_plan(model, {"input_ids": ids}, compiler.last.plan),
                **F32_REORDER_TOL,
            )
        assert len(compiler.records) == 1
        ids = models._ids(2, 1, 0)
        out = compiled(input_ids=ids).logits  # a decode-like step: everything high precision
        torch.testing.assert_close(
            out,
            eager_with_plan(model, {"input_ids": ids}, compiler.last.plan),
            **F32_REORDER_TOL,
        )


def test_debug_dir_writes_dumps_plan_and_site_table(tmp_path):
    model, inputs = models.llama(layers=1)
    compile_and_run(
        model, inputs, StampCompiler(StampConfig(), inductor=False, debug_dir=str(tmp_path))
    )
    (graph_dir,) = sorted(tmp_path.glob("graph_*"))
    names = sorted(p.name for p in graph_dir.iterdir())
    assert names == [
        "00_before_insert_stamp_ops.txt",
        "01_after_insert_stamp_ops.txt",
        "plan.json",
        "sites.txt",
    ]
    after = (graph_dir / "01_after_insert_stamp_ops.txt").read_text()
    assert after.startswith("# stamp-fx | after pass insert_stamp_ops (")
    assert (
        "torch.ops.stamp.fake_quant.default" in after
        and "site=model.layers.0.self_attn.q_proj:in" in after
    )
    assert "stamp.fake_quant" not in (graph_dir / "00_before_insert_stamp_ops.txt").read_text()
    assert "lm_head:in" in (graph_dir / "sites.txt").read_text()
    assert stamp_fx.load_plan(graph_dir / "plan.json").sites


def test_explain_prints_the_site_table(capsys):
    model, inputs = models.pixart(layers=1)
    torch._dynamo.reset()
    result = stamp_fx.explain(model, inputs, high_tokens=4)
    text = capsys.readouterr().out
    assert (
        "transformer_blocks.0.attn2.to_k:in" in text and "cross_kv" in text and "identity" in text
    )
    assert "hi-prec energy" in text and "%" in text
    assert result.table in text
    assert result.plan.sites["transformer_blocks.0.attn2.to_k:in"].transform == "identity"
    assert result.plan.sites["transformer_blocks.0.attn1.to_q:in"].high_tokens == 4


def test_calibrate_with_solver_budget_and_klt():
    model, _ = models.llama(seq=40)
    batches = [{"input_ids": models._ids(1, 40, s)} for s in range(3)]
    torch._dynamo.reset()
    plan = stamp_fx.calibrate(
        model, batches, StampConfig(high_tokens=4, avg_bits=4.5), show_progress=False
    )
    for key, policy in plan.sites.items():
        assert policy.bands is not None
        bits = policy.bit_vector(policy.make_transform(), 40)
        assert sum(bits) / len(bits) <= 4.5 + 1e-9, key
        assert 0 <= plan.meta["energy_fraction"][key] <= 1
    out = compile_and_run(model, batches[0], StampCompiler(inductor=False, plan=plan))
    torch.testing.assert_close(out, eager_with_plan(model, batches[0], plan), **F32_REORDER_TOL)
    torch._dynamo.reset()
    klt = stamp_fx.calibrate(model, batches, transform="klt", high_tokens=4, show_progress=False)
    assert klt.tensors and all(p.autocorr_key in klt.tensors for p in klt.sites.values())
    out = compile_and_run(model, batches[0], StampCompiler(inductor=False, plan=klt))
    torch.testing.assert_close(out, eager_with_plan(model, batches[0], klt), **F32_REORDER_TOL)


def test_klt_without_calibration_is_a_clear_error():
    assert "needs a calibrated plan" in _backend_error({"inductor": False, "transform": "klt"})


def test_calibrate_range_metric_differs_from_energy_and_keeps_budget():
    model, _ = models.llama(seq=40)
    batches = [{"input_ids": models._ids(1, 40, s)} for s in range(2)]
    plans = {}
    for metric in ("energy", "range"):
        torch._dynamo.reset()
        plans[metric] = stamp_fx.calibrate(
            model,
            batches,
            high_tokens=4,
            avg_bits=5.0,
            allocation_metric=metric,
            show_progress=False,
        )
    for plan in plans.values():
        for policy in plan.sites.values():
            bits = policy.bit_vector(policy.make_transform(), 40)
            assert sum(bits) / len(bits) <= 5.0 + 1e-9
    assert any(
        plans["energy"].sites[k].bands != plans["range"].sites[k].bands
        for k in plans["energy"].sites
    )
    with pytest.raises(ValueError, match="allocation_metric: unknown 'l1'; valid: energy, range"):
        StampConfig(allocation_metric="l1")


def test_klt_eigendecomposition_runs_once_per_length_across_forwards():
    from unittest import mock

    model, _ = models.llama(layers=1, seq=12)
    batches = [{"input_ids": models._ids(1, 12, s)} for s in range(2)]
    torch._dynamo.reset()
    plan = stamp_fx.calibrate(model, batches, transform="klt", high_tokens=4, show_progress=False)
    n_tensors = len({p.autocorr_key for p in plan.sites.values()})
    assert n_tensors >= 3
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=StampCompiler(inductor=False, plan=plan))
    with mock.patch("torch.linalg.eigh", wraps=torch.linalg.eigh) as eigh, torch.no_grad():
        first = compiled(**batches[0]).logits
        assert eigh.call_count == n_tensors  # one basis per autocorrelation at this length
        for _ in range(3):
            torch.testing.assert_close(compiled(**batches[0]).logits, first, rtol=0, atol=0)
        assert eigh.call_count == n_tensors  # cached: no eigh on later forwards
        compiled(input_ids=models._ids(1, 7, 0))
        assert eigh.call_count == 2 * n_tensors  # a new length: one more basis each
        compiled(input_ids=models._ids(1, 7, 1))
        assert eigh.call_count == 2 * n_tensors
