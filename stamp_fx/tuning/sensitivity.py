"""What the tuner measures at each site: every candidate option's error on the calibration inputs.

:class:`SensitivityObserver` is the backend's observer-mode callback: it keeps the float input of
every planned site during a batch and, after it, fake-quantizes that input with each
:class:`~stamp_fx.tuning.objectives.Option`, accumulating into one :class:`SiteSensitivity` per
site the error at the output of the linear reading it (``||(x_hat - x) W^T||^2``, through
:func:`linear_projection`), the Theorem-1 bound, the average bits and, given loss gradients, the
Fisher term ``0.5 * sum g**2 (x_hat - x)**2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..plan import AllocationPlan, SitePolicy
from ..reference import clamp_sinks, theorem1_bound
from .objectives import Option

__all__ = ["SensitivityObserver", "SiteSensitivity", "linear_projection"]


@dataclass
class SiteSensitivity:
    """Accumulated over the calibration batches for one site; every dict is keyed by option."""

    key: str
    features: int
    tokens: int = 0
    signal: float = 0.0  # sum ||x W^T||^2 over the batches
    error: dict[Option, float] = field(default_factory=dict)  # sum ||(x_hat - x) W^T||^2
    fisher: dict[Option, float] = field(default_factory=dict)  # sum 0.5 g^2 (x_hat - x)^2
    bound: dict[Option, float] = field(default_factory=dict)  # Theorem-1 bound, ||x_hat - x||^2
    bits: dict[Option, float] = field(default_factory=dict)  # average bits at the last length

    def sqnr_db(self, option: Option) -> float:
        err = self.error[option]
        return math.inf if err == 0 else 10 * math.log10(self.signal / err)


class SensitivityObserver:
    """Observer-mode callback: :meth:`observe` keeps each site input of the current batch,
    :meth:`finish_batch` measures every option on them (with loss gradients when given)."""

    def __init__(self, model: torch.nn.Module, options: Sequence[Option]):
        self.model = model
        self.options = tuple(options)
        self.policies: dict[str, SitePolicy] = {}
        self.sites: dict[str, SiteSensitivity] = {}
        self.pending: list[tuple[Tensor, tuple[str, ...], int]] = []
        self.length = 0

    def watch(self, plan: AllocationPlan) -> None:
        self.policies.update(plan.sites)

    @property
    def pending_keys(self) -> list[str]:
        return [k for _, keys, _ in self.pending for k in keys]

    def _projection(self, key: str, features: int) -> Tensor | None:
        """``M`` with ``linear(x) = x @ M + b`` for a linear-input site (None for K/V sites,
        whose error is measured on the activation itself)."""
        fqn, _, slot = key.rpartition(":")
        if slot != "in":
            return None
        return linear_projection(self.model.get_submodule(fqn), features)

    @torch.no_grad()
    def observe(self, x: Tensor, keys: tuple[str, ...], seq_dim: int) -> Tensor:
        self.pending.append((x.detach(), keys, seq_dim))
        return x

    @torch.no_grad()
    def finish_batch(self, grads: Mapping[str, Tensor] | None = None) -> None:
        """Measure every option on the inputs kept since the last call, then drop them."""
        pending, self.pending = self.pending, []
        for x, keys, seq_dim in pending:
            self._measure(x, keys, seq_dim, grads)

    def _measure(
        self, x: Tensor, keys: tuple[str, ...], seq_dim: int, grads: Mapping[str, Tensor] | None
    ) -> None:
        length = x.shape[seq_dim]
        self.length = length
        projections = {k: self._projection(k, x.shape[-1]) for k in keys}
        weights = {}
        for key in keys:
            s = self.sites.setdefault(key, SiteSensitivity(key, x.shape[-1]))
            s.tokens += x.numel() // x.shape[-1]
            s.signal += _energy(x, projections[key])
            if grads is not None:
                if key not in grads:
                    raise ValueError(f"objective 'fisher': no loss gradient reached site {key!r}")
                weights[key] = grads[key].reshape(x.shape).to(torch.float32).square()
        # Sites reading one tensor with one policy (q/k/v, gate/up) share each quantized copy.
        cache: dict[SitePolicy, tuple[Tensor, float, float]] = {}
        for key in keys:
            s, base = self.sites[key], self.policies[key]
            for option in self.options:
                if option.high_tokens < base.sink_tokens or option.low_bits > base.high_bits:
                    continue
                policy = replace(
                    base, high_tokens=option.high_tokens, low_bits=option.low_bits, bands=None
                )
                if policy not in cache:
                    t = policy.make_transform()
                    bits = policy.bit_vector(t, length)
                    bound = theorem1_bound(
                        x, transform=t, bits=bits, sink_tokens=clamp_sinks(policy.sink_tokens, length),
                        symmetric=policy.symmetric, group_size=policy.group_size, seq_dim=seq_dim,
                    )  # fmt: skip
                    cache[policy] = (policy.apply(x, seq_dim) - x, bound, sum(bits) / len(bits))
                diff, bound, avg = cache[policy]
                s.error[option] = s.error.get(option, 0.0) + _energy(diff, projections[key])
                s.bound[option] = s.bound.get(option, 0.0) + bound
                s.bits[option] = avg
                if key in weights:
                    fisher = 0.5 * float((weights[key] * diff.to(torch.float32).square()).sum())
                    s.fisher[option] = s.fisher.get(option, 0.0) + fisher


def linear_projection(module: torch.nn.Module, features: int) -> Tensor | None:
    """``M`` with ``module(x) = x @ M + b`` for ``features`` input channels, decided by the
    module type, never by the weight's shape alone (a square weight fits either layout):
    ``nn.Linear`` (and subclasses) store ``[out, in]``, GPT-2's ``Conv1D`` stores ``[in, out]``.
    Another module type is used only when its layout is unambiguous (one weight dim equals
    ``features`` and the other does not); otherwise None, and the error is measured on the
    activation itself, like a K/V site."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        return None
    if isinstance(module, torch.nn.Linear):
        return weight.T
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return weight  # transformers.pytorch_utils.Conv1D: x @ weight + bias
    rows, cols = weight.shape
    if cols == features and rows != features:
        return weight.T
    if rows == features and cols != features:
        return weight
    return None


def _energy(t: Tensor, proj: Tensor | None) -> float:
    return float((t @ proj.to(t.dtype)).square().sum() if proj is not None else t.square().sum())
