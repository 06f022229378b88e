"""Every accepted option does what it says or raises; a compile that quantizes less than the
user asked for says so (no Inductor, tiny models)."""

import warnings

import pytest
import torch

import stamp_fx
from stamp_fx import StampCompiler, StampConfig
from tests import models
from tests.helpers import compile_and_run, eager
from tests.passes.test_backend import _backend_error


@pytest.mark.parametrize(
    "options",
    [{"avg_bits": 6.0}, {"allowed_bits": [4, 6, 8]}, {"allocation_metric": "energy"}],
)
def test_solver_options_at_compile_time_raise_pointing_to_calibrate(options):
    (name,) = options
    message = _backend_error({"inductor": False, **options})
    assert message.startswith(f"{name}: the bit-allocation solver needs calibrated energies")
    assert "stamp_fx.calibrate(model, batches, avg_bits=...)" in message
    assert "options={'plan': plan}" in message


def test_solver_fields_in_a_config_given_to_the_compiler_raise():
    with pytest.raises(ValueError, match=r"^avg_bits, allocation_metric: the bit-allocation"):
        StampCompiler(StampConfig(avg_bits=4.5, allocation_metric="range"))
    with pytest.raises(ValueError, match=r"^allowed_bits: "):
        StampCompiler.from_options({"config": StampConfig(allowed_bits=(4, 6, 8))})
    assert StampCompiler(StampConfig()).config == StampConfig()  # defaults are fine


@pytest.mark.parametrize("name", ["plan", "lowering", "kernel", "mode", "inductor"])
def test_calibrate_and_tune_reject_backend_options_they_cannot_honour(name):
    value = {
        "plan": {"version": 1, "sites": {}},
        "lowering": "reference",
        "kernel": "reference",
        "mode": "default",
    }.get(name, False)
    model, inputs = models.llama(layers=1)
    match = rf"^{name}: calibrate does not accept this backend option"
    with pytest.raises(ValueError, match=match):
        stamp_fx.calibrate(model, [inputs], show_progress=False, **{name: value})
    with pytest.raises(ValueError, match=match.replace("calibrate", "tune")):
        stamp_fx.tune(model, [inputs], 4.5, show_progress=False, **{name: value})


def test_calibrate_honours_debug_dir(tmp_path):
    model, inputs = models.llama(layers=1)
    torch._dynamo.reset()
    stamp_fx.calibrate(model, [inputs], show_progress=False, debug_dir=str(tmp_path))
    (graph_dir,) = sorted(tmp_path.glob("graph_*"))
    assert "model.layers.0.mlp.down_proj:in" in (graph_dir / "sites.txt").read_text()


def test_explain_rejects_kernel_mode_and_inductor_and_honours_avg_bits(capsys):
    model, inputs = models.llama(layers=1, seq=40)
    for bad in (
        {"lowering": "reference"},
        {"kernel": "reference"},
        {"mode": "default"},
        {"inductor": True},
    ):
        (name,) = bad
        with pytest.raises(ValueError, match=rf"^{name}: explain"):
            stamp_fx.explain(model, inputs, **bad)
    torch._dynamo.reset()
    result = stamp_fx.explain(model, inputs, high_tokens=4, avg_bits=4.5, print_table=False)
    policy = result.plan.sites["model.layers.0.mlp.down_proj:in"]
    assert policy.bands is not None  # the solver ran on these inputs
    assert "bands[" in result.table  # and the table shows its bits


def test_compile_that_quantizes_nothing_says_so():
    model, inputs = models.llama(layers=1)  # hidden 32 / 64: group_size 7 divides neither
    with pytest.warns(UserWarning) as record:
        out = compile_and_run(
            model, inputs, StampCompiler(StampConfig(group_size=7), inductor=False)
        )
    messages = [str(w.message) for w in record]
    assert any(
        m.startswith(
            "stamp: 7 site(s) compiled without STaMP because an option does not fit them: "
            "group_size 7 does not divide the 32 features: model.layers.0.self_attn.q_proj:in"
        )
        for m in messages
    ), messages
    assert any(
        m.startswith("stamp: 0 of 10 sites quantized: the graph runs in float") for m in messages
    )
    assert torch.equal(out, eager(model, inputs))


def test_quantizing_compile_does_not_warn():
    model, inputs = models.llama(layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_and_run(model, inputs, StampCompiler(StampConfig(), inductor=False))


def test_pinned_plan_for_another_model_warns_with_counts_and_names():
    gpt2, gpt2_inputs = models.gpt2(layers=1)
    compiler = StampCompiler(StampConfig(high_tokens=4), inductor=False)
    compile_and_run(gpt2, gpt2_inputs, compiler)
    foreign = compiler.last.plan
    model, inputs = models.llama(layers=1)
    with pytest.warns(UserWarning) as record:
        out = compile_and_run(model, inputs, StampCompiler(inductor=False, plan=foreign))
    messages = [str(w.message) for w in record]
    assert any(
        m.startswith(
            "stamp: the pinned plan leaves 9 of 10 site(s) of this graph uncovered "
            "(they run unquantized): model.layers.0.self_attn.q_proj:in"
        )
        for m in messages
    ), messages
    assert any(
        m.startswith(
            f"stamp: {len(foreign.sites)} of the pinned plan's {len(foreign.sites)} "
            "quantized site(s) are not in this graph: transformer.h.0."
        )
        for m in messages
    ), messages
    assert any(m.startswith("stamp: 0 of 10 sites quantized") for m in messages)
    assert torch.equal(out, eager(model, inputs))


def test_pinned_plan_missing_one_site_warns_about_that_site():
    model, inputs = models.llama(layers=1)
    compiler = StampCompiler(StampConfig(high_tokens=4), inductor=False)
    compile_and_run(model, inputs, compiler)
    plan = compiler.last.plan
    key = "model.layers.0.mlp.down_proj:in"
    partial = stamp_fx.AllocationPlan(
        sites={k: v for k, v in plan.sites.items() if k != key}, skipped=plan.skipped
    )
    with pytest.warns(
        UserWarning, match=rf"leaves 1 of 10 site\(s\) of this graph uncovered .*: {key}$"
    ):
        compile_and_run(model, inputs, StampCompiler(inductor=False, plan=partial))


def test_kernel_is_the_old_name_of_lowering_and_warns():
    with pytest.warns(FutureWarning, match=r"'kernel' is now called 'lowering'"):
        compiler = StampCompiler.from_options({"kernel": "reference"})
    assert compiler.lowering.name == "reference" and compiler.options.lowering == "reference"
    assert compiler.options.kernel is None
    with pytest.warns(FutureWarning):
        assert StampCompiler(kernel="inductor").lowering.name == "inductor"
    assert StampCompiler.from_options({"lowering": "reference"}).lowering.name == "reference"
    with pytest.raises(ValueError, match=r"^lowering given twice"):
        StampCompiler.from_options({"lowering": "inductor", "kernel": "reference"})
