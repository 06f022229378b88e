"""Tensor parallelism on 2 gloo CPU ranks: the STaMP-quantized model is the same computation on
one process and on two (issue 16).

The oracle is the same tiny Llama compiled with ``backend="stamp"`` in one process (each rank
computes it before sharding). Models run in float64 so that the row-parallel linears' other
summation order stays far below every quantization step (``TP_F64_TOL``). Without the sharded
quantizer (each rank quantizing its own feature shard) the outputs differ by ~3e-3 here.
"""

from __future__ import annotations

import pytest
import torch

from stamp_fx.plan import SitePolicy
from stamp_fx.quantizer import fake_quant
from stamp_fx.sharding import ShardSpec, shard_strategy
from tests.distributed import tp_worker
from tests.distributed.launch import run_ranks
from tests.tolerances import TP_F64_TOL

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)

WORLD = 2
CONFIGS = {
    "default": {},
    "hadamard_kv": {"feature_transform": "hadamard", "quantize_kv": True},
}
SHARDED_OPS = {"stamp.fake_quant_sharded.default", "stamp.fake_quant_gathered.default"}


def _check_same_computation(results, sharded_op: str):
    for rank, r in enumerate(results):
        single, tp = r["single"], r["tp"]
        # The same sites, with the same policies, as one process plans.
        assert tp["sites"] == single["sites"], f"rank {rank}"
        assert tp["ops"].get(sharded_op, 0) > 0, tp["ops"]
        torch.testing.assert_close(tp["out"], single["out"], **TP_F64_TOL)
        assert not [w for w in tp["warnings"] if "stamp" in w], tp["warnings"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parallelize_module_matches_one_process(name, tmp_path):
    options = {"inductor": False, **CONFIGS[name]}
    results = run_ranks(
        tp_worker.parallelize_module_vs_single, WORLD, tmp_path, options, torch.float64
    )
    # hidden 64 over 2 ranks: the default Hadamard block (64) spans o_proj's shards (gather);
    # without a rotation every row-parallel site all-reduces its ranges.
    _check_same_computation(
        results,
        "stamp.fake_quant_gathered.default"
        if name == "hadamard_kv"
        else "stamp.fake_quant_sharded.default",
    )


def test_parallelize_module_through_inductor(tmp_path):
    results = run_ranks(tp_worker.parallelize_module_vs_single, WORLD, tmp_path, {}, torch.float64)
    _check_same_computation(results, "stamp.fake_quant_sharded.default")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_tp_plan_matches_one_process(name, tmp_path):
    options = {"inductor": False, **CONFIGS[name]}
    checkpoint = tmp_path / "tiny-llama"
    results = run_ranks(
        tp_worker.tp_plan_vs_single, WORLD, tmp_path, options, torch.float64, str(checkpoint)
    )
    _check_same_computation(
        results,
        "stamp.fake_quant_gathered.default"
        if name == "hadamard_kv"
        else "stamp.fake_quant_sharded.default",
    )


def test_sequence_parallel_input_is_refused_with_a_reason(tmp_path):
    for r in run_ranks(tp_worker.sequence_parallel_mlp, WORLD, tmp_path):
        # gate/up read tokens split across ranks: unquantized, with the reason in a warning;
        # down_proj reads the gathered tokens' feature shard and is quantized.
        skipped = {k: v for k, v in r["skipped"].items() if "sequence-parallel" in v}
        assert set(skipped) == {"layers.0.gate_proj:in", "layers.0.up_proj:in"}, r["skipped"]
        assert any("sequence-parallel" in w and "gate_proj" in w for w in r["warnings"])
        assert set(r["sites"]) == {"layers.0.down_proj:in"}
        assert r["out"].shape == r["eager"].shape


# -- without processes ---------------------------------------------------------------------


def _quantize_shards(shards, **kw):
    """Each shard quantized with the range over all shards (an all-reduce, simulated)."""
    seen = []
    for s in shards:  # what each rank contributes
        fake_quant(
            s, 4, token_dim=1, reduce_range=lambda lo, hi: seen.append((lo, hi)) or (lo, hi), **kw
        )
    lo = torch.minimum(*[r[0] for r in seen])
    hi = torch.maximum(*[r[1] for r in seen])
    return torch.cat(
        [fake_quant(s, 4, token_dim=1, reduce_range=lambda _l, _h: (lo, hi), **kw) for s in shards],
        -1,
    )


@pytest.mark.parametrize("symmetric", [False, True])
def test_reduced_range_on_shards_equals_the_whole_tensor(symmetric):
    """The quantizer's reduce_range hook on two feature shards gives the whole tensor's
    fake quant bit for bit (min and max are exact), in float32."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 16, generator=gen) * torch.linspace(0.1, 5, 16)
    whole = fake_quant(x, 4, token_dim=1, symmetric=symmetric)
    assert torch.equal(_quantize_shards(x.chunk(2, dim=-1), symmetric=symmetric), whole)
    naive = torch.cat(
        [fake_quant(s, 4, token_dim=1, symmetric=symmetric) for s in x.chunk(2, -1)], -1
    )
    assert not torch.equal(naive, whole)  # the per-shard range is another computation


def test_shard_strategy_is_the_cheapest_exact_one():
    spec = ShardSpec(group="0", size=2, features=128, local_features=64, source="dtensor")
    plain = SitePolicy()
    assert shard_strategy(None, plain) == "local"
    assert shard_strategy(spec, plain) == "reduce"
    assert shard_strategy(spec, plain, masked=True) == "gather"
    rot = SitePolicy(feature_transform="hadamard")  # pow2 block of 128 features: 128
    assert shard_strategy(spec, rot) == "gather"
    assert (
        shard_strategy(spec, SitePolicy(feature_transform="hadamard", feature_block=32)) == "reduce"
    )
    assert shard_strategy(spec, SitePolicy(group_size=32)) == "local"
    assert shard_strategy(spec, SitePolicy(group_size=128)) == "gather"
