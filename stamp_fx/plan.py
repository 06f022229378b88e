"""Per-site quantization policies and the frozen, JSON-serialisable ``AllocationPlan``.

A *site* is a tensor the backend may quantize, keyed by ``<module FQN>:<slot>``: ``:in`` for the
input of a linear layer (``model.layers.3.self_attn.q_proj:in``), ``:k`` / ``:v`` for the key and
value at the input of an attention module's ``scaled_dot_product_attention``
(``model.layers.3.self_attn:k``). A :class:`SitePolicy` says exactly how to quantize one site;
it is the unit shared by the FX pass (as ``stamp::`` op arguments), the eager hook-based
reference, calibration and the reports. Plans are saved as JSON (plus a ``.tensors.pt`` side file
when a site carries a KLT autocorrelation) and used verbatim when passed back.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .allocation import SpectralBitPlan
from .config import StampConfig
from .quantizer import TokenBits, validate_bits
from .reference import clamp_sinks, stamp_fake_quant_ref
from .rotations import feature_rotation, resolve_block, validate_feature_block
from .transforms import (
    SequenceTransform,
    make_transform,
    resolve_depth_target,
    transform_for,
)

__all__ = ["PLAN_VERSION", "SitePolicy", "AllocationPlan", "load_plan"]

PLAN_VERSION = 1


_KLT_CACHE: dict[tuple, tuple[weakref.ref, SequenceTransform]] = {}
_KLT_CACHE_SIZE = 64


def _klt_for(autocorr: Tensor) -> SequenceTransform:
    """One KLT (so one eigendecomposition per length) per autocorrelation tensor: the
    ``stamp::fake_quant`` op builds its policy's transform on every forward, and a fresh KLT
    would redo an S x S ``eigh`` each time.

    Keyed by the tensor's memory and version counter, and valid only while the tensor itself is
    alive (a weak reference: a freed tensor's memory can be reused by another one, and the
    cache must not keep models' buffers alive). No values are read (no device sync)."""
    key = (
        autocorr.data_ptr(),
        tuple(autocorr.shape),
        tuple(autocorr.stride()),
        autocorr.dtype,
        str(autocorr.device),
        autocorr._version,
    )
    hit = _KLT_CACHE.get(key)
    if hit is not None and hit[0]() is not None:
        return hit[1]
    if len(_KLT_CACHE) >= _KLT_CACHE_SIZE:
        for k in [k for k, (ref, _) in _KLT_CACHE.items() if ref() is None]:
            del _KLT_CACHE[k]
        if len(_KLT_CACHE) >= _KLT_CACHE_SIZE:
            del _KLT_CACHE[next(iter(_KLT_CACHE))]  # the oldest entry
    transform = make_transform("klt", autocorr=autocorr)
    _KLT_CACHE[key] = (weakref.ref(autocorr), transform)
    return transform


@dataclass(frozen=True, slots=True)
class SitePolicy:
    """How one site is quantized. ``bands`` (when set) replaces the first-``high_tokens`` rule:
    sinks at ``high_bits``, then the transformed tokens by :class:`SpectralBitPlan`."""

    transform: str = "haar"
    feature_transform: str = "none"
    feature_block: str | int = "pow2"
    """Block of the feature rotation (``StampConfig.feature_block``)."""
    levels: int | None = None
    depth_target: int | None = None
    """Tokens the automatic Haar depth aims the approximation band at (``StampConfig``'s
    field); None = ``high_tokens``. :meth:`from_config` records it resolved, so a per-site
    ``high_tokens`` (an override, the tuner's choice) does not change the transform."""
    grid: tuple[int, int] | None = None
    sink_tokens: int = 0
    high_tokens: int = 64
    high_bits: int = 8
    low_bits: int = 4
    bands: SpectralBitPlan | None = None
    symmetric: bool = False
    group_size: int | None = None
    clip_ratio: float = 1.0
    """Range ratio of the tokens below ``high_bits`` (``StampConfig.clip_ratio``)."""
    high_clip_ratio: float = 1.0
    """Range ratio of the tokens at ``high_bits``, sinks included."""
    autocorr_key: str | None = None
    """Key of the KLT token autocorrelation in the plan's tensors (transform 'klt' only)."""

    def __post_init__(self) -> None:
        # Reuse StampConfig's validation for the fields the two share. feature_block alone: an
        # override may turn a site's rotation off and leave the config's block behind.
        validate_feature_block(self.feature_block)
        StampConfig(
            transform=self.transform,
            feature_transform=self.feature_transform,
            levels=self.levels,
            depth_target=self.depth_target,
            grid=self.grid,
            high_tokens=max(self.high_tokens, self.sink_tokens),
            high_bits=self.high_bits,
            low_bits=self.low_bits,
            sink_tokens=self.sink_tokens,
            symmetric=self.symmetric,
            group_size=self.group_size,
            clip_ratio=self.clip_ratio,
            high_clip_ratio=self.high_clip_ratio,
        )
        for name in ("clip_ratio", "high_clip_ratio"):  # as floats, so JSON round-trips equal
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(self.grid))

    @classmethod
    def from_config(
        cls, config: StampConfig, *, sink_tokens: int, grid: tuple[int, int] | None = None
    ) -> SitePolicy:
        return cls(
            transform=config.transform,
            feature_transform=config.feature_transform,
            feature_block=config.feature_block,
            levels=config.levels,
            depth_target=resolve_depth_target(config.depth_target, config.high_tokens),
            grid=grid or config.grid,
            sink_tokens=sink_tokens,
            high_tokens=config.high_tokens,
            high_bits=config.high_bits,
            low_bits=config.low_bits,
            symmetric=config.symmetric,
            group_size=config.group_size,
            clip_ratio=config.clip_ratio,
            high_clip_ratio=config.high_clip_ratio,
        )

    # -- evaluation ------------------------------------------------------------------------
    def make_transform(self, tensors: Mapping[str, Tensor] | None = None) -> SequenceTransform:
        if self.autocorr_key is not None:
            # A calibrated transform (klt): built from the plan's tensor, its basis cached.
            if tensors is None or self.autocorr_key not in tensors:
                raise ValueError(
                    f"{self.transform} autocorrelation {self.autocorr_key!r} is missing from the "
                    "plan's tensors"
                )
            return _klt_for(tensors[self.autocorr_key])
        return transform_for(
            self.transform, levels=self.levels, grid=self.grid, target=self.haar_target
        )

    @property
    def haar_target(self) -> int:
        """The approximation-band size the automatic Haar depth aims for."""
        return resolve_depth_target(self.depth_target, self.high_tokens)

    def quantized_bits(self, quantized_length: int, sinks: int) -> list[int]:
        """Bits over a quantized sequence of ``sinks`` raw positions then transformed tokens."""
        if self.bands is None:
            return TokenBits(self.high_tokens, self.high_bits, self.low_bits).vector(
                quantized_length
            )
        return [self.high_bits] * sinks + self.bands.token_bits(quantized_length - sinks)

    @property
    def clips(self) -> bool:
        """Whether any token's range is clipped."""
        return self.clip_ratio != 1.0 or self.high_clip_ratio != 1.0

    def clip_vector(self, bits: list[int]) -> list[float] | None:
        """Clip ratio per token of the quantized sequence whose widths are ``bits`` (None: no
        clipping): ``high_clip_ratio`` at ``high_bits`` and above, ``clip_ratio`` below."""
        if not self.clips:
            return None
        return [self.high_clip_ratio if b >= self.high_bits else self.clip_ratio for b in bits]

    def bit_vector(self, transform: SequenceTransform, length: int) -> list[int]:
        """Bits over the quantized sequence (sinks, then coefficients) for ``length`` tokens."""
        sinks = clamp_sinks(self.sink_tokens, length)
        coeffs = transform.coefficient_length(length - sinks) if length > sinks else 0
        return self.quantized_bits(sinks + coeffs, sinks)

    def rotation_block(self, features: int) -> int | None:
        """Block of the feature rotation for ``features`` channels (None: no rotation); raises
        ``ValueError`` when an int ``feature_block`` does not divide them."""
        if self.feature_transform != "hadamard":
            return None
        return resolve_block(self.feature_block, features)

    def apply(self, x: Tensor, seq_dim: int, tensors: Mapping[str, Tensor] | None = None) -> Tensor:
        """The reference STaMP fake quantization of ``x`` under this policy: with a feature
        rotation ``R``, ``stamp(x R) Rᵀ``, each step rounded to x's dtype exactly like the
        compiled ``stamp::hadamard`` (or ``stamp::rotate``) / ``stamp::fake_quant`` sequence."""
        block = self.rotation_block(x.shape[-1])
        if block is None:
            return self.apply_sequence(x, seq_dim, tensors)
        rotated = feature_rotation(x, block)
        return feature_rotation(self.apply_sequence(rotated, seq_dim, tensors), block, True)

    def apply_sequence(
        self,
        x: Tensor,
        seq_dim: int,
        tensors: Mapping[str, Tensor] | None = None,
        reduce_range=None,
    ) -> Tensor:
        """The sequence-transform fake quantization alone (``stamp::fake_quant``);
        ``reduce_range``: tensor parallelism's range combiner (``stamp::fake_quant_sharded``)."""
        t = self.make_transform(tensors)
        bits = self.bit_vector(t, x.shape[seq_dim])
        return stamp_fake_quant_ref(
            x,
            transform=t,
            bits=bits,
            sink_tokens=self.sink_tokens,
            symmetric=self.symmetric,
            group_size=self.group_size,
            seq_dim=seq_dim,
            clip=self.clip_vector(bits),
            reduce_range=reduce_range,
        )

    def describe(self) -> str:
        """Short one-liner such as ``haar(J=auto) bits=8x64/4 sinks=1``."""
        if self.transform in ("haar", "haar2d"):
            depth = "auto" if self.levels is None else str(self.levels)
            if self.levels is None and self.haar_target != resolve_depth_target(
                None, self.high_tokens
            ):
                depth += f"->{self.haar_target}"  # the band aimed at, when not high_tokens
            xf = f"{self.transform}(J={depth})"
        else:
            xf = self.transform
        if self.bands is None:
            bits = f"{self.high_bits}x{self.high_tokens}/{self.low_bits}"
        else:
            bits = (
                "bands["
                + ",".join(
                    f"{b}@{e:g}" for e, b in zip(self.bands.edges, self.bands.bits, strict=True)
                )
                + "]"
            )
        extra = f" sinks={self.sink_tokens}" if self.sink_tokens else ""
        if self.feature_transform == "hadamard":
            extra += " +hadamard" + (
                "" if self.feature_block == "pow2" else f"({self.feature_block})"
            )
        extra += " sym" if self.symmetric else ""
        extra += f" g={self.group_size}" if self.group_size else ""
        if self.clips:
            extra += f" clip={self.high_clip_ratio:g}/{self.clip_ratio:g}"
        return f"{xf} bits={bits}{extra}"

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, SpectralBitPlan):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "site") -> SitePolicy:
        if not isinstance(data, Mapping):
            raise ValueError(
                f"{where}: a site policy must be a JSON object, got {type(data).__name__}"
            )
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(
                f"{where}: unknown field(s) {unknown}; valid fields: {', '.join(names)}"
            )
        kwargs = dict(data)
        try:
            if kwargs.get("grid") is not None:
                kwargs["grid"] = tuple(kwargs["grid"])
            if kwargs.get("bands") is not None:
                bands = kwargs["bands"]
                if not isinstance(bands, Mapping) or set(bands) != {"edges", "bits"}:
                    raise ValueError("field 'bands' must be {'edges': [...], 'bits': [...]}")
                for b in bands["bits"]:
                    validate_bits(b, "field 'bands.bits[i]'")
                kwargs["bands"] = SpectralBitPlan.from_dict(bands)
            return cls(**kwargs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from None

    def with_bands(self, bands: SpectralBitPlan | None) -> SitePolicy:
        return replace(self, bands=bands)


@dataclass(frozen=True)
class AllocationPlan:
    """Site key -> policy, plus the reasons for sites left unquantized and named tensors
    (KLT autocorrelations). Frozen; compare, hash-free; JSON via :meth:`save`/:func:`load_plan`."""

    sites: Mapping[str, SitePolicy]
    skipped: Mapping[str, str] = field(default_factory=dict)
    tensors: Mapping[str, Tensor] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", dict(sorted(self.sites.items())))
        object.__setattr__(self, "skipped", dict(sorted(self.skipped.items())))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "meta": dict(self.meta),
            "sites": {k: v.to_dict() for k, v in self.sites.items()},
            "skipped": dict(self.skipped),
            "tensors": sorted(self.tensors),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=str)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        if self.tensors:
            torch.save({k: v.detach().cpu() for k, v in self.tensors.items()}, _tensor_path(path))
        return path

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], tensors: Mapping[str, Tensor] | None = None
    ) -> AllocationPlan:
        if not isinstance(data, Mapping):
            raise ValueError(f"plan: must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"version", "meta", "sites", "skipped", "tensors"})
        if unknown:
            raise ValueError(
                f"plan: unknown key(s) {unknown}; valid keys: version, meta, sites, skipped, tensors"
            )
        version = data.get("version")
        if version != PLAN_VERSION:
            raise ValueError(f"plan: field 'version' must be {PLAN_VERSION}, got {version!r}")
        sites_raw = data.get("sites")
        if not isinstance(sites_raw, Mapping):
            raise ValueError("plan: field 'sites' must be an object mapping site keys to policies")
        sites = {k: SitePolicy.from_dict(v, where=f"plan site {k!r}") for k, v in sites_raw.items()}
        tensors = dict(tensors or {})
        for key, pol in sites.items():
            if pol.autocorr_key and pol.autocorr_key not in tensors:
                raise ValueError(
                    f"plan site {key!r}: autocorr_key {pol.autocorr_key!r} has no tensor (missing .tensors.pt?)"
                )
        skipped = data.get("skipped", {})
        if not isinstance(skipped, Mapping):
            raise ValueError("plan: field 'skipped' must be an object mapping site keys to reasons")
        return cls(
            sites=sites,
            skipped=dict(skipped),
            tensors=tensors,
            meta=dict(data.get("meta", {})),
            version=version,
        )


def _tensor_path(path: Path) -> Path:
    return path.with_suffix(".tensors.pt")


def load_plan(path_or_plan: str | Path | Mapping[str, Any] | AllocationPlan) -> AllocationPlan:
    """Load a plan from a JSON path (and its ``.tensors.pt`` side file), a dict, or pass one through."""
    if isinstance(path_or_plan, AllocationPlan):
        return path_or_plan
    if isinstance(path_or_plan, Mapping):
        return AllocationPlan.from_dict(path_or_plan)
    path = Path(path_or_plan)
    if not path.is_file():
        raise ValueError(f"plan: no such file {str(path)!r}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"plan {str(path)!r} is not valid JSON: {err}") from None
    tensor_file = _tensor_path(path)
    tensors = torch.load(tensor_file, weights_only=True) if tensor_file.is_file() else {}
    return AllocationPlan.from_dict(data, tensors)
