"""Sites + StampConfig -> AllocationPlan: the defaults of STAMP.md section 5 and per-site overrides.

Defaults, in order (the first that applies decides):

1. a site the analysis could not quantize keeps its reason;
2. sites outside the repeated blocks (LM head, embeddings, timestep/caption conditioning MLPs,
   poolers) are skipped;
3. K/V at the attention input are skipped unless ``quantize_kv``;
4. linears that project another sequence into cross-attention K/V (text tokens) get the
   ``identity`` transform: text is not locally correlated like image or token sequences;
5. everything else gets the config's policy, with ``sink_tokens`` resolved for the model.

Then overrides apply in order (``_default`` first): a dict of policy fields replaces those
fields, ``"skip"`` removes the site. Patterns that match no site raise a warning.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import replace

from .analysis import Site
from .config import StampConfig
from .plan import AllocationPlan, SitePolicy

__all__ = ["build_plan", "pattern_matches"]


def pattern_matches(pattern: str, fqn: str, key: str) -> bool:
    """Override pattern semantics: ``_default``; exact FQN or key; ``re:`` full match of either."""
    if pattern == "_default":
        return True
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return bool(rx.fullmatch(fqn) or rx.fullmatch(key))
    return pattern in (fqn, key)


def _default_policy(site: Site, config: StampConfig, sink_tokens: int) -> SitePolicy | str:
    """The policy for one site, or the reason it is skipped."""
    if site.reason is not None:
        return site.reason
    if not site.in_block:
        return "outside the repeated blocks (LM head, embeddings, conditioning MLPs)"
    if site.slot.startswith(("k", "v")) and not config.quantize_kv:
        return "K/V quantization is off (options quantize_kv=True enables it)"
    if config.group_size and site.features and site.features % config.group_size:
        return f"group_size {config.group_size} does not divide the {site.features} features"
    policy = SitePolicy.from_config(config, sink_tokens=sink_tokens)
    if site.cross:
        # Text tokens are not a locally correlated sequence: plain per-token quantization.
        return replace(policy, transform="identity", levels=None, grid=None, sink_tokens=0)
    if policy.transform == "haar2d":
        if policy.grid is None:
            raise ValueError(
                "transform 'haar2d' needs the token grid: options={'grid': (height, width)}"
            )
        length = _static_length(site)
        if length is not None and length != policy.grid[0] * policy.grid[1]:
            return f"sequence of {length} tokens does not fill the haar2d grid {policy.grid}"
    return policy


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
    sites: Sequence[Site], config: StampConfig, *, causal: bool, meta: dict | None = None
) -> AllocationPlan:
    """Decide every site's policy (see the module docstring)."""
    sink_tokens = config.resolved_sink_tokens(causal=causal)
    used = {pattern: False for pattern, _ in config.overrides}
    ordered = sorted(config.overrides, key=lambda item: item[0] != "_default")
    decided: dict[str, SitePolicy | str] = {}
    for site in sites:
        policy = (
            _default_policy(site, config, sink_tokens)
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
    return AllocationPlan(
        sites={k: v for k, v in decided.items() if isinstance(v, SitePolicy)},
        skipped={k: v for k, v in decided.items() if isinstance(v, str)},
        meta={"config": config.to_dict(), "causal": causal, **(meta or {})},
    )
