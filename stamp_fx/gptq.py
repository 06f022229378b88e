"""GPTQ (Frantar et al., 2022) for one linear layer, and the Hessians it needs, gathered through
the backend's observer mode (``api.run_observed``: the same machinery ``stamp_fx.calibrate`` uses).

The standard algorithm: ``H = 2 X^T X / n`` over the calibration tokens of the layer's input
(the scale of ``H`` does not matter: damping is relative); columns whose ``H`` diagonal is zero
never see an input and are zeroed; ``H += damp * mean(diag H) * I``; ``U = chol(H^-1)``
(upper); columns are quantized left to right (or by decreasing ``diag H`` with ``act_order``),
each one's error ``(w - q) / U[i, i]`` pushed onto the columns not yet quantized through row
``i`` of ``U``, inside blocks of ``block_size`` columns, with the update of the later columns
applied once per block (lazy batch updates). Group ranges are taken from the current (updated)
weights of each group's columns when the first column of the group comes up; with
``act_order`` they are the static groups of the original weights (computed before any update),
so the result stays on a plain per-group grid. Computed in float64.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .weights import WeightQuantConfig, block_linears, weight_qparams

__all__ = ["HessianObserver", "collect_hessians", "gptq_quantize"]


class HessianObserver:
    """Observer-mode hook: sums ``X^T X`` (float64) and the token count per linear FQN from
    the float inputs of its ``fqn:in`` site(s)."""

    def __init__(self, features: dict[str, int]) -> None:
        self.features = features
        self.xtx: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}

    def watch(self, plan: Any) -> None:  # called with each graph's plan; nothing to keep
        pass

    @torch.no_grad()
    def observe(self, x: Tensor, keys: tuple[str, ...], seq_dim: int) -> Tensor:
        rows = None
        for key in keys:
            fqn, _, slot = key.rpartition(":")
            if slot.split("#")[0] != "in" or fqn not in self.features:
                continue
            if x.shape[-1] != self.features[fqn]:
                continue  # not the linear's own feature axis: cannot be its Hessian
            if rows is None:
                rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                xtx = rows.T @ rows
            self.xtx[fqn] = self.xtx.get(fqn, 0) + xtx
            self.count[fqn] = self.count.get(fqn, 0) + rows.shape[0]
        return x

    def hessians(self) -> dict[str, tuple[Tensor, int]]:
        """FQN -> (``2 X^T X / n``, n)."""
        return {k: (2.0 * v / self.count[k], self.count[k]) for k, v in self.xtx.items()}


def collect_hessians(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    causal: bool | None = None,
    show_progress: bool = True,
) -> dict[str, tuple[Tensor, int]]:
    """Run ``batches`` through ``model`` in observer mode; FQN -> (Hessian, tokens)."""
    from .api import run_observed
    from .config import StampConfig

    features = {fqn: m.in_features for fqn, m in block_linears(model).items()}
    observer = HessianObserver(features)
    run_observed(
        model,
        batches,
        StampConfig(),
        observer,
        causal=causal,
        desc="stamp gptq hessians",
        show_progress=show_progress,
    )
    return observer.hessians()


def _col_params(scale: Tensor, zero: Tensor, g: int) -> tuple[Tensor, Tensor]:
    return scale[:, g, 0], zero[:, g, 0]


def _quantize_col(w: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
    return ((torch.round(w / scale) + zero).clamp(qmin, qmax) - zero) * scale


@torch.no_grad()
def gptq_quantize(
    weight: Tensor, hessian: Tensor, config: WeightQuantConfig
) -> tuple[Tensor, dict[str, Any]]:
    """GPTQ-quantize ``weight`` [out, in] with ``hessian`` [in, in]: (quantized weight in
    ``weight``'s dtype, stats). See the module docstring."""
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}], got {tuple(hessian.shape)}")
    group = config.group_size
    if group is not None and cols % group:
        raise ValueError(
            f"weight_group_size {group} does not divide the {cols} input columns "
            f"(pick a divisor of {cols}, or None for per output channel)"
        )
    qkw = dict(
        symmetric=config.symmetric,
        clip_search=config.clip_search,
        min_ratio=config.min_ratio,
        clip_steps=config.clip_steps,
    )
    W = weight.detach().to(torch.float64).clone()
    H = hessian.detach().to(torch.float64, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static = None  # (scale, zero, qmin, qmax) for every group, from the original weights
    if group is None or config.act_order:
        s, z, qmin, qmax, _ = weight_qparams(W, config.bits, group_size=group, **qkw)
        static = (s, z)
    perm = None
    if config.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    H.diagonal().add_(config.damp * torch.mean(torch.diag(H)))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    losses = torch.zeros(rows, dtype=torch.float64)
    scale = zero = None
    bs = config.block_size
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i  # position in the (permuted) column order
            orig = int(perm[c]) if perm is not None else c
            if static is not None:
                g = 0 if group is None else orig // group
                s, z = _col_params(*static, g)
            else:
                if c % group == 0:  # first column of a group: range of its current weights
                    # The group may run past this block: those columns have not had this
                    # block's updates yet (lazy), so apply the part made so far.
                    head = W1[:, i : i + group]
                    need = group - head.shape[1]
                    tail = W[:, i2 : i2 + need] - E1[:, :i] @ U[i1 : i1 + i, i2 : i2 + need]
                    current = torch.cat([head, tail], 1)
                    scale, zero, qmin, qmax, _ = weight_qparams(
                        current, config.bits, group_size=None, **qkw
                    )
                s, z = _col_params(scale, zero, 0)
            w = W1[:, i]
            d = U1[i, i]
            q = _quantize_col(w, s, z, qmin, qmax)
            Q1[:, i] = q
            losses += (w - q).square() / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    detail = {"proxy_loss": float(losses.sum()), "dead_columns": int(dead.sum())}
    return Q.to(weight.dtype), detail
