"""The ``feature_block`` option: validation, JSON round trips of configs and plans, the site
policy's rotation (reference twin of the compiled ops), and the unchanged default."""

import json

import pytest
import torch

from stamp_fx import AllocationPlan, SitePolicy, StampConfig
from stamp_fx.options import from_options
from stamp_fx.rotations import feature_rotation
from stamp_fx.transforms import block_hadamard
from tests.strategies import randn


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"feature_transform": "hadamard", "feature_block": "half"},
            "feature_block: must be one of 'pow2', 'full' or a positive int",
        ),
        ({"feature_transform": "hadamard", "feature_block": 0}, "feature_block: must be one of"),
        ({"feature_transform": "hadamard", "feature_block": True}, "feature_block: must be one of"),
        ({"feature_transform": "hadamard", "feature_block": 12.0}, "feature_block: must be one of"),
        ({"feature_block": "full"}, "feature_block: 'full' sets the block of the feature rotation"),
        ({"feature_block": 64}, "also pass feature_transform='hadamard'"),
    ],
)
def test_invalid_feature_blocks_raise_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StampConfig(**kwargs)


def test_compile_options_are_validated_too():
    with pytest.raises(ValueError, match="feature_block: must be one of"):
        from_options({"feature_transform": "hadamard", "feature_block": "all"})
    config, _ = from_options({"feature_transform": "hadamard", "feature_block": "full"})
    assert config.feature_block == "full"


def test_an_override_that_rotates_makes_the_block_meaningful():
    config = StampConfig(
        feature_block="full", overrides={"re:.*mlp.*": {"feature_transform": "hadamard"}}
    )
    assert config.feature_block == "full"
    # An override may set the block for some sites, and turn the rotation off for others.
    StampConfig(
        feature_transform="hadamard",
        overrides={
            "re:.*mlp.*": {"feature_block": 12},
            "re:.*o_proj.*": {"feature_transform": "none"},
        },
    )
    with pytest.raises(ValueError, match="also pass feature_transform='hadamard'"):
        StampConfig(overrides={"re:.*mlp.*": {"feature_block": 12}})  # nothing rotates
    with pytest.raises(ValueError, match="overrides.*unknown field"):
        StampConfig(overrides={"x": {"feature_blocks": 12}})


@pytest.mark.parametrize("block", ["pow2", "full", 12])
def test_config_and_plan_round_trip(block):
    config = StampConfig(feature_transform="hadamard", feature_block=block)
    assert StampConfig.from_json(config.to_json()) == config
    policy = SitePolicy.from_config(config, sink_tokens=1)
    plan = AllocationPlan(sites={"model.layers.0.mlp.down_proj:in": policy})
    again = AllocationPlan.from_dict(json.loads(plan.to_json()))
    assert again.sites == plan.sites
    assert again.sites["model.layers.0.mlp.down_proj:in"].feature_block == block


def test_plans_written_before_the_option_load_as_pow2():
    data = SitePolicy(feature_transform="hadamard").to_dict()
    del data["feature_block"]
    assert SitePolicy.from_dict(data).feature_block == "pow2"
    with pytest.raises(ValueError, match="plan site 'a:in': feature_block: must be one of"):
        AllocationPlan.from_dict(
            {"version": 1, "sites": {"a:in": {**data, "feature_block": "wide"}}}
        )


def test_default_policy_is_the_power_of_two_block_bit_for_bit():
    """feature_block defaults to pow2: the historical block_hadamard(x, 64) sandwich at 576."""
    policy = SitePolicy(feature_transform="hadamard", high_tokens=8, sink_tokens=1)
    assert policy.rotation_block(576) == 64
    x = randn((1, 20, 576), 3)
    expected = block_hadamard(policy.apply_sequence(block_hadamard(x, 64), 1), 64)
    assert torch.equal(policy.apply(x, 1), expected)


@pytest.mark.parametrize(("block", "expected"), [("full", 48), (12, 12), ("pow2", 16)])
def test_policy_rotation_block_and_reference(block, expected):
    policy = SitePolicy(feature_transform="hadamard", feature_block=block, high_tokens=4)
    assert policy.rotation_block(48) == expected
    assert "+hadamard" in policy.describe()
    x = randn((2, 10, 48), 7)
    inner = policy.apply_sequence(feature_rotation(x, expected), 1)
    assert torch.equal(policy.apply(x, 1), feature_rotation(inner, expected, inverse=True))
    # A rotation around the quantizer changes the result (the option does something).
    plain = SitePolicy(high_tokens=4).apply(x, 1)
    assert not torch.equal(policy.apply(x, 1), plain)
    assert SitePolicy(feature_block=block).rotation_block(48) is None  # no rotation asked


def test_a_block_that_does_not_divide_the_site_is_a_reasoned_skip():
    from stamp_fx.analysis import Site
    from stamp_fx.planner import site_conflict

    site = Site(
        fqn="m.layers.0.q", slot="in", role="q", consumer=None, arg_index=0, origin=None,
        seq_dim=1, shape=("1", "9", "48"), features=48,
    )  # fmt: skip
    policy = SitePolicy(feature_transform="hadamard", feature_block=36)
    assert site_conflict(site, policy) == "feature_block 36 does not divide the 48 features"
