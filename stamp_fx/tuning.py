"""Per-layer bit-budget tuning: measure each site's sensitivity, solve a global budget, write a plan.

``tune(model, batches, avg_bits=4.25, objective="fisher")``:

1. compiles ``model`` in observer mode (no Inductor) and runs the calibration batches; at every
   planned site it fake-quantizes the float input ``x`` with each candidate :class:`Option`
   (``high_tokens`` transformed tokens at ``high_bits``, the rest at ``low_bits``, drawn from
   ``high_token_grid x low_bits_grid``) and records, per option, the error at the output of
   the linear reading it, ``||(x_hat - x) W^T||^2``, the Theorem-1 bound, and, when the
   objective needs it, the loss-aware error below;
2. turns each site into a :class:`~stamp_fx.allocation.LayerCurve`: the average bits of each
   option at the calibration length against the objective's error (weighted in the budget by
   the activation size ``tokens x features``) and solves the global budget with
   :func:`~stamp_fx.allocation.allocate_layer_budgets`;
3. returns a :class:`TuneResult` whose ``plan`` gives every site its chosen ``high_tokens`` and
   ``low_bits`` (``plan.meta["tune"]``, schema below, records how).

Objectives (registry :data:`OBJECTIVES`; an unknown name raises ``ValueError`` listing them):

* ``"fisher"`` (default): the predicted increase of the loss, ``0.5 * sum g**2 * (x_hat - x)**2``
  summed over the calibration batches, with ``g`` the gradient of the loss (``loss_fn``; by
  default next-token cross-entropy) with respect to the site's input *as read by that site
  alone* (diagonal empirical Fisher; one extra eager forward and backward per batch). It is in
  loss units, so errors of different sites add up to the quantity we care about.
* ``"output_nsr"``: the output noise-to-signal ratio ``||(x_hat - x) W^T||^2 / ||x W^T||^2``
  (relative, because RMSNorm/LayerNorm downstream rescales every layer's output). Measured
  worse than the uniform rule at 4.5 bits on SmolLM2 (benchmarks/RESULTS.md).

The paper's uniform rule is the special case where every site takes the same option.

``plan.meta["tune"]`` (``schema`` 2; schema 1, written before ``objective`` existed, had
``grid`` and ``[bits, error]`` curves)::

    {"schema": 2, "objective": "fisher", "budget": 4.5, "achieved": 4.4996,
     "calibration_length": 512, "high_token_grid": [0, 1, 16, ...], "low_bits_grid": [4],
     "curves": {"<site key>": [[high_tokens, low_bits, avg_bits, error], ...]},
     "chosen": {"<site key>": [high_tokens, low_bits]}}

The plan itself (``plan.sites``) is an ordinary versioned :class:`~stamp_fx.plan.AllocationPlan`;
the backend reads only the site policies, so a hand-edited site is used as written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .allocation import LayerCurve, allocate_layer_budgets
from .api import merged_config, run_observed
from .calibrate import run_batch
from .config import StampConfig
from .plan import AllocationPlan, SitePolicy
from .quantizer import validate_bits
from .reference import theorem1_bound

__all__ = [
    "DEFAULT_HIGH_TOKEN_GRID",
    "DEFAULT_OBJECTIVE",
    "OBJECTIVES",
    "TUNE_META_SCHEMA",
    "LossGradients",
    "Objective",
    "Option",
    "SensitivityObserver",
    "SiteSensitivity",
    "TuneResult",
    "next_token_loss",
    "solve",
    "tune",
]

DEFAULT_HIGH_TOKEN_GRID = (0, 16, 32, 64, 96, 128, 192, 256, 384, 512)
TUNE_META_SCHEMA = 2

LossFn = Callable[[torch.nn.Module, Any], Tensor]


class Option(NamedTuple):
    """One candidate policy for a site: ``high_tokens`` at the site's ``high_bits``, the rest at
    ``low_bits``."""

    high_tokens: int
    low_bits: int


# -- objectives -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """How a site's measured statistics become the error the budget solver minimises."""

    name: str
    needs_gradients: bool
    error: Callable[[SiteSensitivity, Option], float]
    description: str


OBJECTIVES: dict[str, Objective] = {}


def _objective(name: str, *, needs_gradients: bool, description: str):
    def register(fn: Callable[[SiteSensitivity, Option], float]):
        OBJECTIVES[name] = Objective(name, needs_gradients, fn, description)
        return fn

    return register


@_objective(
    "fisher",
    needs_gradients=True,
    description="predicted loss increase 0.5 * sum g^2 (x_hat - x)^2 (diagonal empirical Fisher)",
)
def _fisher(s: SiteSensitivity, o: Option) -> float:
    return s.fisher[o]


@_objective(
    "output_nsr",
    needs_gradients=False,
    description="output noise-to-signal ratio ||(x_hat - x) W^T||^2 / ||x W^T||^2",
)
def _output_nsr(s: SiteSensitivity, o: Option) -> float:
    return s.error[o] / max(s.signal, 1e-30)


DEFAULT_OBJECTIVE = "fisher"


def _check_objective(objective: object) -> Objective:
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[objective]


# -- measurement ----------------------------------------------------------------------------


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


def next_token_loss(model: torch.nn.Module, batch: Any) -> Tensor:
    """Mean next-token cross-entropy of a causal LM on a batch with ``input_ids`` (the default
    ``loss_fn`` of :func:`tune`)."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, Tensor):
        raise ValueError(
            "objective 'fisher' needs a loss: the default loss_fn (next-token cross-entropy) "
            "needs dict batches with 'input_ids'; pass loss_fn=(model, batch) -> scalar tensor"
        )
    out = run_batch(model, batch)
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, Tensor) or logits.shape[:2] != ids.shape:
        raise ValueError(
            "objective 'fisher': the default loss_fn needs a model output with 'logits' of shape "
            "[batch, seq, vocab]; pass loss_fn=(model, batch) -> scalar tensor"
        )
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


_CALLED_TWICE = (
    "objective 'fisher': site {key!r} is read more than once per forward, so its loss "
    "gradient is ambiguous; use objective='output_nsr' for this model"
)


class _CaptureAttentionInputs(torch.overrides.TorchFunctionMode):
    """Replaces key/value of ``scaled_dot_product_attention`` by aliases whose gradient is then
    the gradient seen through this attention call alone."""

    def __init__(self, fqn: str, slots: Sequence[str], aliases: dict[str, Tensor]):
        super().__init__()
        self.fqn, self.slots, self.aliases = fqn, tuple(slots), aliases

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) >= 3:
            q, k, v, *rest = args
            for slot in self.slots:
                key = f"{self.fqn}:{slot}"
                if key in self.aliases:
                    raise ValueError(_CALLED_TWICE.format(key=key))
                self.aliases[key] = (k if slot == "k" else v).view_as(k if slot == "k" else v)
            k = self.aliases.get(f"{self.fqn}:k", k)
            v = self.aliases.get(f"{self.fqn}:v", v)
            args = (q, k, v, *rest)
        return func(*args, **kwargs)


class LossGradients:
    """Per site key, the gradient of ``loss_fn(model, batch)`` with respect to the site's input
    as read by that site's consumer alone, from one eager forward and backward.

    Each consumer gets its own alias (``x.view_as(x)``) of its input, so q/k/v projections reading
    one tensor get three different gradients, and ``torch.autograd.grad`` on the aliases leaves
    every parameter's ``.grad`` untouched. ``fqn:in`` sites alias the first positional input of
    module ``fqn``; ``fqn:k`` / ``fqn:v`` alias key/value of the attention call in module ``fqn``.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn | None = None):
        self.model, self.loss_fn = model, loss_fn or next_token_loss

    def __call__(self, keys: Iterable[str], batch: Any) -> dict[str, Tensor]:
        aliases: dict[str, Tensor] = {}
        handles, attn = [], {}
        for key in sorted(set(keys)):
            fqn, _, slot = key.rpartition(":")
            if slot == "in":
                module = self.model.get_submodule(fqn)

                def pre_hook(mod, args, key=key):
                    if key in aliases:
                        raise ValueError(_CALLED_TWICE.format(key=key))
                    aliases[key] = args[0].view_as(args[0])
                    return (aliases[key], *args[1:])

                handles.append(module.register_forward_pre_hook(pre_hook))
            elif slot in ("k", "v"):
                attn.setdefault(fqn, []).append(slot)
            else:
                raise ValueError(
                    f"objective 'fisher' cannot hook site {key!r} (a module called several times, "
                    "or an unknown slot); use objective='output_nsr' for this model"
                )
        modes: list = []  # entered attention modes (one at a time; left by the forward hook)
        for fqn, slots in attn.items():
            module = self.model.get_submodule(fqn)

            def enter(mod, args, fqn=fqn, slots=slots):
                mode = _CaptureAttentionInputs(fqn, slots, aliases)
                mode.__enter__()
                modes.append(mode)

            def leave(mod, args, output):
                modes.pop().__exit__(None, None, None)

            handles += [
                module.register_forward_pre_hook(enter),
                module.register_forward_hook(leave),
            ]
        # Activations only carry gradients when something upstream requires them.
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        frozen = [p for p in params if not p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(True)
            loss = self.loss_fn(self.model, batch)
        finally:
            for h in handles:
                h.remove()
            while modes:  # only left over when the forward raised
                modes.pop().__exit__(None, None, None)
            for p in frozen:
                p.requires_grad_(False)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        names = [k for k, a in aliases.items() if a.requires_grad]
        grads = torch.autograd.grad(
            loss, [aliases[k] for k in names], allow_unused=True, materialize_grads=True
        )
        return {k: g.detach() for k, g in zip(names, grads, strict=True)}


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
                        x, transform=t, bits=bits, sink_tokens=min(policy.sink_tokens, length),
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


# -- result ---------------------------------------------------------------------------------


@dataclass
class TuneResult:
    plan: AllocationPlan
    sites: dict[str, SiteSensitivity]
    choice: dict[str, Option]  # site key -> chosen option
    avg_bits: float  # achieved, activation-size weighted, at the calibration length
    budget: float
    objective: str = DEFAULT_OBJECTIVE
    base: AllocationPlan | None = None  # the untuned plan the sites came from

    def resolve(
        self,
        avg_bits: float | None = None,
        *,
        objective: str | None = None,
        options: Iterable[Option] | None = None,
    ) -> TuneResult:
        """The same measurements solved again for another budget, objective or option subset."""
        if self.base is None:
            raise ValueError("resolve needs the untuned plan (TuneResult.base)")
        return solve(
            self.sites,
            self.base,
            self.budget if avg_bits is None else avg_bits,
            objective=objective or self.objective,
            calibration_length=self.plan.meta.get("tune", {}).get("calibration_length", 0),
            options=options,
        )

    def report(self) -> str:
        rows = [
            (
                "site", "bits", "high tokens", "low bits", "bound (pred.)", "output err",
                "output SQNR dB", "pred. loss incr.",
            )
        ]  # fmt: skip
        for key in self.keys_by_depth():
            o, s = self.choice[key], self.sites[key]
            rows.append(
                (
                    key,
                    f"{s.bits[o]:.3f}",
                    str(o.high_tokens),
                    str(o.low_bits),
                    f"{s.bound[o]:.3g}",
                    f"{s.error[o]:.3g}",
                    f"{s.sqnr_db(o):.1f}",
                    f"{s.fisher[o]:.3g}" if o in s.fisher else "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.append(
            f"budget {self.budget:.4f} bits, achieved {self.avg_bits:.4f} (activation-size "
            f"weighted), objective {self.objective}"
        )
        return "\n".join(lines)

    def keys_by_depth(self) -> list[str]:
        """Site keys block by block (``layers.2`` before ``layers.10``), in graph order within
        a block, sites outside the blocks last."""
        graph_order = {k: i for i, k in enumerate(self.sites)}

        def key(site: str) -> tuple:
            layer = layer_and_role(site)[0]
            return (layer is None, layer or 0, graph_order.get(site, 0), depth_order(site))

        return sorted(self.choice, key=key)

    def plot(self, path_prefix: str) -> list[str]:
        """Two PNGs: the chosen bits as a layer x role map (one row per block, one column per
        site role, sites outside the blocks in a row of their own), and output SQNR per site in
        depth order (``layers.2`` before ``layers.10``), the block boundaries marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = self.keys_by_depth()
        bits = {k: self.sites[k].bits[self.choice[k]] for k in keys}
        layers = sorted({layer_and_role(k)[0] for k in keys}, key=lambda v: (v is None, v or 0))
        roles = list(dict.fromkeys(layer_and_role(k)[1] for k in keys))
        grid = [[float("nan")] * len(roles) for _ in layers]
        for k in keys:
            layer, role = layer_and_role(k)
            grid[layers.index(layer)][roles.index(role)] = bits[k]
        paths = []
        fig, ax = plt.subplots(
            figsize=(max(5, 0.9 * len(roles) + 2), max(3, 0.22 * len(layers) + 1.5))
        )
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(roles)), roles, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(
            range(len(layers)), ["other" if v is None else str(v) for v in layers], fontsize=7
        )
        ax.set_ylabel("block (layer index)")
        ax.set_title(f"tuned plan at {self.budget:.3f} bits: average bits per site", fontsize=9)
        fig.colorbar(image, ax=ax, label="average bits")
        if len(layers) * len(roles) <= 400:  # small enough to print every value
            for r, row in enumerate(grid):
                for c, v in enumerate(row):
                    if v == v:  # (not NaN: the site exists)
                        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
        fig.tight_layout()
        paths.append(f"{path_prefix}_bits.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

        sqnr = [self.sites[k].sqnr_db(self.choice[k]) for k in keys]
        fig, ax = plt.subplots(figsize=(max(6, len(keys) * 0.06), 3.5))
        ax.bar(range(len(keys)), sqnr)
        starts = [
            i
            for i, k in enumerate(keys)
            if i and layer_and_role(k)[0] != layer_and_role(keys[i - 1])[0]
        ]
        for i in starts:
            ax.axvline(i - 0.5, color="0.8", linewidth=0.5)
        ax.set_xlabel("site, in depth order (grey lines: block boundaries)")
        ax.set_ylabel("output SQNR (dB)")
        ax.set_title(f"tuned plan at {self.budget:.3f} bits: output SQNR per site", fontsize=9)
        fig.tight_layout()
        paths.append(f"{path_prefix}_sqnr.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
        return paths


def depth_order(key: str) -> tuple:
    """Sort key for site keys in model order: numbers compare as numbers, so
    ``layers.2`` comes before ``layers.10``."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)
    )


def layer_and_role(key: str) -> tuple[int | None, str]:
    """``("model.layers.3.self_attn.q_proj:in")`` -> ``(3, "self_attn.q_proj:in")``: the first
    index in the module path (the block) and what follows it (the site's place in the block);
    ``(None, key)`` for a site outside the repeated blocks."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1 :]) or key
    return None, key


# -- driver ---------------------------------------------------------------------------------


def _check_grid(values: object, name: str, check: Callable[[Any], Any]) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}")
    out = tuple(values)
    if not out:
        raise ValueError(f"{name} must not be empty")
    for v in out:
        try:
            check(v)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name}: {err}") from None
    return out


def _check_high_tokens(v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"entries must be non-negative ints, got {v!r}")


def tune(
    model: torch.nn.Module,
    batches: Iterable[Any],
    avg_bits: float,
    config: StampConfig | None = None,
    *,
    objective: str = DEFAULT_OBJECTIVE,
    high_token_grid: Sequence[int] = DEFAULT_HIGH_TOKEN_GRID,
    low_bits_grid: Sequence[int] | None = None,
    loss_fn: LossFn | None = None,
    show_progress: bool = True,
    causal: bool | None = None,
    **options: Any,
) -> TuneResult:
    """Per-site ``high_tokens`` (and ``low_bits``) for a global average of ``avg_bits``.

    Contract: the achieved activation-size-weighted average at the calibration length never
    exceeds ``avg_bits`` (every site can always fall back to its cheapest option; a budget below
    that raises ``ValueError``); options are ``high_token_grid x low_bits_grid`` (default
    ``low_bits_grid``: the config's ``low_bits`` alone), plus ``high_tokens=1`` so a sink-only
    option exists; options below a site's sinks or with ``low_bits`` above its ``high_bits``
    are skipped for that site. ``objective`` picks the error the solver minimises (see the
    module docstring); ``loss_fn(model, batch) -> scalar`` is the loss of ``"fisher"`` (default
    :func:`next_token_loss`). ``options`` are the backend's policy options and ``debug_dir``;
    ``plan``, ``kernel``, ``mode`` and ``inductor`` raise (tuning builds the plan, eagerly).
    """
    obj = _check_objective(objective)
    if (
        isinstance(avg_bits, bool)
        or not isinstance(avg_bits, (int, float))
        or not math.isfinite(avg_bits)
    ):
        raise ValueError(f"avg_bits must be a finite number, got {avg_bits!r}")
    config, debug_dir = merged_config(config, options, what="tune")
    highs = _check_grid(high_token_grid, "high_token_grid", _check_high_tokens)
    lows = _check_grid(
        (config.low_bits,) if low_bits_grid is None else low_bits_grid,
        "low_bits_grid",
        lambda b: validate_bits(b, "entries"),
    )
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(
            f"loss_fn must be callable (model, batch) -> scalar tensor, got {loss_fn!r}"
        )
    high_grid = sorted(set(highs) | {1})
    grid = [Option(h, low) for low in sorted(set(lows)) for h in high_grid]
    observer = SensitivityObserver(model, grid)
    gradients = LossGradients(model, loss_fn) if obj.needs_gradients else None

    def after_batch(batch: Any) -> None:
        grads = gradients(observer.pending_keys, batch) if gradients is not None else None
        observer.finish_batch(grads)

    compiler = run_observed(
        model,
        batches,
        config,
        observer,
        causal=causal,
        desc=f"stamp tune: sensitivity ({obj.name})",
        show_progress=show_progress,
        after_batch=after_batch,
        debug_dir=debug_dir,
    )
    return solve(
        observer.sites,
        compiler.merged_plan(),
        avg_bits,
        objective=obj.name,
        calibration_length=observer.length,
    )


def solve(
    sites: Mapping[str, SiteSensitivity],
    base: AllocationPlan,
    avg_bits: float,
    *,
    objective: str = DEFAULT_OBJECTIVE,
    calibration_length: int = 0,
    options: Iterable[Option] | None = None,
) -> TuneResult:
    """The budget step of :func:`tune` on measured sensitivities: per site the option of least
    ``objective`` error at each bit level, then the global allocation at ``avg_bits``.

    ``options`` restricts the candidates (default: every measured option). Re-solving for another
    budget or objective needs no new measurement: ``result.resolve(4.5)``.
    """
    obj = _check_objective(objective)
    allowed = None if options is None else set(options)
    curves, by_bits = [], {}
    for key, s in sites.items():
        best: dict[float, tuple[float, Option]] = {}  # avg bits -> (error, option), lowest error
        for o in s.bits:
            if allowed is not None and o not in allowed:
                continue
            if obj.needs_gradients and o not in s.fisher:
                raise ValueError(
                    f"objective {obj.name!r} needs loss gradients, which were not measured "
                    f"(site {key!r}); tune with objective={obj.name!r}"
                )
            err = obj.error(s, o)
            if s.bits[o] not in best or (err, o) < best[s.bits[o]]:
                best[s.bits[o]] = (err, o)
        if not best:
            raise ValueError(f"options: none of them was measured at site {key!r}")
        by_bits[key] = best
        curves.append(
            LayerCurve(
                key, float(s.tokens * s.features), tuple((b, e) for b, (e, _) in best.items())
            )
        )
    chosen_bits = allocate_layer_budgets(curves, avg_bits)
    choice = {c.name: by_bits[c.name][chosen_bits[c.name]][1] for c in curves}
    total = sum(c.size for c in curves)
    achieved = sum(c.size * chosen_bits[c.name] for c in curves) / total if total else float("nan")
    policies = {
        k: replace(p, high_tokens=choice[k].high_tokens, low_bits=choice[k].low_bits, bands=None)
        if k in choice
        else p
        for k, p in base.sites.items()
    }
    measured = sorted({o for s in sites.values() for o in s.bits})
    meta = {
        **{k: v for k, v in base.meta.items() if k != "tune"},
        "tune": {
            "schema": TUNE_META_SCHEMA,
            "objective": obj.name,
            "budget": avg_bits,
            "achieved": achieved,
            "calibration_length": calibration_length,
            "high_token_grid": sorted({o.high_tokens for o in measured}),
            "low_bits_grid": sorted({o.low_bits for o in measured}),
            "curves": {
                key: [
                    [o.high_tokens, o.low_bits, s.bits[o], obj.error(s, o)]
                    for o in sorted(s.bits)
                    if allowed is None or o in allowed
                ]
                for key, s in sites.items()
            },
            "chosen": {k: list(o) for k, o in sorted(choice.items())},
        },
    }
    plan = AllocationPlan(sites=policies, skipped=base.skipped, tensors=base.tensors, meta=meta)
    return TuneResult(plan, dict(sites), choice, achieved, avg_bits, obj.name, base)
