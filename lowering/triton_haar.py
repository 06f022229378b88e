"""Hand-written fused Triton kernel for the default STaMP site (used by the default ``"auto"`` lowering
(and ``"triton"``) on CUDA; see :mod:`.kernel_choice` for which sites it takes): what the Haar
kernels compute, their tiling and schedules, and the launcher. The kernels themselves are in
:mod:`.haar_rows` and :mod:`.haar_slab`, the ``torch`` ops on them in :mod:`.haar_ops`. (This
module is past 400 lines because the first 70 are the kernels' shared specification.)

What it computes: exactly :func:`stamp_fx.reference.stamp_fake_quant_ref` for ``transform="haar"``
with ``J`` levels, the first-``high_tokens`` rule (``high_bits`` / ``low_bits``), ``s`` sink
tokens, per-token min-max quantization (asymmetric, or symmetric), on ``x`` of shape
``[..., S, D]`` (sequence on dim -2, features contiguous on dim -1), fp16 / bf16 / fp32, with
float32 math inside and one rounding to ``x.dtype`` at the end. Other sites (band plans, groups,
other transforms, another sequence dim, the CPU) go to the ``"inductor"`` decomposition.

Tiling. A J-level Haar transform is block-local: input tokens ``s + g*2**J .. s + (g+1)*2**J - 1``
(group ``g``, zero-padded past the end) produce exactly ``2**J`` coefficients, one per band
position: ``a_J[g]``, ``d_J[g]``, ``d_{J-1}[2g..2g+1]``, ..., ``d_1[2**(J-1) g ..]``; and the inverse
of those ``2**J`` coefficients gives back exactly those input tokens. So the unit of work is a
*tile* of ``R = 2**J`` consecutive tokens of one batch row: it is transformed, quantized and
inverted without ever looking at another tile. The tile's tokens are loaded in bit-reversed
order, so each level is a halving of the rows (``tl.split`` / ``tl.join``, the reference's exact
operations and rounding), and its ``R`` coefficients come out as ``[a_J, d_J, d_{J-1} (2), ...,
d_1 (R/2)]``, each detail band in bit-reversed order (see :func:`_haar_forward`). Every
coefficient knows its position in the global quantized sequence ``[sinks, a_J, d_J, ..., d_1]``
(``p = s + n/2**j + g*R/2**j + i`` for detail ``i`` of ``d_j``), which gives its bit width
(``p < high_tokens``).
Sink tokens form their own tiles with no transform.

The catch is the per-token range: one coefficient row spans all ``D`` features, and an
``R x D`` float32 tile (``32 x 4096`` at J=5) is far too large for one program. So a tile is
split over ``chunks = ceil(D / block_d)`` programs; their partial ranges go to a buffer indexed
by *canonical* coefficient ``tile * R + i`` (no position arithmetic), are folded once per tile
into each row's offset, scale and reciprocal (in a fresh 1-D layout: one lane per row, not
every thread per row), and the programs read those back. Two kernels do this (``variant=``):

* ``rows`` (:mod:`.haar_rows`, tiles of up to 32 tokens, the default there): a thread holds
  all ``R`` tokens of 2 features, so every butterfly stays in registers; a program walks a
  1024-feature chunk (2048 past 8192 features) in sub-blocks, accumulating the ranges in
  registers. See that module.
* ``slab`` (:mod:`.haar_slab`, any depth up to ``MAX_LEVELS``): an ``R x BLOCK_D`` slab per program
  (tokens on dim 0, features contiguous on dim 1, vectorised loads), tokens loaded in
  bit-reversed order so each level is a halving of the rows; the coarse levels move rows
  between warps through shared memory.

Schedules (``schedule=``), the same for both kernels:

* ``"local"`` (``chunks == 1``): one launch, each program sees whole rows.
* ``"split"``: two launches: statistics (partial ranges; the tile's *last* program to count in
  at a per-tile arrival counter folds them into the parameters: nobody waits), then apply
  (reload the slab, recompute the forward transform, quantize, invert, store). Reads the
  activation twice. The default for the slab kernel and in the interpreter.
* ``"fused"`` (GPU only, ``chunks <=`` SM count): one launch. Programs take their tile from a
  ticket counter (``atomic_add``, so a program only ever waits for programs that started before
  it, which cannot deadlock while a tile's chunks fit on the GPU at once), store their partial
  ranges and count in; the slab kernel's last arriver computes the parameters and raises a
  ready flag the others spin on, the rows kernel's programs all wait for the count and fold
  the partials themselves. Reads the activation once (the second pass over a program's chunk
  hits L1/L2). The default for the rows kernel on a GPU.

Bit-exactness: the integer codes, the q/dq values and (in practice) the output equal the
reference bit for bit, in the interpreter and on the GPU: every multiply is PTX ``mul.rn``
(never contracted into an FMA with a neighbouring add), divisions round like IEEE ``div``, and
the per-element division by the scale is a multiply by its reciprocal followed by two FMA
corrections, which give the correctly rounded quotient (:func:`~.triton_common._divide`).

Performance (H200, bf16, CUDA-graph replay; ``benchmarks/bench_kernels.py`` and
``benchmarks/bench_kernel_tiling.py``, numbers in ``benchmarks/RESULTS.md``): the rows kernel
(S <= 2048 with the default 64 high-precision tokens) reaches 41-52 % of the device-to-device
copy bandwidth (50.8 % at 2048 x 4096), the slab kernel 25-40 %, 2-3x Inductor's code for the
decomposition; the 80 % target is not reached. Neither kernel is memory-bound: the rows
kernel's 4-byte-per-lane accesses keep few bytes in flight per request, the slab kernel's
coarse levels go through shared memory with barriers, and both re-read the chunk. Levers
not yet pulled: TMA (bulk) loads into shared memory for the rows kernel, a Hopper cluster /
distributed-shared-memory reduction over a tile's chunks, and fusing the statistics into the
producer's epilogue.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch.library import wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from stamp_fx.bitwidths import validate_bits
from stamp_fx.plan import SitePolicy
from stamp_fx.quantizer import code_max
from stamp_fx.transforms import auto_haar2d_levels, resolve_depth_target

from . import haar_rows, haar_slab
from .haar_rows import MAX_ROWS_LEVELS
from .kernel_analysis import memoize_access_analysis
from .symbolic import IntLike, ceil_to, haar_levels, symbolic_length
from .triton_common import _MODE_APPLY, _MODE_FUSED, _MODE_LOCAL, _MODE_STATS

__all__ = [
    "MAX_LEVELS",
    "MAX_GRID_LEVELS",
    "SCHEDULES",
    "VARIANTS",
    "DEFAULT_BLOCK_D",
    "haar_fake_quant",
    "haar_fake_quant_probe",
    "eligible",
    "interpreted",
]

MAX_LEVELS = 8
"""Deepest Haar the kernel handles (a 256-token tile); deeper sites use the decomposition."""
MAX_GRID_LEVELS = 3
"""Deepest haar2d the (rows) kernel handles: 8 x 8 = 64-token tiles, one feature per thread
(the auto depth of a 64 x 64 grid with 64 high-precision tokens, PixArt at 1024 px)."""
DEFAULT_BLOCK_D = 128
"""Features per program of the slab kernel. Chosen by ``benchmarks/bench_kernel_tiling.py`` on
an H200 (2048 x 4096 and 8192 x 8192 bf16, block_d 64/128/256 x 4/8 warps x fused/split): 128
features with 4 warps and the ``split`` schedule was fastest at both sizes."""
WARPS = 4
"""Warps per program (at most)."""
ROWS_BLOCK_D = 1024
"""Features per program of the rows kernel (:mod:`.haar_rows`) by default, 2048 past 8192
features. Chosen by ``benchmarks/bench_kernel_tiling.py`` on an H200 (block_d 512/1024/2048 x
fused/split): at 2048 x 4096, 1024 features ``fused`` was fastest (0.027 ms; 2048: 0.030); at
2048 x 14336, 2048 features ``fused`` (0.074 ms; 1024: 0.084)."""
SCHEDULES = ("auto", "local", "fused", "split")
VARIANTS = ("auto", "rows", "slab")
"""Which kernel: ``rows`` (:mod:`.haar_rows`, tiles of up to 32 tokens), ``slab`` (:mod:`.haar_slab`,
any depth), ``auto`` (rows where it applies)."""


# -- host side -----------------------------------------------------------------------------------


def interpreted() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` (NumPy on the CPU)."""
    return not isinstance(haar_slab.slab_kernel, triton.runtime.jit.JITFunction)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def block_d_for(features: int) -> int:
    """Feature slab width of one program (the measured best width does not depend on the
    tile depth: see ``DEFAULT_BLOCK_D``)."""
    return max(16, min(DEFAULT_BLOCK_D, _next_pow2(features)))


def _num_warps(block_d: int) -> int:
    return max(1, min(WARPS, block_d // 32))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rows_tiling(
    levels: int, features: int, block_d: int | None, num_warps: int | None
) -> tuple[int, int, int, int]:
    """``(V, warps, SUB, CB)`` of the rows kernel: features per thread per sub-block, warps,
    features per sub-block (``V * 32 * warps``) and per program (``CB``, a multiple of SUB).

    ``V`` is 2 (4 for tiles of up to 4 tokens, 1 for the 64-token tiles of a 3-level haar2d;
    registers hold ``R * V`` values); the warps are
    the most (up to ``num_warps``, default ``WARPS``) whose sub-block divides ``D``, so that
    full tiles need no feature mask (else as many as ``D`` fills). ``block_d`` (default
    ``ROWS_BLOCK_D``, twice that past 8192 features) narrows the sub-block when it must, to
    stay a multiple of it."""
    rows = 1 << levels
    most = num_warps or WARPS
    if most < 1:
        raise ValueError(f"num_warps must be >= 1, got {num_warps}")
    v = 4 if rows <= 4 else 2 if rows <= 32 else 1
    warps = next(
        (w for w in (8, 4, 2, 1) if w <= most and features % (v * 32 * w) == 0),
        max(1, min(most, features // (v * 32))),
    )
    sub = v * 32 * warps
    if block_d is None:
        wanted = ROWS_BLOCK_D if features <= 8192 else 2 * ROWS_BLOCK_D
        return v, warps, sub, max(sub, wanted // sub * sub)
    while block_d % (v * 32 * warps):
        if warps > 1:
            warps //= 2
        elif v > 1:
            v //= 2
        else:
            raise ValueError(
                f"block_d: the rows kernel (tiles of {rows} tokens) takes multiples of 32 "
                f"features (32 lanes), got {block_d}"
            )
    return v, warps, v * 32 * warps, block_d


def _check(levels: int, high_bits: int, low_bits: int, dtype: torch.dtype) -> None:
    if not 0 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels: the Triton Haar kernel takes 0..{MAX_LEVELS}, got {levels}")
    for name, bits in (("high_bits", high_bits), ("low_bits", low_bits)):
        validate_bits(bits, name)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton Haar kernel takes float16/bfloat16/float32, got {dtype}")


def _check_grid(grid, levels: int, seq, sink_tokens: int, feats, variant: str) -> None:
    """Why the 2-D kernel cannot take ``grid`` (raises), else nothing."""
    if levels > MAX_GRID_LEVELS:
        raise ValueError(
            f"levels: the Triton haar2d kernel takes 0..{MAX_GRID_LEVELS} (tiles of up to "
            f"{4**MAX_GRID_LEVELS} tokens), got {levels}"
        )
    if variant == "slab":
        raise ValueError("variant: haar2d runs on the 'rows' kernel only, got 'slab'")
    if not isinstance(seq, int) or not isinstance(feats, int):
        raise ValueError("haar2d on the kernel needs a concrete length and feature count")
    if len(grid) != 2 or seq - sink_tokens != grid[0] * grid[1]:
        raise ValueError(
            f"grid: {tuple(grid)} holds {grid[0] * grid[1]} tokens, but the sequence has "
            f"{seq - sink_tokens} after {sink_tokens} sink(s)"
        )


def _launch(
    x: Tensor,
    levels: int,
    sink_tokens: int,
    high_tokens: int,
    high_bits: int,
    low_bits: int,
    symmetric: bool,
    *,
    block_d: int | None,
    schedule: str,
    probe: bool,
    exact_mul: bool = True,
    num_warps: int | None = None,
    variant: str = "auto",
    maxnreg: int | None = None,
    grid: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Run the kernel on ``x`` of shape [..., S, D]; ``levels`` must be concrete (``>= 0``).
    ``grid=(H, W)``: the 2-D Haar over the row-major token grid after the sinks (haar2d),
    tiles of ``2**levels x 2**levels`` tokens, on the rows kernel only."""
    _check(levels, high_bits, low_bits, x.dtype)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: unknown {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: unknown {variant!r}; valid: {', '.join(VARIANTS)}")
    shape = x.shape
    seq, feats = shape[-2], shape[-1]
    x3 = x.reshape(-1, seq, feats)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    rows = x3.shape[0]
    # The interpreter (NumPy has no bfloat16) truncates float32 -> bfloat16 instead of rounding
    # to nearest even like the GPU's cvt.rn: there the kernel writes float32, rounded by torch.
    staged = interpreted() and x.dtype == torch.bfloat16
    out_dtype = torch.float32 if staged else x.dtype
    out = torch.empty((rows, seq, feats), dtype=out_dtype, device=x.device)

    tile_log = levels if grid is None else 2 * levels  # log2 of a tile's tokens
    tile = 1 << tile_log
    if grid is not None:
        side = 1 << levels
        _check_grid(grid, levels, seq, sink_tokens, feats, variant)
        coeffs = ceil_to(grid[0], side) * ceil_to(grid[1], side)
        sinks = sink_tokens
    elif sink_tokens and seq <= sink_tokens:  # every token is a sink (a guard when symbolic)
        sinks: IntLike = seq
        coeffs: IntLike = 0
    else:
        sinks = sink_tokens
        coeffs = ceil_to(seq - sink_tokens, tile)
    # The furthest token a tile's (masked) lanes address: the last tile's padding.
    reach = seq + tile if grid is None else sinks + ceil_to(grid[0], side) * grid[1] + side
    if reach * max(x3.stride(1), feats) >= 2**31:
        raise ValueError("a batch row over 2**31 elements exceeds the kernel's 32-bit offsets")
    sink_tiles = (sinks + tile - 1) // tile
    tiles_per_row = sink_tiles + coeffs // tile
    tiles = rows * tiles_per_row
    # haar2d runs on the rows kernel only (_check_grid refused the slab variant).
    rows_kernel = grid is not None or (
        tile_log <= MAX_ROWS_LEVELS and isinstance(feats, int) and variant != "slab"
    )
    if variant == "rows" and not rows_kernel:
        raise ValueError(
            f"variant: 'rows' takes up to {MAX_ROWS_LEVELS} levels and a concrete feature "
            f"count, got {levels} levels and {feats} features; use 'auto' or 'slab'"
        )
    if rows_kernel:
        if x3.stride(1) != feats:  # the rows kernel's row stride is D
            x3 = x3.contiguous()
        v, warps, sub, block_d = _rows_tiling(tile_log, feats, block_d, num_warps)
    else:
        block_d = block_d or block_d_for(feats)
        warps = num_warps or _num_warps(block_d)
    chunks = (feats + block_d - 1) // block_d
    programs = tiles * chunks

    if schedule == "auto":
        # Measured on an H200: the rows kernel is fastest "fused" (ROWS_BLOCK_D), the slab
        # kernel "split" (DEFAULT_BLOCK_D). The interpreter cannot run "fused".
        fused_ok = x.device.type == "cuda" and not interpreted() and chunks <= _sm_count(x.device)
        schedule = "local" if chunks == 1 else "fused" if rows_kernel and fused_ok else "split"
    if schedule == "fused" and x.device.type == "cuda" and chunks > _sm_count(x.device):
        raise ValueError(
            f"schedule 'fused' needs the {chunks} programs of a tile on the GPU at once, more "
            f"than its {_sm_count(x.device)} SMs guarantee; use 'split' or a wider block_d"
        )
    if schedule == "fused" and interpreted():
        raise ValueError(
            "schedule 'fused' synchronises programs, which the Triton interpreter runs one "
            "at a time; use 'split' or 'local'"
        )
    if schedule == "local" and chunks != 1:
        raise ValueError(f"schedule 'local' needs one feature slab per tile, got {chunks} chunks")

    quantized = sinks + coeffs
    coefficients = tiles * tile  # canonical coefficient rows (sink tiles padded to R)
    f32 = dict(dtype=torch.float32, device=x.device)
    part = torch.empty((2 * chunks * coefficients if schedule != "local" else 1,), **f32)
    # The rows kernel keeps float4 records (offset, scale, 1/scale, padding) and needs them for
    # "local" too; the slab kernel keeps three planes and computes "local" in registers.
    param = torch.empty(
        (4 * coefficients if rows_kernel else 3 * coefficients if schedule != "local" else 1,),
        **f32,
    )
    # [ticket, arrivals[tiles], ready[tiles]] (ready: the slab kernel's "fused" only).
    sync = torch.zeros(
        (1 + 2 * tiles if schedule == "fused" else 1 + tiles if schedule == "split" else 1,),
        dtype=torch.int64,
        device=x.device,
    )
    codes = (
        torch.zeros((2, rows, quantized, feats), dtype=torch.float32, device=x.device)
        if probe
        else None
    )
    qmax_high, qmax_low = code_max(high_bits, symmetric), code_max(low_bits, symmetric)
    common = {
        "SYMMETRIC": bool(symmetric),
        "PROBE": bool(probe),
        "EXACT": exact_mul and not interpreted(),
        "num_warps": warps,
    }
    if maxnreg is not None:  # a register cap per thread (occupancy against spills)
        common["maxnreg"] = maxnreg
    if rows_kernel:
        jit_fn = haar_rows.rows_kernel
        args = (
            x3, out, part, param, sync, codes if probe else out,
            rows, seq, sinks, coeffs, tiles_per_row, sink_tiles, chunks,
            x3.stride(0), out.stride(0), high_tokens, qmax_high, qmax_low,
        )  # fmt: skip
        meta = {"D": feats, "LEVELS": tile_log, "V": v, "SUB": sub, "SUBS": block_d // sub}
        meta["GRID_W"] = 0 if grid is None else grid[1]
    else:
        jit_fn = haar_slab.slab_kernel
        args = (
            x3, out, part, param, sync, codes if probe else out,
            rows, seq, feats, sinks, coeffs, tiles_per_row, sink_tiles, chunks,
            x3.stride(0), x3.stride(1), out.stride(0), out.stride(1),
            high_tokens, qmax_high, qmax_low,
        )  # fmt: skip
        meta = {"LEVELS": levels, "BLOCK_D": block_d, "EVEN_D": feats % block_d == 0}
    # Under tracing (Inductor, make_fx) the launch must go through wrap_triton to be recorded;
    # eagerly that path costs a higher-order-op dispatch per launch, so launch directly.
    tracing = isinstance(x, FakeTensor) or bool(_get_current_dispatch_mode_stack())
    if tracing:
        memoize_access_analysis(jit_fn)
    kernel = wrap_triton(jit_fn) if tracing else jit_fn
    if programs:
        launches = {
            "local": ((_MODE_LOCAL, programs),),
            "fused": ((_MODE_FUSED, programs),),
            "split": ((_MODE_STATS, programs), (_MODE_APPLY, programs)),
        }[schedule]
        for mode, grid in launches:
            # A plain int: Inductor writes launch constants into its generated code by repr.
            kernel[(grid,)](*args, MODE=mode.value, **common, **meta)
    return out.to(x.dtype).reshape(shape), codes


def haar_fake_quant(
    x: Tensor,
    levels: int,
    sink_tokens: int = 0,
    high_tokens: int = 64,
    high_bits: int = 8,
    low_bits: int = 4,
    symmetric: bool = False,
    *,
    block_d: int | None = None,
    schedule: str = "auto",
    num_warps: int | None = None,
    variant: str = "auto",
    maxnreg: int | None = None,
    grid: tuple[int, int] | None = None,
    depth_target: int = -1,
) -> Tensor:
    """STaMP Haar fake quantization of ``x`` ([..., S, D]) with the fused kernel.

    ``levels=-1`` picks :func:`~stamp_fx.transforms.auto_haar_levels` for the ``S - sinks``
    transformed tokens with target ``depth_target`` (-1: ``high_tokens``; see
    :func:`~stamp_fx.transforms.resolve_depth_target`, as :class:`SitePolicy` does).
    ``grid=(H, W)``: the 2-D Haar (``transform="haar2d"``) of the ``H x W`` token grid after
    the sinks; ``levels=-1`` then picks :func:`~stamp_fx.transforms.auto_haar2d_levels`.
    ``block_d``, ``schedule``, ``num_warps`` and ``variant`` override the tiling and the kernel
    (tests use them to force the multi-chunk paths and each kernel;
    ``benchmarks/bench_kernel_tiling.py`` sweeps them). Runs on CUDA
    tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    seq, target = x.shape[-2], resolve_depth_target(depth_target, high_tokens)
    if grid is not None:
        if levels < 0:
            levels = auto_haar2d_levels(*grid, target)
    else:
        transformed = max(0, seq - sink_tokens) if isinstance(seq, int) else seq - sink_tokens
        levels = haar_levels(transformed, levels, target)
    out, _ = _launch(
        x, levels, sink_tokens, high_tokens, high_bits, low_bits, symmetric,
        block_d=block_d, schedule=schedule, probe=False, num_warps=num_warps, variant=variant,
        maxnreg=maxnreg, grid=grid,
    )  # fmt: skip
    return out


def haar_fake_quant_probe(
    x: Tensor,
    levels: int,
    sink_tokens: int = 0,
    high_tokens: int = 64,
    high_bits: int = 8,
    low_bits: int = 4,
    symmetric: bool = False,
    *,
    block_d: int | None = None,
    schedule: str = "auto",
    variant: str = "auto",
    grid: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`haar_fake_quant` that also returns, for tests, the integer codes and the
    dequantized values of the quantized sequence ``[sinks, a_J, ..., d_1]`` as two float32
    tensors of shape ``[rows, s + n, D]`` (``rows`` = the leading dims flattened)."""
    if levels < 0:
        raise ValueError("haar_fake_quant_probe needs concrete levels")
    out, planes = _launch(
        x, levels, sink_tokens, high_tokens, high_bits, low_bits, symmetric,
        block_d=block_d, schedule=schedule, probe=True, variant=variant, grid=grid,
    )  # fmt: skip
    return out, planes[0], planes[1]


# -- which sites it takes -----------------------------------------------------------------------


def eligible(x: Tensor, policy: SitePolicy, seq_dim: int) -> bool:
    """Whether the fused kernel handles this site (else the ``inductor`` decomposition does).

    ``x`` may be a fake tensor with a symbolic length: the answer then holds for every length
    (auto levels are decided per call, :func:`haar_fake_quant_dynamic_op`), and asking installs
    no guard."""
    if x.device.type != "cuda" and not interpreted():
        return False
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.ndim < 2:
        return False
    if seq_dim % x.ndim != x.ndim - 2:
        return False
    if policy.bands is not None or policy.group_size is not None or policy.clips:
        return False  # the kernel computes plain min-max ranges over whole tokens
    if policy.transform == "haar2d":
        return _grid_eligible(x, policy)
    if policy.transform != "haar":
        return False
    if policy.levels is not None:
        return policy.levels <= MAX_LEVELS
    if symbolic_length(x, -2):
        return True  # the dynamic op falls back to the reference past MAX_LEVELS
    # Auto levels grow with the length; past MAX_LEVELS the site goes to the decomposition.
    transformed = x.shape[-2] - policy.sink_tokens
    return haar_levels(transformed, -1, policy.haar_target) <= MAX_LEVELS


def _grid_eligible(x: Tensor, policy: SitePolicy) -> bool:
    """A haar2d site: a concrete length that is the sinks plus the grid, a concrete feature
    count, and a depth of at most ``MAX_GRID_LEVELS`` (a symbolic length, which a fixed grid
    cannot follow, goes to the decomposition)."""
    seq, feats = x.shape[-2], x.shape[-1]
    if policy.grid is None or not isinstance(seq, int) or not isinstance(feats, int):
        return False
    h, w = policy.grid
    if seq - policy.sink_tokens != h * w:
        return False
    return policy.make_transform().levels <= MAX_GRID_LEVELS  # explicit or auto depth
