"""Calibration statistics: per-site energies of transformed tokens (and the KLT token
autocorrelation), turned into a plan by the Theorem-1 solver.

In observer mode the backend inserts calls to :meth:`EnergyObserver.observe` instead of
quantization ops; :meth:`EnergyObserver.finalize` then returns an
:class:`~stamp_fx.plan.AllocationPlan` (``stamp_fx.calibrate`` in ``api.py`` drives it):

* ``transform="klt"`` sites get the averaged token autocorrelation as their basis;
* with ``config.avg_bits`` set, each site's transformed tokens get solver-allocated bits at that
  average (sinks stay at ``high_bits`` and count in the budget), stored length-independently as
  a :class:`~stamp_fx.allocation.SpectralBitPlan`; otherwise the first-``high_tokens`` rule stays;
* ``plan.meta["energy_fraction"]`` holds each site's share of energy in its high-precision tokens;
* with a :class:`~stamp_fx.clip_search.ClipSearch`, each site's clip ratios are the searched
  ones (``plan.meta["clip_ratios"]``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .allocation import SpectralBitPlan, solve_token_bits
from .clip_search import ClipSearch
from .config import StampConfig
from .plan import AllocationPlan, SitePolicy
from .reference import clamp_sinks, transformed_tokens
from .rotations import feature_rotation
from .transforms import token_autocorrelation

__all__ = ["EnergyObserver", "run_batch"]


class _SiteStats:
    __slots__ = ("energy", "range2", "count", "autocorr", "autocorr_count")

    def __init__(self) -> None:
        self.energy: dict[int, Tensor] = {}  # sequence length -> summed per-token energies
        self.range2: dict[int, Tensor] = {}  # ... summed per-token sum of G * range**2 / 12
        self.count: Counter[int] = Counter()
        self.autocorr: dict[int, Tensor] = {}
        self.autocorr_count: Counter[int] = Counter()


class EnergyObserver:
    """Observer mode: the pass inserts calls to :meth:`observe` ``(x, site_keys, seq_dim) -> x``."""

    def __init__(self, clip_search: ClipSearch | None = None) -> None:
        self.clip_search = clip_search
        self.policies: dict[str, SitePolicy] = {}
        self.stats: dict[str, _SiteStats] = {}
        self.autocorr_owner: dict[str, str] = {}
        self._eigenvalues: dict[str, Tensor] = {}

    def watch(self, plan: AllocationPlan) -> None:
        """Called by the compiler with each graph's plan before the graph runs."""
        self.policies.update(plan.sites)

    @torch.no_grad()
    def observe(self, x: Tensor, keys: tuple[str, ...], seq_dim: int) -> Tensor:
        length = x.shape[seq_dim]
        for key in keys:
            policy = self.policies[key]
            stats = self.stats.setdefault(key, _SiteStats())
            sinks = clamp_sinks(policy.sink_tokens, length)
            if policy.transform == "klt":
                # Sites reading one tensor share one autocorrelation (and so one stamp op).
                self.autocorr_owner[key] = keys[0]
                if key != keys[0]:
                    continue
                rest = x.narrow(seq_dim, sinks, length - sinks)
                r = token_autocorrelation(rest.detach(), seq_dim)
                n = length - sinks
                stats.autocorr[n] = stats.autocorr.get(n, 0) + r
                stats.autocorr_count[n] += 1
                continue
            z = transformed_tokens(
                x.detach(), policy.make_transform(), sink_tokens=sinks, seq_dim=seq_dim
            )
            z = z.to(torch.float64).movedim(seq_dim, 0)
            if self.clip_search is not None:
                self.clip_search.observe(key, z, policy, length)
            e = z.square().reshape(z.shape[0], -1).sum(1)
            stats.energy[length] = stats.energy.get(length, 0) + e
            stats.range2[length] = stats.range2.get(length, 0) + _expected_error_weight(z, policy)
            stats.count[length] += 1
        return x

    # -- turning statistics into a plan ----------------------------------------------------
    def site_energies(
        self, key: str, metric: str = "energy"
    ) -> tuple[int, Tensor, dict[str, Tensor]]:
        """(calibration length, mean per-token weights of the quantized sequence, tensors).

        ``metric="energy"``: Theorem 1's ``e_i``; ``"range"``: ``sum G * range**2 / 12``, the
        expected squared rounding error of token ``i`` at one level per step (KLT sites always
        use energies, from the eigenvalues)."""
        policy = self.policies[key]
        if policy.transform == "klt":
            key = self.autocorr_owner[key]
            stats = self.stats[key]
            n = max(stats.autocorr)  # the longest: KLT serves every shorter length
            autocorr = stats.autocorr[n] / stats.autocorr_count[n]
            if key not in self._eigenvalues:  # shared by every site reading this tensor
                self._eigenvalues[key] = torch.linalg.eigvalsh(autocorr).flip(0).clamp_min(0)
            evals = self._eigenvalues[key]
            sink_e = evals.new_full(
                (policy.sink_tokens,), float(evals.max()) if evals.numel() else 0.0
            )
            return n + policy.sink_tokens, torch.cat([sink_e, evals]), {key: autocorr}
        stats = self.stats[key]
        n = stats.count.most_common(1)[0][0]
        table = stats.range2 if metric == "range" else stats.energy
        return n, table[n] / stats.count[n], {}

    def finalize(self, plan: AllocationPlan, config: StampConfig) -> AllocationPlan:
        sites, tensors, fractions, clips = {}, dict(plan.tensors), {}, {}
        for key, policy in plan.sites.items():
            if key not in self.stats:
                sites[key] = policy  # never executed by the calibration data
                continue
            _length, energies, extra = self.site_energies(key)
            if extra:
                tensors.update(extra)
                policy = replace(policy, autocorr_key=next(iter(extra)))
            if config.avg_bits is not None:
                _, weights, _ = self.site_energies(key, config.allocation_metric)
                policy = policy.with_bands(_solve_bands(policy, weights, config))
            if self.clip_search is not None:  # after the bands: it picks for their widths
                policy = self.clip_search.choose(key, policy)
                clips[key] = [policy.high_clip_ratio, policy.clip_ratio]
            sites[key] = policy
            fractions[key] = _high_energy_fraction(policy, energies)
        meta = {**plan.meta, "energy_fraction": fractions, "calibrated": True}
        if self.clip_search is not None:
            meta["clip_ratios"] = clips  # [tokens at high_bits, tokens below], per site
        return AllocationPlan(sites=sites, skipped=plan.skipped, tensors=tensors, meta=meta)


def _expected_error_weight(z: Tensor, policy: SitePolicy) -> Tensor:
    """Per token (dim 0 of ``z``): ``sum over batch and groups of G * range**2 / 12``, with the
    policy's feature rotation applied first (ranges, unlike energies, depend on it)."""
    block = policy.rotation_block(z.shape[-1])
    if block is not None:
        z = feature_rotation(z, block)
    group = policy.group_size or z.shape[-1]
    g = z.unflatten(-1, (-1, group))
    rng = g.amax(-1) - g.amin(-1)
    return (group * rng.square() / 12).reshape(z.shape[0], -1).sum(1)


def _solve_bands(policy: SitePolicy, energies: Tensor, config: StampConfig) -> SpectralBitPlan:
    """Solver bits for the transformed tokens, sinks held at ``high_bits`` inside the budget."""
    sinks = clamp_sinks(policy.sink_tokens, energies.numel())
    coeffs = energies[sinks:].tolist()
    if not coeffs:
        return SpectralBitPlan((1.0,), (policy.high_bits,))
    total = config.avg_bits * (sinks + len(coeffs)) - sinks * policy.high_bits
    budget = max(config.allowed_bits[0], total / len(coeffs))
    return SpectralBitPlan.from_token_bits(solve_token_bits(coeffs, budget, config.allowed_bits))


def _high_energy_fraction(policy: SitePolicy, energies: Tensor) -> float:
    """Share of the energy in tokens quantized above the site's lowest width."""
    sinks = clamp_sinks(policy.sink_tokens, energies.numel())
    bits = policy.quantized_bits(energies.numel(), sinks)
    low = min(bits)
    total = float(energies.sum())
    high = sum(e for e, b in zip(energies.tolist(), bits, strict=True) if b > low)
    return high / total if total > 0 else 0.0


def run_batch(model: Any, batch: Any) -> Any:
    """Call ``model`` on a batch: a dict of kwargs, a tuple/list of args, or one tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
