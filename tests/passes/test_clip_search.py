"""Activation clip ratios: the per-site search of ``calibrate(clip_search=...)`` against a brute
force over ratio pairs through the reference, and clipped plans end to end."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stamp_fx
from stamp_fx import SitePolicy, StampCompiler, apply_plan_eager
from stamp_fx.clip_search import DEFAULT_CLIP_RATIOS, ClipSearch, clip_ratios_from
from stamp_fx.reference import clamp_sinks, transformed_tokens
from tests import models
from tests.strategies import randn, seeds
from tests.tolerances import CLIP_SEARCH_REL

RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6)


def _outliers(seed: int, tokens: int = 64, features: int = 32) -> torch.Tensor:
    """Gaussian tokens with one large outlier feature each (what makes min-max ranges wide)."""
    x = randn((1, tokens, features), seed)
    where = torch.randint(0, features, (tokens,), generator=torch.Generator().manual_seed(seed))
    x[0, torch.arange(tokens), where] *= 8
    return x


def _site_error(policy: SitePolicy, x: torch.Tensor) -> float:
    return float((policy.apply(x.double(), 1) - x.double()).square().sum())


@settings(max_examples=12, deadline=None)
@given(
    seed=seeds,
    rotate=st.booleans(),
    symmetric=st.booleans(),
    bands=st.booleans(),
)
def test_search_picks_the_best_ratio_pair_of_a_brute_force(seed, rotate, symmetric, bands):
    """The two ratios are chosen apart (the transforms are orthonormal and tokens independent):
    the pair they make must be the best of all pairs, each measured on the whole site. Exact
    when the transformed tokens fill the Haar blocks (a padded tail's error is partly dropped
    by the inverse, so there the search's measure is a close proxy)."""
    policy = SitePolicy(
        sink_tokens=1, high_tokens=8, symmetric=symmetric,
        feature_transform="hadamard" if rotate else "none",
    )  # fmt: skip
    if bands:
        policy = policy.with_bands(stamp_fx.SpectralBitPlan((0.1, 0.5, 1.0), (8, 6, 4)))
    x = _outliers(seed, tokens=65)  # 64 transformed tokens: whole Haar blocks, no padding
    search = ClipSearch(RATIOS, solver_widths=(6,) if bands else ())
    sinks = clamp_sinks(policy.sink_tokens, x.shape[1])
    z = transformed_tokens(x, policy.make_transform(), sink_tokens=sinks, seq_dim=1)
    search.observe("site", z.movedim(1, 0), policy, x.shape[1])
    chosen = search.choose("site", policy)
    brute = min(
        _site_error(replace(policy, high_clip_ratio=h, clip_ratio=c), x)
        for h in RATIOS
        for c in RATIOS
    )
    assert _site_error(chosen, x) <= brute * (1 + CLIP_SEARCH_REL)
    assert _site_error(chosen, x) <= _site_error(policy, x)  # never worse than min-max


def test_wide_gaussian_tokens_get_a_clipped_range_at_four_bits():
    """The extreme of 512 Gaussian features lies past the best 4-bit clipping point (about
    2.5 sigma), so a ratio below 1 must win."""
    policy = SitePolicy(sink_tokens=1, high_tokens=8)
    x = randn((1, 64, 512), 3)
    search = ClipSearch(RATIOS)
    z = transformed_tokens(x, policy.make_transform(), sink_tokens=1, seq_dim=1)
    search.observe("site", z.movedim(1, 0), policy, x.shape[1])
    chosen = search.choose("site", policy)
    assert chosen.clip_ratio < 1.0
    assert _site_error(chosen, x) < _site_error(policy, x)
    assert search.choose("never seen", policy) is policy


def test_calibrated_clip_plan_round_trips_and_matches_the_eager_oracle(tmp_path):
    model, inputs = models.llama(seq=40)
    plan = stamp_fx.calibrate(model, [inputs], clip_search=True, show_progress=False, high_tokens=8)
    ratios = plan.meta["clip_ratios"]
    assert sorted(ratios) == sorted(plan.sites)
    assert all(r in DEFAULT_CLIP_RATIOS for pair in ratios.values() for r in pair)
    assert any(p.clips for p in plan.sites.values())  # the search found something to clip
    for key, (high, low) in ratios.items():
        assert (plan.sites[key].high_clip_ratio, plan.sites[key].clip_ratio) == (high, low)
    plan.save(tmp_path / "plan.json")
    again = stamp_fx.load_plan(tmp_path / "plan.json")
    assert again.sites == plan.sites
    # The compiled graph runs the clipped plan as the hook-based reference does.
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=StampCompiler(plan=again, inductor=False))
    with torch.no_grad():
        got = models.main_output(compiled(**inputs))
        handles = apply_plan_eager(model, again)
        try:
            want = models.main_output(model(**inputs))
        finally:
            for h in handles:
                h.remove()
    assert torch.equal(got, want)


def test_clip_search_options_are_validated():
    assert clip_ratios_from(True) == DEFAULT_CLIP_RATIOS
    assert clip_ratios_from(False) is None
    assert clip_ratios_from([0.9, 0.8]) == (1.0, 0.9, 0.8)  # min-max always competes
    for bad in ("yes", [], [1.2], [0.0]):
        with pytest.raises(ValueError, match="clip_search"):
            clip_ratios_from(bad)
    model, inputs = models.llama(seq=16)
    with pytest.raises(ValueError, match="clip_search"):
        stamp_fx.calibrate(model, [inputs], clip_search="yes", show_progress=False)


def test_clip_ratio_is_a_policy_option_with_overrides():
    model, inputs = models.llama(seq=24)
    compiler = StampCompiler.from_options(
        {"clip_ratio": 0.9, "overrides": {"re:.*down_proj": {"clip_ratio": 0.7}}, "inductor": False}
    )
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=compiler)(**inputs)
    sites = compiler.last.plan.sites
    assert sites["model.layers.0.self_attn.q_proj:in"].clip_ratio == 0.9
    assert sites["model.layers.0.mlp.down_proj:in"].clip_ratio == 0.7
    assert "clip=1/0.7" in sites["model.layers.0.mlp.down_proj:in"].describe()
    with pytest.raises(ValueError, match=r"clip_ratio: must be a number in \(0, 1\]"):
        StampCompiler.from_options({"clip_ratio": 1.5})
