"""Per-site activation clip ratios searched on calibration data (``calibrate(clip_search=...)``).

For each site and each calibration batch, the quantized sequence ``z`` (sinks, then transformed
tokens, after the site's feature rotation: exactly what the quantizer sees) is fake-quantized at
every candidate ratio and every bit width the plan can give a token, and the squared error of
each token is summed over batches. The transforms and rotations are orthonormal, so a token's
error in ``z`` is its share of the site's output error (exactly when the transformed tokens fill
whole Haar blocks; a zero-padded tail's error is partly dropped by the inverse, which makes the
measure a close proxy there), and tokens are quantized independently: the error of any ratio
pair is a sum over tokens. So the ratio of the tokens below
``high_bits`` and the ratio of those at it are chosen apart, each the one of least summed error
over its tokens at the widths the final plan gives them (solver bands included). Ties keep the
wider range, so 1 (plain min-max) stays unless a ratio is strictly better.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from .plan import SitePolicy
from .quantizer import fake_quant, validate_clip_ratio
from .rotations import feature_rotation

__all__ = ["DEFAULT_CLIP_RATIOS", "ClipSearch", "clip_ratios_from"]

DEFAULT_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
"""Candidates of ``clip_search=True`` (1 first: the min-max range always competes)."""


def clip_ratios_from(spec: bool | Sequence[float]) -> tuple[float, ...] | None:
    """``calibrate``'s ``clip_search`` argument as candidate ratios (None: no search)."""
    if spec is False or spec is None:
        return None
    if spec is True:
        return DEFAULT_CLIP_RATIOS
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or not spec:
        raise ValueError(
            f"clip_search: must be True, False or a non-empty list of ratios in (0, 1], "
            f"got {spec!r}"
        )
    ratios = {validate_clip_ratio(r, "clip_search[i]") for r in spec} | {1.0}
    return tuple(sorted(ratios, reverse=True))


class ClipSearch:
    """Summed per-token errors of each (width, ratio), per site and calibration length.

    ``solver_widths``: the widths the bit-allocation solver may give a token (its
    ``allowed_bits``), searched besides each site's own ``high_bits`` and ``low_bits``."""

    def __init__(self, ratios: Sequence[float], solver_widths: Sequence[int] = ()) -> None:
        self.ratios = tuple(ratios)
        self.solver_widths = tuple(solver_widths)
        self._widths: dict[str, tuple[int, ...]] = {}
        self._errors: dict[str, dict[int, Tensor]] = {}
        self._count: dict[str, Counter[int]] = {}

    @torch.no_grad()
    def observe(self, key: str, z: Tensor, policy: SitePolicy, length: int) -> None:
        """``z``: the quantized sequence of one call, tokens on dim 0 (any float dtype)."""
        z = z.to(torch.float32)
        block = policy.rotation_block(z.shape[-1])
        if block is not None:
            z = feature_rotation(z, block)
        widths = self._widths.setdefault(
            key, tuple(sorted({policy.high_bits, policy.low_bits, *self.solver_widths}))
        )
        grid = torch.empty(len(widths), len(self.ratios), z.shape[0], dtype=torch.float64)
        for i, bits in enumerate(widths):
            for j, ratio in enumerate(self.ratios):
                z_hat = fake_quant(
                    z, bits, token_dim=0, symmetric=policy.symmetric,
                    group_size=policy.group_size, clip=ratio,
                )  # fmt: skip
                err = (z_hat - z).to(torch.float64).square()
                grid[i, j] = err.reshape(z.shape[0], -1).sum(1).cpu()
        per_length = self._errors.setdefault(key, {})
        per_length[length] = per_length.get(length, 0) + grid
        self._count.setdefault(key, Counter())[length] += 1

    def choose(self, key: str, policy: SitePolicy) -> SitePolicy:
        """``policy`` with the ratios of least error at its widths (unchanged if unobserved)."""
        if key not in self._errors:
            return policy
        length = self._count[key].most_common(1)[0][0]
        errors = self._errors[key][length]
        tokens = errors.shape[-1]
        sinks = min(policy.sink_tokens, tokens)
        bits = policy.quantized_bits(tokens, sinks)
        widths = self._widths[key]
        missing = sorted(set(bits) - set(widths))
        if missing:
            raise ValueError(
                f"clip search for {key!r}: the plan gives widths {missing} that were not "
                f"searched (searched: {list(widths)})"
            )
        width = torch.tensor([widths.index(b) for b in bits])
        per_token = errors[width, :, torch.arange(tokens)]  # [tokens, ratios]
        high = torch.tensor([b >= policy.high_bits for b in bits])
        return replace(
            policy,
            high_clip_ratio=self._best(per_token[high]),
            clip_ratio=self._best(per_token[~high]),
        )

    def _best(self, per_token: Tensor) -> float:
        """The ratio of least summed error (ties keep the earlier, wider one)."""
        if per_token.numel() == 0:
            return 1.0
        return self.ratios[int(per_token.sum(0).argmin())]  # argmin: the first of equal minima
