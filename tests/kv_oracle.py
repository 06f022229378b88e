"""An eager oracle of generation under STaMP with quantize-on-write K/V (README, "Decode steps").

Built from the config and module names alone, never from the compiler's analysis or plan:

* every block linear (``tests.helpers.config_plan``) quantizes its input: a one-token input (a
  decode step; prompts here are longer than one token) by the decode rule, a longer one by the
  config's sequence rule;
* keys and values are quantized by the cache as they are written (a ``Cache`` subclass whose
  ``update`` quantizes the new block: the sequence rule along axis 2 for a block of several
  tokens, the decode rule for one token), so nothing in the cache is quantized twice.

The decode rule is spelled out here from its documentation (per-token min-max at
``decode_bits``, default ``high_bits``; no sequence transform, no sink), not imported.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from transformers import DynamicCache, StaticCache

from stamp_fx import SitePolicy, StampConfig
from tests.helpers import config_plan


def decode_rule(config: StampConfig) -> SitePolicy:
    bits = config.high_bits if config.decode_bits is None else config.decode_bits
    return SitePolicy(
        transform="identity", sink_tokens=0, high_tokens=0, high_bits=max(bits, config.high_bits),
        low_bits=bits, feature_transform=config.feature_transform,
        feature_block=config.feature_block, symmetric=config.symmetric, group_size=config.group_size,
    )  # fmt: skip


def sequence_rule(config: StampConfig) -> SitePolicy:
    return SitePolicy.from_config(config, sink_tokens=config.resolved_sink_tokens(causal=True))


class _QuantizeOnWrite:
    """Mixed into a transformers cache: quantize each block of new K/V once, as written."""

    stamp_config: StampConfig

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        config = self.stamp_config
        rule = decode_rule(config) if key_states.shape[-2] == 1 else sequence_rule(config)
        key_states, value_states = rule.apply(key_states, 2), rule.apply(value_states, 2)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class OracleDynamicCache(_QuantizeOnWrite, DynamicCache):
    def __init__(self, stamp_config: StampConfig, **kwargs):
        super().__init__(**kwargs)
        self.stamp_config = stamp_config


class OracleStaticCache(_QuantizeOnWrite, StaticCache):
    def __init__(self, stamp_config: StampConfig, **kwargs):
        super().__init__(**kwargs)
        self.stamp_config = stamp_config


@contextlib.contextmanager
def linear_hooks(model, config: StampConfig):
    """Pre-hooks on every block linear: the decode rule on one token, else the sequence rule."""
    plan = config_plan(model, replace(config, quantize_kv=False), causal=True)
    one_token = decode_rule(config)
    handles = []
    for key, policy in plan.sites.items():
        module = model.get_submodule(key.rpartition(":")[0])

        def hook(mod, args, policy=policy):
            x = args[0]
            rule = one_token if x.shape[1] == 1 else policy
            return (rule.apply(x, 1), *args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield plan
    finally:
        for h in handles:
            h.remove()


def make_cache(kind: str, model, config: StampConfig | None, max_cache_len: int):
    """A fresh cache of ``kind`` ("dynamic" / "static"): the oracle's when ``config`` is given."""
    if kind == "dynamic":
        if config is None:
            return DynamicCache(config=model.config)
        return OracleDynamicCache(config, config=model.config)
    if config is None:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    return OracleStaticCache(config, config=model.config, max_cache_len=max_cache_len)


def oracle_generate(model, config: StampConfig, kind: str, input_ids, new_tokens: int):
    """Greedy ``generate()`` of ``new_tokens`` under the documented rules, eagerly; returns
    (the generate output with logits, the cache)."""
    cache = make_cache(kind, model, config, input_ids.shape[1] + new_tokens)
    with linear_hooks(model, config), torch.no_grad():
        out = model.generate(
            input_ids=input_ids, cache=cache, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    return out, cache
