"""Site discovery: exact counts, roles, FQNs and skip reasons per architecture (no Inductor)."""

from collections import Counter

import pytest
import torch

from stamp_fx import StampCompiler, StampConfig
from tests import models
from tests.helpers import compile_and_run
from tests.tolerances import F32_REORDER_TOL, QUANTIZED_DIFFERS_ATOL_SMALL


def _sites(name, **config):
    model, inputs = models.FACTORIES[name]()
    compiler = StampCompiler(StampConfig(**config), inductor=False)
    compile_and_run(model, inputs, compiler, fullgraph=True)
    assert len(compiler.records) == 1  # one graph: no graph breaks
    return compiler.last


def _roles(record, slot="in"):
    return Counter(s.role for s in record.sites if s.slot == slot)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_llama_family_sites(name):
    rec = _sites(name)
    assert _roles(rec) == Counter(q=2, k=2, v=2, attn_out=2, mlp=6, other=1)
    assert _roles(rec, "k") == Counter(attn_k=2) and _roles(rec, "v") == Counter(attn_v=2)
    keys = {s.key: s for s in rec.sites}
    assert keys["model.layers.1.self_attn.q_proj:in"].role == "q"
    assert keys["model.layers.0.mlp.down_proj:in"].features == 64
    assert set(rec.plan.sites) == {s.key for s in rec.sites if s.slot == "in" and s.in_block}
    assert "outside the repeated blocks" in rec.plan.skipped["lm_head:in"]
    assert "quantize_kv" in rec.plan.skipped["model.layers.0.self_attn:k"]
    # A causal LM gets one attention-sink position by default.
    assert {p.sink_tokens for p in rec.plan.sites.values()} == {1}
    # q/k/v read one tensor and gate/up another: 4 stamp ops per layer for 7 linears.
    assert rec.passes[0].stats == {"stamp_ops": 8, "rewired_inputs": 14, "already_quantized": 0}


def test_gpt2_conv1d_sites_are_traced_back_to_their_sequence():
    rec = _sites("gpt2")
    assert _roles(rec) == Counter(qkv=2, attn_out=2, mlp=4, other=1)
    site = next(s for s in rec.sites if s.key == "transformer.h.0.attn.c_attn:in")
    assert site.reshape is not None and site.seq_dim == 1 and site.shape == ("2", "12", "32")
    assert {p.sink_tokens for p in rec.plan.sites.values()} == {1}  # GPT2LMHeadModel is causal


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_sites_sdpa_and_eager_attention(attn):
    model, inputs = models.bert(attn_implementation=attn)
    compiler = StampCompiler(StampConfig(quantize_kv=True), inductor=False)
    compile_and_run(model, inputs, compiler, fullgraph=True)
    rec = compiler.last
    assert _roles(rec) == Counter(q=2, k=2, v=2, attn_out=2, mlp=4, other=1)
    assert "no sequence axis" in rec.plan.skipped["pooler.dense:in"]
    assert {p.sink_tokens for p in rec.plan.sites.values()} == {0}  # an encoder has no sink
    kv = [s for s in rec.sites if s.slot in ("k", "v")]
    assert len(kv) == 4
    if attn == "sdpa":
        assert all(s.key in rec.plan.sites for s in kv)
    else:
        assert all("eager attention" in rec.plan.skipped[s.key] for s in kv)


def test_pixart_sites_cross_attention_and_conditioning():
    rec = _sites("pixart")
    roles = _roles(rec)
    assert roles == Counter(q=4, k=2, v=2, attn_out=4, cross_kv=4, mlp=4, other=6)
    plan = rec.plan
    assert plan.sites["transformer_blocks.0.attn2.to_k:in"].transform == "identity"
    assert plan.sites["transformer_blocks.0.attn2.to_q:in"].transform == "haar"
    assert plan.sites["transformer_blocks.1.attn1.to_v:in"].sink_tokens == 0
    for key in ("caption_projection.linear_1:in", "proj_out:in", "adaln_single.linear:in"):
        assert key in plan.skipped
    assert "no sequence axis" in plan.skipped["adaln_single.emb.timestep_embedder.linear_1:in"]
    assert len(plan.sites) == 20


def test_model_without_linear_layers_warns_and_compiles_unchanged():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.GELU()).eval()
    x = torch.randn(2, 5, 8)
    compiler = StampCompiler(inductor=False)
    with pytest.warns(UserWarning, match="no linear layers"):
        out = compile_and_run_plain(model, x, compiler)
    torch.testing.assert_close(out, model(x))
    assert compiler.last.plan.sites == {}


def compile_and_run_plain(model, x, compiler):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=compiler)(x)


def test_haar2d_on_a_second_resolution_skips_its_sites_instead_of_crashing():
    """A second image size makes Dynamo recompile with a dynamic length, which the grid cannot
    hold: those sites run unquantized with a warning (the grid-sized graph keeps STaMP)."""
    model, inputs = models.pixart()
    compiler = StampCompiler(
        StampConfig(transform="haar2d", grid=(4, 4), high_tokens=4), inductor=False
    )
    torch._dynamo.reset()
    run = torch.compile(model, backend=compiler)
    with torch.no_grad():
        models.main_output(run(**inputs))
        bigger = {**inputs, "hidden_states": torch.randn(2, 4, 16, 16)}
        with pytest.warns(UserWarning, match=r"haar2d grid \(4, 4\) fixes the sequence length"):
            out = models.main_output(run(**bigger))
    assert out.shape[-1] == 16 and torch.isfinite(out).all()
    first, second = compiler.records
    assert any(p.transform == "haar2d" for p in first.plan.sites.values())
    assert not any(p.transform == "haar2d" for p in second.plan.sites.values())
    assert any("fixes the sequence length" in r for r in second.plan.skipped.values())


def test_pixart_haar2d_on_its_token_grid():
    model, inputs = models.pixart(side=8)  # 4 x 4 token grid; text tokens are not on it
    compiler = StampCompiler(
        StampConfig(transform="haar2d", grid=(4, 4), high_tokens=4), inductor=False
    )
    compile_and_run(model, inputs, compiler)
    plan = compiler.last.plan
    assert plan.sites["transformer_blocks.0.attn1.to_q:in"].transform == "haar2d"
    assert (
        plan.sites["transformer_blocks.0.attn1.to_q:in"]
        .describe()
        .startswith("haar2d(J=auto) bits=8x4/4")
    )
    assert plan.sites["transformer_blocks.0.attn2.to_k:in"].transform == "identity"
    # A grid that the image sequence does not fill is a skip with a reason, not a crash.
    model, inputs = models.pixart(side=8)
    compiler = StampCompiler(StampConfig(transform="haar2d", grid=(8, 8)), inductor=False)
    with pytest.warns(
        UserWarning,
        match=r"stamp: 16 site\(s\) compiled without STaMP because an option does not fit them: "
        r"sequence of 16 tokens does not fill the haar2d grid \(8, 8\): transformer_blocks.0",
    ):
        compile_and_run(model, inputs, compiler)
    assert (
        "does not fill the haar2d grid (8, 8)"
        in compiler.last.plan.skipped["transformer_blocks.0.attn1.to_q:in"]
    )


class _Block(torch.nn.Module):
    def __init__(self, features=8):
        super().__init__()
        self.lin = torch.nn.Linear(features, features)

    def forward(self, x):
        return self.lin(x)


class _Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class _Stack(torch.nn.Module):
    def __init__(self, *blocks):
        super().__init__()
        self.layers = torch.nn.ModuleList(blocks)

    def forward(self, *args):
        for layer in self.layers:
            args = (layer(*args), *args[1:])
        return args[0]


def test_feature_rotation_on_a_dynamic_feature_dim_pinned_by_the_weight_is_quantized():
    # The weight specialises the dim to 8: a SymInt with a constant value, not symbolic.
    from stamp_fx import apply_plan_eager

    model = _Stack(_Block()).eval()
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    torch._dynamo.maybe_mark_dynamic(x, 2)
    compiler = StampCompiler(
        StampConfig(feature_transform="hadamard", high_tokens=1), inductor=False
    )
    out = compile_and_run_plain(model, x, compiler)
    (site,) = compiler.last.sites
    assert site.features == 8 and "layers.0.lin:in" in compiler.last.plan.sites
    handles = apply_plan_eager(model, compiler.last.plan)
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, ref, **F32_REORDER_TOL)
    assert not torch.allclose(out, model(x), atol=QUANTIZED_DIFFERS_ATOL_SMALL)


def test_feature_rotation_on_a_symbolic_feature_dim_skips_the_site_with_a_reason():
    model = _Stack(_Attention()).eval()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    for t in (q, k, v):
        torch._dynamo.mark_dynamic(t, 3)
    compiler = StampCompiler(
        StampConfig(feature_transform="hadamard", quantize_kv=True), inductor=False
    )
    torch._dynamo.reset()
    with (
        pytest.warns(
            UserWarning,
            match="an option does not fit them: feature_transform "
            "'hadamard' needs a static feature dim \\(it is symbolic\\): layers.0:k",
        ),
        torch.no_grad(),
    ):
        out = torch.compile(model, backend=compiler)(q, k, v)
    torch.testing.assert_close(out, model(q, k, v))
    plan = compiler.last.plan
    assert plan.sites == {}
    assert "needs a static feature dim" in plan.skipped["layers.0:k"]
    assert "needs a static feature dim" in plan.skipped["layers.0:v"]
