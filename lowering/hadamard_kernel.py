"""Hand-written Triton kernel for ``stamp::hadamard``, the online block-Hadamard feature rotation.

What it computes: exactly :func:`stamp_fx.transforms.block_hadamard` (``x @ (I ⊗ H_B) /
sqrt(B)`` along the last dim, natural order), in float32, rounded once to ``x.dtype``. The
butterflies run in the reference's order (stage ``h = 1, 2, 4, ...``: ``(a + b, a - b)`` for
the pair ``i, i + h`` inside each run of ``2h``) and the scaling is an IEEE division by the
float32 ``sqrt(B)``, so on the CPU interpreter the result is bit-identical to the reference
(on CUDA, PyTorch's own reference divides by a scalar as a multiply by its reciprocal, one ulp
away at most; the GPU tier allows that).

Tiling: one program rotates ``ROWS`` rows by one block of ``B`` features (``[ROWS, B]`` in
registers, float32). Every stage is a reshape of the feature axis into ``[.., 2, h]`` pairs,
split and joined back; Triton moves elements between threads where a stage crosses them.

Why not fused into the Haar kernels: a rotation block spans ``B`` features (4096 for a 4096-wide
model), but the Haar kernels split a token's features over several programs (1024 per program)
to keep a 32-token tile in registers, so the rotated row is never in one program. See
``benchmarks/RESULTS.md`` for what the extra pass costs and what would remove it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch.library import triton_op, wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .kernel_analysis import memoize_access_analysis

__all__ = ["MAX_BLOCK", "hadamard_rotate", "eligible", "interpreted"]

MAX_BLOCK = 1 << 14
"""Largest rotation block (``feature_block_size`` caps blocks here too)."""
ELEMENTS_PER_PROGRAM = 4096
"""``ROWS * B`` per program: 16 float32 values per thread at 8 warps (more rows for small
blocks, so a program still moves a useful amount of data)."""


@triton.jit
def _fwht(t, ROWS: tl.constexpr, B: tl.constexpr, H: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform of every row of ``t`` ([ROWS, B]) from stage ``H``
    on (the reference's ``_fwht0`` order: stage ``h`` pairs features ``i`` and ``i + h``)."""
    if H >= B:
        return t
    else:
        # [ROWS, B / 2H, 2, H] -> pairs on the last axis: [ROWS, B / 2H, H, 2]
        pairs = tl.permute(tl.reshape(t, [ROWS, B // (2 * H), 2, H]), (0, 1, 3, 2))
        a, b = tl.split(pairs)
        both = tl.join(a + b, a - b)  # [ROWS, B / 2H, H, 2]
        t = tl.reshape(tl.permute(both, (0, 1, 3, 2)), [ROWS, B])
        return _fwht(t, ROWS, B, H * 2)


@triton.jit
def _hadamard_kernel(
    x_ptr, out_ptr, rows, stride_x, stride_o, scale,
    ROWS: tl.constexpr, B: tl.constexpr, EVEN_ROWS: tl.constexpr,
):  # fmt: skip
    """Program ``(i, g)``: rows ``i * ROWS ..`` by features ``g * B .. (g + 1) * B - 1``."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    f = tl.program_id(1) * B + tl.arange(0, B)
    if EVEN_ROWS:
        x = tl.load(x_ptr + r[:, None] * stride_x + f[None, :])
    else:
        x = tl.load(x_ptr + r[:, None] * stride_x + f[None, :], mask=(r < rows)[:, None], other=0.0)
    t = _fwht(x.to(tl.float32), ROWS, B, 1)
    y = tl.math.div_rn(t, tl.full(t.shape, scale, tl.float32)).to(out_ptr.dtype.element_ty)
    if EVEN_ROWS:
        tl.store(out_ptr + r[:, None] * stride_o + f[None, :], y)
    else:
        tl.store(out_ptr + r[:, None] * stride_o + f[None, :], y, mask=(r < rows)[:, None])


def interpreted() -> bool:
    """True when the kernel was defined under ``TRITON_INTERPRET=1`` (NumPy on the CPU)."""
    return not isinstance(_hadamard_kernel, triton.runtime.jit.JITFunction)


def eligible(x: Tensor, block: int) -> bool:
    """Whether :func:`hadamard_rotate` takes this input (else the Inductor decomposition)."""
    d = x.shape[-1] if x.ndim else None
    return (
        x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and isinstance(d, int)
        and 1 <= block <= MAX_BLOCK
        and block & (block - 1) == 0
        and d % block == 0
    )


def _launch_shape(block: int) -> tuple[int, int]:
    rows = max(1, ELEMENTS_PER_PROGRAM // block)
    warps = max(1, min(8, rows * block // 256))
    return rows, warps


def hadamard_rotate(x: Tensor, block: int) -> Tensor:
    """``block_hadamard(x, block)`` with the Triton kernel (CUDA, or the interpreter)."""
    if not eligible(x, block):
        raise ValueError(
            f"hadamard kernel: block must be a power of two in 1..{MAX_BLOCK} dividing the "
            f"feature dim, and the dtype fp16/bf16/fp32; got block {block}, shape "
            f"{tuple(x.shape)}, {x.dtype}"
        )
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    # The interpreter (NumPy has no bfloat16) truncates float32 -> bfloat16 instead of rounding
    # to nearest even: there the kernel writes float32 and torch rounds.
    staged = interpreted() and x.dtype == torch.bfloat16
    out = torch.empty(x2.shape, dtype=torch.float32 if staged else x.dtype, device=x.device)
    n = x2.shape[0]
    rows, warps = _launch_shape(block)
    tracing = isinstance(x, FakeTensor) or bool(_get_current_dispatch_mode_stack())
    if tracing:
        memoize_access_analysis(_hadamard_kernel)
    kernel = wrap_triton(_hadamard_kernel) if tracing else _hadamard_kernel
    scale = float(torch.tensor(math.sqrt(block), dtype=torch.float32))
    even = isinstance(n, int) and n % rows == 0
    if not isinstance(n, int) or n > 0:
        grid = ((n + rows - 1) // rows, d // block)
        kernel[grid](
            x2, out, n, x2.stride(0), out.stride(0), scale,
            ROWS=rows, B=block, EVEN_ROWS=even, num_warps=warps,
        )  # fmt: skip
    return out.to(x.dtype).reshape(x.shape)


@triton_op("stamp::hadamard_kernel", mutates_args=())
def hadamard_kernel_op(x: Tensor, block: int) -> Tensor:
    """``torch.ops.stamp.hadamard_kernel``: :func:`hadamard_rotate` as a ``triton_op``, so
    Inductor launches the kernel from its own code."""
    return hadamard_rotate(x, block)


def _rotate_back(ctx, grad):
    # The rotation is symmetric and orthonormal: its adjoint is itself.
    return hadamard_kernel_op(grad, ctx.block), None


def _keep_block(ctx, inputs, output) -> None:
    ctx.block = inputs[1]


hadamard_kernel_op.register_autograd(_rotate_back, setup_context=_keep_block)
