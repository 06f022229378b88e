"""``StampConfig``: the frozen, versioned, JSON round-trippable description of one STaMP policy.

Defaults are the paper's: Haar along the sequence with as many levels as make the approximation
band about ``high_tokens`` (64) tokens, the first 64 transformed tokens at 8 bits and the rest at 4,
per-token asymmetric min-max. ``sink_tokens`` leading positions are kept out of the transform and
quantized at ``high_bits``; they count inside the ``high_tokens`` budget (STAMP.md section 5).
``sink_tokens=None`` means "auto": 1 for causal language models, 0 otherwise (resolved by the
caller that knows the model, see :meth:`StampConfig.resolved_sink_tokens`).

Every field is validated on construction; mistakes raise ``ValueError`` naming the field and the
valid choices. ``from_dict`` rejects unknown keys and configs from a newer schema version.

``torch.compile(..., options=)`` is split into a config and the backend's own options by
:mod:`stamp_fx.options`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .bitwidths import MAX_BITS, MIN_BITS, is_finite_number, validate_bits
from .quantizer import TokenBits, validate_clip_ratio
from .rotations import validate_feature_block
from .transforms import (
    FEATURE_TRANSFORMS,
    SequenceTransform,
    available_transforms,
    resolve_depth_target,
    transform_for,
)

__all__ = [
    "CONFIG_VERSION",
    "POLICY_FIELDS",
    "SOLVER_FIELDS",
    "StampConfig",
    "solver_fields_set",
]

CONFIG_VERSION = 1
ALLOCATION_METRICS = ("energy", "range")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class StampConfig:
    """One STaMP policy (see the module docstring). All fields are keyword arguments."""

    transform: str = "haar"
    """Sequence transform name: one of ``stamp_fx.available_transforms()``."""
    levels: int | None = None
    """Decomposition levels for haar/haar2d; None picks them so the approximation band is
    about ``depth_target`` tokens."""
    depth_target: int | None = None
    """Tokens the automatic Haar depth (``levels=None``) shrinks the approximation band to.
    None = ``high_tokens`` (the paper's rule: the 8-bit tokens are the approximation band).
    Site policies record it resolved, so tuning a site's ``high_tokens`` leaves its transform
    as it was."""
    grid: tuple[int, int] | None = None
    """Token grid (height, width) for haar2d; None lets the caller supply it per site."""
    high_tokens: int = 64
    """Leading transformed tokens (sinks included) quantized at ``high_bits``."""
    high_bits: int = 8
    low_bits: int = 4
    sink_tokens: int | None = None
    """Leading raw positions kept out of the transform at ``high_bits``; None = auto."""
    symmetric: bool = False
    group_size: int | None = None
    """Channels per quantization group; None = one range per token."""
    clip_ratio: float = 1.0
    """Range ratio of the tokens below ``high_bits``: each token's min-max range shrinks toward
    zero by it and what falls outside saturates (1 = plain min-max). ``stamp_fx.calibrate(...,
    clip_search=True)`` searches it per site."""
    high_clip_ratio: float = 1.0
    """The same for the tokens at ``high_bits`` (sinks included)."""
    allowed_bits: tuple[int, ...] = (4, 8)
    """Bit widths the solver may assign."""
    avg_bits: float | None = None
    """Average-bit budget for the Theorem-1 solver; None = the first-``high_tokens`` rule."""
    allocation_metric: str = "energy"
    """What the solver weighs each transformed token by: ``"energy"`` (Theorem 1's e_i) or
    ``"range"`` (calibrated ``G * range**2 / 12``, the expected rounding error per step)."""
    feature_transform: str = "none"
    """Rotation of the feature axis around the quantizer: ``"hadamard"`` is an online
    (block-)Hadamard (QuaRot style) over blocks of ``feature_block`` features."""
    feature_block: str | int = "pow2"
    """Block of the feature rotation (see :mod:`stamp_fx.rotations`): ``"pow2"`` the largest
    power of two dividing the features (64 for 576), ``"full"`` one rotation over all features
    (a Hadamard where one is built by Kronecker products, else a seeded random orthogonal), or a
    positive int dividing the features. Needs ``feature_transform="hadamard"`` (here or in an
    override): alone it would change nothing, so it raises."""
    quantize_kv: bool = False
    """Also quantize keys and values along the sequence (KV4.125), once, where the KV cache
    stores them (quantize-on-write: a prefill block by the sequence rule, a decode token by
    the decode rule; see :mod:`stamp_fx.kv_cache`); without a cache, at the attention input."""
    decode_bits: int | None = None
    """Bits of the token of a decode step (a graph whose attention query is one new token
    reading a longer KV cache): plain per-token min-max, no sequence transform, no sink (the
    sink is the cached first position). None = ``high_bits``, what a one-token sequence got
    before this option existed; ``decode_bits=low_bits`` keeps generation at the low width."""
    enabled: bool = True
    """False compiles the model without inserting any quantization (a control run)."""
    overrides: tuple[tuple[str, Any], ...] = ()
    """Per-site overrides, in order: ``(pattern, {policy field: value})`` or ``(pattern, "skip")``.
    A pattern is an exact module FQN or site key (``fqn:in``, ``fqn:k``), ``"re:<regex>"``
    (full match against either), or ``"_default"`` (every site, applied first). Given as a dict
    in options and JSON."""
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        if self.transform not in available_transforms():
            raise ValueError(
                f"transform: unknown {self.transform!r}; valid: {', '.join(available_transforms())}"
            )
        if self.levels is not None and (not _is_int(self.levels) or not 0 <= self.levels <= 20):
            raise ValueError(f"levels: must be None (auto) or an int in 0..20, got {self.levels!r}")
        if self.depth_target is not None and (
            not _is_int(self.depth_target) or self.depth_target < 1
        ):
            raise ValueError(
                f"depth_target: must be None (= high_tokens) or a positive int, got {self.depth_target!r}"
            )
        if self.grid is not None:
            grid = tuple(self.grid) if isinstance(self.grid, (list, tuple)) else None
            if grid is None or len(grid) != 2 or not all(_is_int(g) and g > 0 for g in grid):
                raise ValueError(
                    f"grid: must be None or (height, width) positive ints, got {self.grid!r}"
                )
            object.__setattr__(self, "grid", grid)
        if not _is_int(self.high_tokens) or self.high_tokens < 0:
            raise ValueError(f"high_tokens: must be a non-negative int, got {self.high_tokens!r}")
        validate_bits(self.high_bits, "high_bits")
        validate_bits(self.low_bits, "low_bits")
        if self.low_bits > self.high_bits:
            raise ValueError(
                f"low_bits ({self.low_bits}) must not exceed high_bits ({self.high_bits})"
            )
        if self.sink_tokens is not None:
            if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
                raise ValueError(
                    f"sink_tokens: must be None (auto) or a non-negative int, got {self.sink_tokens!r}"
                )
            if self.sink_tokens > self.high_tokens:
                raise ValueError(
                    f"sink_tokens ({self.sink_tokens}) count inside the high-precision budget and "
                    f"must not exceed high_tokens ({self.high_tokens})"
                )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric: must be True or False, got {self.symmetric!r}")
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size <= 0):
            raise ValueError(
                f"group_size: must be None (per token) or a positive int, got {self.group_size!r}"
            )
        for name in ("clip_ratio", "high_clip_ratio"):
            object.__setattr__(self, name, validate_clip_ratio(getattr(self, name), name))
        allowed = self.allowed_bits
        if not isinstance(allowed, (list, tuple)) or not allowed:
            raise ValueError(
                f"allowed_bits: must be a non-empty list of ints in {MIN_BITS}..{MAX_BITS}"
            )
        allowed = tuple(sorted({validate_bits(b, "allowed_bits[i]") for b in allowed}))
        object.__setattr__(self, "allowed_bits", allowed)
        if self.avg_bits is not None:
            if not is_finite_number(self.avg_bits):
                raise ValueError(f"avg_bits: must be None or a number, got {self.avg_bits!r}")
            if not allowed[0] <= self.avg_bits <= allowed[-1]:
                raise ValueError(
                    f"avg_bits: {self.avg_bits} is outside the range of allowed_bits "
                    f"{list(allowed)} ({allowed[0]}..{allowed[-1]})"
                )
            object.__setattr__(self, "avg_bits", float(self.avg_bits))
        if self.allocation_metric not in ALLOCATION_METRICS:
            raise ValueError(
                f"allocation_metric: unknown {self.allocation_metric!r}; valid: {', '.join(ALLOCATION_METRICS)}"
            )
        if self.feature_transform not in FEATURE_TRANSFORMS:
            raise ValueError(
                f"feature_transform: unknown {self.feature_transform!r}; valid: {', '.join(FEATURE_TRANSFORMS)}"
            )
        validate_feature_block(self.feature_block)
        if self.decode_bits is not None:
            validate_bits(self.decode_bits, "decode_bits")
        for name in ("quantize_kv", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "overrides", _normalize_overrides(self.overrides))
        block_set = self.feature_block != "pow2" or any(
            spec != "skip" and "feature_block" in dict(spec) for _, spec in self.overrides
        )
        if block_set and not self._rotates_somewhere():
            raise ValueError(
                f"feature_block: {self.feature_block!r} sets the block of the feature rotation, "
                "but no site has one: also pass feature_transform='hadamard' (or set it in an "
                "override)"
            )
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"version: this stamp-fx reads config version {CONFIG_VERSION}, got {self.version!r}"
            )

    def _rotates_somewhere(self) -> bool:
        if self.feature_transform != "none":
            return True
        return any(
            spec != "skip" and dict(spec).get("feature_transform", "none") != "none"
            for _, spec in self.overrides
        )

    # -- derived views ---------------------------------------------------------------------
    def token_bits(self) -> TokenBits:
        """The first-``high_tokens`` rule as a compact bit vector."""
        return TokenBits(self.high_tokens, self.high_bits, self.low_bits)

    def resolved_sink_tokens(self, *, causal: bool) -> int:
        """``sink_tokens`` with "auto" resolved: 1 for a causal LM, else 0 (never above high_tokens)."""
        if self.sink_tokens is not None:
            return self.sink_tokens
        return min(1 if causal else 0, self.high_tokens)

    def make_transform(
        self, *, grid: tuple[int, int] | None = None, **params: Any
    ) -> SequenceTransform:
        """Instantiate the sequence transform (``grid`` overrides the config's for haar2d;
        ``params`` such as ``autocorr`` for klt are passed through)."""
        return transform_for(
            self.transform, levels=self.levels, grid=grid or self.grid,
            target=resolve_depth_target(self.depth_target, self.high_tokens), **params,
        )  # fmt: skip

    def replace(self, **changes: Any) -> StampConfig:
        return dataclasses.replace(self, **changes)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields. ``overrides`` keep their order (it decides which wins): a
        dict ``{pattern: spec}`` in insertion order, or a list of ``[pattern, spec]`` pairs when a
        pattern repeats (a dict would drop the earlier one)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "overrides":
                pairs = [
                    (pattern, spec if isinstance(spec, str) else dict(spec)) for pattern, spec in v
                ]
                patterns = [p for p, _ in pairs]
                if len(set(patterns)) == len(patterns):
                    v = dict(pairs)
                else:
                    v = [[p, spec] for p, spec in pairs]
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StampConfig:
        if not isinstance(data, dict):
            raise TypeError(f"StampConfig.from_dict takes a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown StampConfig key(s) {unknown}; valid keys: {', '.join(cls.field_names())}"
            )
        kwargs = dict(data)
        for key in ("grid", "allowed_bits"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def to_json(self, **json_kwargs: Any) -> str:
        """Fields in sorted order; never ``sort_keys`` (it would also sort the override
        patterns, whose order decides which one wins)."""
        data = self.to_dict()
        return json.dumps({k: data[k] for k in sorted(data)}, **json_kwargs)

    @classmethod
    def from_json(cls, text: str) -> StampConfig:
        return cls.from_dict(json.loads(text))


POLICY_FIELDS = (
    "transform",
    "feature_transform",
    "feature_block",
    "levels",
    "depth_target",
    "grid",
    "high_tokens",
    "high_bits",
    "low_bits",
    "sink_tokens",
    "symmetric",
    "group_size",
    "clip_ratio",
    "high_clip_ratio",
)
"""StampConfig fields an override may set for the sites it matches."""


def _normalize_overrides(overrides: Any) -> tuple[tuple[str, Any], ...]:
    """Validate overrides into a hashable tuple of (pattern, "skip" | sorted (field, value) pairs).

    The order of the patterns is kept (later ones win over earlier ones for the fields they
    set); only the fields inside one pattern's spec are sorted, where order means nothing."""
    import re

    items = overrides.items() if isinstance(overrides, dict) else overrides
    if not isinstance(items, (tuple, list)) and not isinstance(overrides, dict):
        raise ValueError("overrides: must be a dict {pattern: {field: value} | 'skip'}")
    out = []
    for entry in items:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"overrides: entries must be (pattern, spec) pairs, got {entry!r}")
        pattern, spec = entry
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"overrides: bad regex {pattern!r}: {err}") from None
        if spec == "skip":
            out.append((pattern, "skip"))
            continue
        pairs = spec.items() if isinstance(spec, dict) else spec
        try:
            pairs = tuple(
                sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in pairs)
            )
        except (TypeError, ValueError):
            raise ValueError(
                f"overrides[{pattern!r}]: must be 'skip' or a dict of policy fields"
            ) from None
        bad = sorted(k for k, _ in pairs if k not in POLICY_FIELDS)
        if bad:
            raise ValueError(
                f"overrides[{pattern!r}]: unknown field(s) {bad}; valid fields: {', '.join(POLICY_FIELDS)} (or 'skip')"
            )
        # Validate the spec's values alone; a block without a rotation in the spec is checked
        # against the config's rotation by the config itself (``_rotates_somewhere``).
        alone = {k: v for k, v in pairs if k != "sink_tokens"}
        if "feature_block" in alone:
            alone.setdefault("feature_transform", "hadamard")
        try:
            StampConfig(**alone, sink_tokens=None)
        except ValueError as err:
            raise ValueError(f"overrides[{pattern!r}]: {err}") from None
        out.append((pattern, pairs))
    return tuple(out)


SOLVER_FIELDS = ("avg_bits", "allowed_bits", "allocation_metric")
"""StampConfig fields that only the calibrated bit-allocation solver reads
(``stamp_fx.calibrate`` / ``stamp_fx.tune``); the compile-time backend rejects them."""


def solver_fields_set(config: StampConfig) -> list[str]:
    """The :data:`SOLVER_FIELDS` of ``config`` that differ from their defaults."""
    default = StampConfig()
    return [name for name in SOLVER_FIELDS if getattr(config, name) != getattr(default, name)]
