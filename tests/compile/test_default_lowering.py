"""The default lowering (``auto``) through CPU Inductor, for every configuration users run.

No site of any of them may be left as an extern call into a ``stamp::`` op (that is the eager
reference: the slow path a user must ask for by name); the compiled model must equal the eager
application of its plan under DESIGN.md section 5's whole-model rule; a new sequence length
under ``dynamic=True`` must not recompile, also across the brackets where the auto Haar depth
changes.
"""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from stamp_fx import StampCompiler, StampConfig
from tests import models
from tests.helpers import assert_no_worse_than_eager, stamp_calls


def run_default(model, inputs, config, **compile_kwargs):
    torch._dynamo.reset()
    compiler = StampCompiler(config)  # no lowering= : the default
    compiled = torch.compile(model, backend=compiler, **compile_kwargs)
    with torch.no_grad():
        out, codes = run_and_get_code(lambda: models.main_output(compiled(**inputs)))
    return out, "\n".join(codes), compiler


LLAMA_CONFIGS = {
    "no options": {},
    "+hadamard": {"feature_transform": "hadamard"},
    "+hadamard +kv": {"feature_transform": "hadamard", "quantize_kv": True},
    "dct": {"transform": "dct"},
    "wht": {"transform": "wht"},
    "symmetric": {"symmetric": True},
    "groups": {"group_size": 8},
    "clipped": {"clip_ratio": 0.85, "high_clip_ratio": 0.95},
}


@pytest.mark.parametrize("name", sorted(LLAMA_CONFIGS))
def test_llama_default_lowering_has_no_extern_stamp_call(name):
    model, inputs = models.llama(layers=1, seq=20)
    config = StampConfig(high_tokens=4, **LLAMA_CONFIGS[name])
    out, code, compiler = run_default(model, inputs, config, fullgraph=True)
    assert compiler.lowering.name == "auto"
    assert not stamp_calls(code), stamp_calls(code)[:3]
    plan = compiler.last.plan
    assert plan.sites, "nothing was quantized"
    assert_no_worse_than_eager(out, model, inputs, plan)
    # The kernel choice is recorded on the graph: every stamp node says what runs it.
    labels = [n.meta.get("stamp_kernel") for n in compiler.last.graph.graph.nodes]
    assert "inductor" in labels and "reference" not in labels


def test_pixart_haar2d_hadamard_default_lowering_has_no_extern_stamp_call():
    model, inputs = models.pixart()
    config = StampConfig(
        transform="haar2d", grid=(4, 4), high_tokens=4, feature_transform="hadamard"
    )
    out, code, compiler = run_default(model, inputs, config, fullgraph=True)
    assert not stamp_calls(code), stamp_calls(code)[:3]
    plan = compiler.last.plan
    assert any(p.transform == "haar2d" for p in plan.sites.values())
    assert_no_worse_than_eager(out, model, inputs, plan)


def test_dynamic_lengths_across_depth_brackets_never_recompile(tmp_path):
    """Auto Haar depth changes between these lengths (high_tokens=4: 1, 2 and 3 levels after
    the sink); the default lowering keeps one compiled graph for all of them. The debug dump
    shows what runs each site."""
    from stamp_fx.transforms import auto_haar_levels

    lengths = (9, 17, 33)
    assert len({auto_haar_levels(s - 1, 4) for s in lengths}) == 3
    model, _ = models.llama(layers=1)
    compiler = StampCompiler(StampConfig(high_tokens=4), debug_dir=str(tmp_path))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for seq in lengths:
            inputs = {"input_ids": models._ids(2, seq, seq)}
            out = compiled(**inputs).logits
            assert_no_worse_than_eager(out, model, inputs, compiler.last.plan)
    assert len(compiler.records) == 1
    graph_dir = sorted(tmp_path.glob("graph_*"))[-1]  # (Dynamo may trace twice before it keeps one)
    dump = (graph_dir / "03_after_select_kernels.txt").read_text()
    # On the CPU, auto depth under a symbolic length is the reference call (decided per call).
    assert "stamp_kernel: reference" in dump and "stats={'reference': 4}" in dump
