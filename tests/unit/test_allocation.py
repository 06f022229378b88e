"""Theorem-1 solvers: budget, optimality against brute force, monotonicity, presets."""

import itertools
import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from stamp_fx import (
    LayerCurve,
    SpectralBitPlan,
    allocate_layer_budgets,
    bound_objective,
    continuous_bits,
    haar_band_fractions,
    haar_band_plan,
    paper_preset,
    solve_band_bits,
    solve_token_bits,
)
from tests.tolerances import BRUTE_FORCE_REL, BUDGET_SLACK_BITS

energies_st = st.lists(
    st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=7
)
# Equally spaced sets (the solver is exact there) and one that is not.
equal_spaced = st.sampled_from([(4, 8), (4, 6, 8), (2, 3, 4), (3, 5, 7), (8,)])
any_allowed = st.sampled_from([(4, 8), (4, 6, 8), (2, 4, 8), (3, 4, 8, 16)])


def _brute_force(energies, avg_bits, allowed):
    budget = math.floor(avg_bits * len(energies) + BUDGET_SLACK_BITS)
    best = None
    for combo in itertools.product(allowed, repeat=len(energies)):
        if sum(combo) <= budget:
            obj = bound_objective(energies, combo)
            if best is None or obj < best:
                best = obj
    return best


@given(energies=energies_st, allowed=any_allowed, frac=st.floats(0, 1))
def test_solver_never_exceeds_budget_and_uses_allowed_widths(energies, allowed, frac):
    avg = allowed[0] + frac * (allowed[-1] - allowed[0])
    bits = solve_token_bits(energies, avg, allowed)
    assert len(bits) == len(energies)
    assert set(bits) <= set(allowed)
    assert sum(bits) <= avg * len(energies) + BUDGET_SLACK_BITS


@given(energies=energies_st, allowed=equal_spaced, frac=st.floats(0, 1))
def test_solver_equals_brute_force_on_equally_spaced_widths(energies, allowed, frac):
    avg = allowed[0] + frac * (allowed[-1] - allowed[0])
    bits = solve_token_bits(energies, avg, allowed)
    assert bound_objective(energies, bits) == pytest.approx(
        _brute_force(energies, avg, allowed), rel=BRUTE_FORCE_REL, abs=1e-300
    )


@given(energies=energies_st, allowed=any_allowed, a=st.floats(0, 1), b=st.floats(0, 1))
def test_raising_the_budget_never_lowers_a_tokens_bits(energies, allowed, a, b):
    lo, hi = sorted((a, b))
    span = allowed[-1] - allowed[0]
    low_bits = solve_token_bits(energies, allowed[0] + lo * span, allowed)
    high_bits = solve_token_bits(energies, allowed[0] + hi * span, allowed)
    assert all(h >= l for h, l in zip(high_bits, low_bits))


@given(energies=st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=50))
def test_high_energy_tokens_get_at_least_as_many_bits(energies):
    bits = solve_token_bits(energies, 5.0, (4, 6, 8))
    for (e1, b1), (e2, b2) in itertools.combinations(zip(energies, bits), 2):
        if e1 > e2:
            assert b1 >= b2


def test_solver_with_paper_budget_picks_the_energetic_tokens():
    energies = [100.0] * 64 + [1.0] * (2048 - 64)
    bits = solve_token_bits(energies, 4.125)
    assert bits == paper_preset(2048, 64, 8, 4)
    assert sum(bits) / len(bits) == 4.125


def test_continuous_form_matches_half_log2_energy_and_budget():
    energies = [1.0, 4.0, 16.0, 64.0]
    b = continuous_bits(energies, 5.0)
    assert sum(b) / 4 == pytest.approx(5.0)
    assert [y - x for x, y in zip(b, b[1:])] == pytest.approx([1.0, 1.0, 1.0])


def test_spectral_plan_reproduces_haar_bands_at_every_length():
    plan = haar_band_plan(5, [8, 4, 4, 4, 4, 4])
    for n in (2048, 4096, 32, 64 * 7):
        bits = plan.token_bits(n)
        assert len(bits) == n and bits.count(8) == n // 32
    assert plan.average(2048) == pytest.approx(4.125)
    assert SpectralBitPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ValueError, match="bands"):
        haar_band_plan(2, [8, 4])
    with pytest.raises(ValueError, match="end at 1.0"):
        SpectralBitPlan((0.5, 0.9), (8, 4))


@given(
    band_e=st.lists(st.floats(0, 1e4), min_size=4, max_size=4),
    allowed=st.sampled_from([(4, 8), (4, 6, 8)]),
    frac=st.floats(0, 1),
)
def test_band_solver_is_exact_and_within_budget(band_e, allowed, frac):
    fr = haar_band_fractions(3)
    avg = allowed[0] + frac * (allowed[-1] - allowed[0])
    bits = solve_band_bits(band_e, fr, avg, allowed)
    assert sum(f * b for f, b in zip(fr, bits)) <= avg + BUDGET_SLACK_BITS
    best = min(
        bound_objective(band_e, c)
        for c in itertools.product(allowed, repeat=4)
        if sum(f * b for f, b in zip(fr, c)) <= avg + BUDGET_SLACK_BITS
    )
    assert bound_objective(band_e, bits) == pytest.approx(best)
    greedy = solve_band_bits(band_e, fr, avg, allowed, max_exhaustive=1)
    assert sum(f * b for f, b in zip(fr, greedy)) <= avg + BUDGET_SLACK_BITS


def _curve(name, size, scale):
    return LayerCurve(
        name, size, tuple((b, scale * 4.0 ** (-b)) for b in (4.0, 4.5, 5.0, 6.0, 8.0))
    )


@given(
    scales=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=4),
    sizes=st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=4, max_size=4),
    avg=st.floats(4.0, 8.0),
)
def test_layer_budgets_respect_weighted_budget_and_beat_uniform(scales, sizes, avg):
    layers = [_curve(f"l{i}", sizes[i], s) for i, s in enumerate(scales)]
    choice = allocate_layer_budgets(layers, avg)
    total = sum(l.size for l in layers)
    assert sum(l.size * choice[l.name] for l in layers) <= avg * total + 1e-6
    err = sum(dict(l.options)[choice[l.name]] for l in layers)
    # Never worse than the best uniform choice that fits.
    uniform = [b for b, _ in layers[0].options if b <= avg + 1e-12]
    assume(uniform)
    assert err <= sum(dict(l.options)[max(uniform)] for l in layers) * (1 + 1e-9)


@pytest.mark.parametrize("avg", [4.0, 4.25, 4.5, 5.0, 5.5, 6.0, 7.0])
def test_layer_budgets_match_brute_force_on_convex_curves(avg):
    layers = [_curve("a", 1.0, 1.0), _curve("b", 1.0, 50.0), _curve("c", 2.0, 5.0)]
    choice = allocate_layer_budgets(layers, avg)
    best = min(
        sum(dict(l.options)[b] for l, b in zip(layers, combo))
        for combo in itertools.product(*[[b for b, _ in l.options] for l in layers])
        if sum(l.size * b for l, b in zip(layers, combo)) <= avg * 4 + BUDGET_SLACK_BITS
    )
    assert sum(dict(l.options)[choice[l.name]] for l in layers) == pytest.approx(
        best, rel=BRUTE_FORCE_REL
    )


def test_solver_input_errors():
    with pytest.raises(ValueError, match="below the smallest allowed width 4"):
        solve_token_bits([1.0], 3.0)
    with pytest.raises(ValueError, match="2..16"):
        solve_token_bits([1.0], 4.0, (1, 4))
    with pytest.raises(ValueError, match="non-negative"):
        solve_token_bits([-1.0], 4.0)
    with pytest.raises(ValueError, match="unique"):
        allocate_layer_budgets([_curve("a", 1, 1), _curve("a", 1, 1)], 5.0)
    with pytest.raises(ValueError, match="size"):
        LayerCurve("x", 0, ((4.0, 1.0),))
