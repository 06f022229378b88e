"""Sites + StampConfig -> AllocationPlan: the defaults of STAMP.md section 5 and per-site overrides.

Defaults, in order (the first that applies decides):

1. a site the analysis could not quantize keeps its reason;
2. sites outside the repeated blocks (LM head, embeddings, timestep/caption conditioning MLPs,
   poolers) are skipped;
3. K/V (at the KV cache write, else the attention input) are skipped unless ``quantize_kv``;
4. linears that project another sequence into cross-attention K/V (text tokens) get the
   ``identity`` transform: text is not locally correlated like image or token sequences;
5. everything else gets the config's policy, with ``sink_tokens`` resolved for the model;
6. in a decode step (``decode=True``: the graph's attention query is one new token reading a KV
   cache, :func:`stamp_fx.analysis.is_decode_graph`) a linear input of one token gets
   :func:`decode_policy`: per-token min-max at ``decode_bits`` (default ``high_bits``), no
   transform, no sink. K/V are quantized on write (:mod:`stamp_fx.kv_cache`): the K/V site
   is the new tokens' K/V before the cache update, so a prefill block gets rule 5 (STaMP
   along its sequence, sink included) once, a decode token gets :func:`decode_policy` once,
   and what the cache holds is never quantized again. A decode step's K/V site with no
   cache update found (its attention input is the whole cache) is skipped with a reason
   (and a warning) rather than re-quantizing the cache.

Then overrides apply in order (``_default`` first): a dict of policy fields replaces those
fields, ``"skip"`` removes the site. Patterns that match no site raise a warning.

Last, a policy that does not fit its site (``group_size`` not dividing the features, a haar2d
``grid`` the sequence does not fill, a feature rotation or groups on a symbolic feature dim)
leaves that site unquantized with the reason (:func:`site_conflict`); the backend warns about
each such site, and applies the same check to a pinned plan (:func:`fit_plan`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import replace

from .analysis import Site
from .config import StampConfig
from .plan import AllocationPlan, SitePolicy

__all__ = [
    "build_plan",
    "plan_sites",
    "fit_plan",
    "site_conflict",
    "pattern_matches",
    "decode_policy",
]


DECODE_KV_REASON = (
    "decode step: this K/V attention input holds the KV cache and no cache update was found "
    "to quantize the new token at (quantizing here would re-quantize cached entries every step)"
)


def decode_policy(config: StampConfig) -> SitePolicy:
    """What the token of a decode step gets: per-token min-max at ``decode_bits`` (None:
    ``high_bits``), identity transform, no sink (STAMP.md section 5: a transform over one token
    is the identity, and the sink is the first cached position, not the new token)."""
    bits = config.high_bits if config.decode_bits is None else config.decode_bits
    return SitePolicy(
        transform="identity",
        feature_transform=config.feature_transform,
        feature_block=config.feature_block,
        sink_tokens=0,
        high_tokens=0,
        high_bits=max(bits, config.high_bits),
        low_bits=bits,
        symmetric=config.symmetric,
        group_size=config.group_size,
    )


def pattern_matches(pattern: str, fqn: str, key: str) -> bool:
    """Override pattern semantics: ``_default``; exact FQN or key; ``re:`` full match of either."""
    if pattern == "_default":
        return True
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return bool(rx.fullmatch(fqn) or rx.fullmatch(key))
    return pattern in (fqn, key)


def _default_policy(
    site: Site, config: StampConfig, sink_tokens: int, decode: bool = False
) -> SitePolicy | str:
    """The policy for one site, or the reason it is skipped."""
    if site.reason is not None:
        return site.reason
    if not site.in_block:
        return "outside the repeated blocks (LM head, embeddings, conditioning MLPs)"
    if site.slot.startswith(("k", "v")) and not config.quantize_kv:
        return "K/V quantization is off (options quantize_kv=True enables it)"
    if decode and site.slot.startswith(("k", "v")) and not site.extra.get("cache_write"):
        return DECODE_KV_REASON
    if decode and _static_length(site) == 1:
        return decode_policy(config)
    policy = SitePolicy.from_config(config, sink_tokens=sink_tokens)
    if site.cross:
        # Text tokens are not a locally correlated sequence: plain per-token quantization.
        return replace(policy, transform="identity", levels=None, grid=None, sink_tokens=0)
    if policy.transform == "haar2d" and policy.grid is None:
        raise ValueError(
            "transform 'haar2d' needs the token grid: options={'grid': (height, width)}"
        )
    return policy


def site_conflict(site: Site, policy: SitePolicy) -> str | None:
    """Why ``policy`` (the user's options, after overrides) cannot be applied to ``site``, or
    None. Such a site is compiled unquantized, with this reason in the plan and a warning."""
    features = site.features
    if policy.group_size:
        if features is None:
            return f"group_size {policy.group_size} needs a static feature dim (it is symbolic)"
        if features % policy.group_size:
            return f"group_size {policy.group_size} does not divide the {features} features"
    if policy.feature_transform != "none" and features is None:
        return (
            f"feature_transform {policy.feature_transform!r} needs a static feature dim "
            "(it is symbolic)"
        )
    if features is not None:
        try:
            policy.rotation_block(features)
        except ValueError as err:
            return str(err)
    if policy.transform == "haar2d" and policy.grid is not None:
        length = _static_length(site)
        if length is not None and length != policy.grid[0] * policy.grid[1]:
            return f"sequence of {length} tokens does not fill the haar2d grid {policy.grid}"
        if length is None and _symbolic_length(site):
            # The grid fixes the length; a graph compiled for every length (dynamic=True, or
            # Dynamo's automatic dynamic after a second resolution) cannot hold to it.
            return (
                f"haar2d grid {policy.grid} fixes the sequence length, but this graph's length "
                "is dynamic (compile with dynamic=False, one graph per resolution)"
            )
    return None


def _symbolic_length(site: Site) -> bool:
    return site.seq_dim is not None and len(site.shape) > site.seq_dim


def fit_plan(sites: Sequence[Site], plan: AllocationPlan) -> tuple[AllocationPlan, dict[str, str]]:
    """``plan`` with every planned site whose policy does not fit it (:func:`site_conflict`)
    moved to ``skipped`` with its reason; also returns those ``{key: reason}``."""
    conflicts = {}
    for site in sites:
        policy = plan.sites.get(site.key)
        if policy is not None and site.reason is None:
            reason = site_conflict(site, policy)
            if reason is not None:
                conflicts[site.key] = reason
    if not conflicts:
        return plan, {}
    fitted = AllocationPlan(
        sites={k: v for k, v in plan.sites.items() if k not in conflicts},
        skipped={**plan.skipped, **conflicts},
        tensors=plan.tensors,
        meta=plan.meta,
        version=plan.version,
    )
    return fitted, conflicts


def _static_length(site: Site) -> int | None:
    if site.seq_dim is None or len(site.shape) <= site.seq_dim:
        return None
    text = site.shape[site.seq_dim]
    return int(text) if text.isdigit() else None


def _apply_override(policy: SitePolicy | str, spec, sink_tokens: int) -> SitePolicy | str:
    if spec == "skip":
        return "skipped by override"
    if isinstance(policy, str):
        return policy  # overrides tune quantized sites; they do not make illegal sites legal
    changes = dict(spec)
    if "sink_tokens" in changes and changes["sink_tokens"] is None:
        changes["sink_tokens"] = sink_tokens
    return replace(policy, **changes)


def build_plan(
    sites: Sequence[Site],
    config: StampConfig,
    *,
    causal: bool,
    meta: dict | None = None,
    decode: bool = False,
) -> AllocationPlan:
    """Decide every site's policy (see the module docstring)."""
    return plan_sites(sites, config, causal=causal, meta=meta, decode=decode)[0]


def plan_sites(
    sites: Sequence[Site],
    config: StampConfig,
    *,
    causal: bool,
    meta: dict | None = None,
    decode: bool = False,
) -> tuple[AllocationPlan, dict[str, str]]:
    """:func:`build_plan`, also returning the sites skipped because an option does not fit
    them (``{key: reason}``, see :func:`site_conflict`): the backend warns about those."""
    sink_tokens = config.resolved_sink_tokens(causal=causal)
    used = {pattern: False for pattern, _ in config.overrides}
    ordered = sorted(config.overrides, key=lambda item: item[0] != "_default")
    decided: dict[str, SitePolicy | str] = {}
    for site in sites:
        policy = (
            _default_policy(site, config, sink_tokens, decode)
            if config.enabled
            else "quantization disabled (enabled=False)"
        )
        if config.enabled:
            for pattern, spec in ordered:
                if pattern_matches(pattern, site.fqn, site.key):
                    used[pattern] = True
                    policy = _apply_override(policy, spec, sink_tokens)
        decided[site.key] = policy
    for pattern, hit in used.items():
        if not hit and sites:
            warnings.warn(f"stamp override {pattern!r} matches no site", stacklevel=3)
    plan = AllocationPlan(
        sites={k: v for k, v in decided.items() if isinstance(v, SitePolicy)},
        skipped={k: v for k, v in decided.items() if isinstance(v, str)},
        meta={
            "config": config.to_dict(),
            "causal": causal,
            **({"decode": True} if decode else {}),
            **(meta or {}),
        },
    )
    fitted, conflicts = fit_plan(sites, plan)
    # Warned about like an option that does not fit: quantize_kv cannot be honoured there.
    unwritten = {k: v for k, v in decided.items() if v == DECODE_KV_REASON}
    return fitted, {**unwritten, **conflicts}
