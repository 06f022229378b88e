"""StampConfig: defaults, JSON round trip, validation messages."""

import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stamp_fx import CONFIG_VERSION, StampConfig, TokenBits
from stamp_fx.plan import SitePolicy

configs = st.builds(
    StampConfig,
    transform=st.sampled_from(["identity", "haar", "dct", "wht", "haar2d"]),
    levels=st.none() | st.integers(0, 8),
    depth_target=st.none() | st.integers(1, 256),
    grid=st.none() | st.tuples(st.integers(1, 64), st.integers(1, 64)),
    high_tokens=st.integers(1, 256),
    high_bits=st.integers(8, 16),
    low_bits=st.integers(2, 8),
    sink_tokens=st.none() | st.integers(0, 1),
    symmetric=st.booleans(),
    group_size=st.none() | st.sampled_from([32, 64, 128]),
    allowed_bits=st.sampled_from([(4, 8), (4, 6, 8), (2, 4, 8)]),
    avg_bits=st.none() | st.floats(4.0, 8.0),
)


@given(configs)
def test_json_round_trip(config):
    text = config.to_json()
    again = StampConfig.from_json(text)
    assert again == config
    assert json.loads(text)["version"] == CONFIG_VERSION


def test_paper_defaults():
    c = StampConfig()
    assert (c.transform, c.high_tokens, c.high_bits, c.low_bits, c.symmetric, c.group_size) == (
        "haar",
        64,
        8,
        4,
        False,
        None,
    )
    assert c.token_bits() == TokenBits(64, 8, 4)
    assert c.make_transform().levels_for(2048) == 5
    assert c.resolved_sink_tokens(causal=True) == 1 and c.resolved_sink_tokens(causal=False) == 0
    assert StampConfig(sink_tokens=0).resolved_sink_tokens(causal=True) == 0


def test_config_is_frozen_and_hashable():
    c = StampConfig()
    with pytest.raises(AttributeError):
        c.high_bits = 6  # type: ignore[misc]
    assert hash(c) == hash(StampConfig())
    assert c.replace(high_bits=6).high_bits == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"transform": "fft"},
            "transform: unknown 'fft'; valid: dct, haar, haar2d, identity, klt, wht",
        ),
        ({"high_bits": 17}, "high_bits must be in 2..16"),
        ({"low_bits": 4.5}, "low_bits must be an int"),
        ({"low_bits": 8, "high_bits": 4}, "must not exceed high_bits"),
        ({"high_tokens": -1}, "high_tokens"),
        ({"sink_tokens": 65}, "count inside the high-precision budget"),
        ({"levels": -2}, "levels"),
        ({"depth_target": 0}, "depth_target: must be None"),
        ({"grid": (0, 4)}, "grid"),
        ({"group_size": 0}, "group_size"),
        ({"allowed_bits": ()}, "allowed_bits"),
        ({"allowed_bits": (4, 40)}, "allowed_bits"),
        ({"avg_bits": 9.0}, "outside the range of allowed_bits"),
        ({"symmetric": "yes"}, "symmetric"),
        ({"version": 99}, "version"),
    ],
)
def test_invalid_fields_raise_with_helpful_messages(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StampConfig(**kwargs)


def test_from_dict_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown StampConfig key\(s\) \['bitz'\]; valid keys: transform, levels"
    ):
        StampConfig.from_dict({"bitz": 4})
    with pytest.raises(TypeError):
        StampConfig.from_dict([1, 2])


def test_haar2d_without_grid_fails_when_the_transform_is_built():
    c = StampConfig(transform="haar2d")
    with pytest.raises(ValueError, match="needs grid"):
        c.make_transform()
    assert c.make_transform(grid=(64, 64)).levels == 3


def test_json_round_trip_keeps_override_order():
    # Later overrides win for the fields they set, so their order is part of the config.
    overrides = {
        "re:.*proj": {"low_bits": 8},
        "a.q_proj": {"low_bits": 3},
        "_default": {"high_tokens": 2},
    }
    c = StampConfig(overrides=overrides)
    again = StampConfig.from_json(c.to_json())
    assert again == c
    assert [p for p, _ in again.overrides] == ["re:.*proj", "a.q_proj", "_default"]
    assert list(c.to_dict()["overrides"]) == ["re:.*proj", "a.q_proj", "_default"]
    # The other fields are still written in a stable, sorted order.
    assert list(json.loads(c.to_json())) == sorted(StampConfig.field_names())


def test_json_round_trip_keeps_repeated_override_patterns():
    c = StampConfig(
        overrides=[("re:.*", {"low_bits": 3}), ("a.q_proj", "skip"), ("re:.*", {"low_bits": 6})]
    )
    again = StampConfig.from_json(c.to_json())
    assert again == c and len(again.overrides) == 3


def test_override_order_decides_the_winner_after_a_round_trip():
    from stamp_fx.analysis import Site
    from stamp_fx.planner import build_plan

    site = Site(
        fqn="layers.0.q_proj", slot="in", role="q", consumer=None, arg_index=0, origin=None,
        seq_dim=1, shape=("1", "8", "16"), features=16, in_block=True,
    )  # fmt: skip
    c = StampConfig(overrides={"re:.*q_proj": {"low_bits": 6}, "layers.0.q_proj": {"low_bits": 3}})
    for config in (c, StampConfig.from_json(c.to_json())):
        plan = build_plan([site], config, causal=False)
        assert plan.sites["layers.0.q_proj:in"].low_bits == 3


def test_depth_target_sets_the_haar_depth_apart_from_high_tokens():
    # None follows high_tokens (the paper's rule): a 32-token band at 2048 tokens is 6 levels.
    assert StampConfig(high_tokens=32).make_transform().levels_for(2048) == 6
    assert StampConfig(high_tokens=32, depth_target=64).make_transform().levels_for(2048) == 5
    # A site policy records the target resolved, so a per-site token count (an override, the
    # tuner's choice) changes the bits and leaves the transform as it was.
    policy = SitePolicy.from_config(StampConfig(), sink_tokens=1)
    assert policy.depth_target == 64
    tuned = replace(policy, high_tokens=256)
    assert tuned.make_transform().levels_for(2047) == policy.make_transform().levels_for(2047) == 5
    assert tuned.bit_vector(tuned.make_transform(), 2048).count(8) == 256
    assert tuned.describe() == "haar(J=auto->64) bits=8x256/4 sinks=1"
    # A plan saved before the field existed keeps the coupling it was made with.
    saved = {k: v for k, v in tuned.to_dict().items() if k != "depth_target"}
    old = SitePolicy.from_dict(saved)
    assert old.depth_target is None and old.make_transform().levels_for(2047) == 3
