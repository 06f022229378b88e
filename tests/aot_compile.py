"""Compile the hand-written Haar kernels for an sm_90 GPU on a machine without one.

The Triton interpreter runs a kernel's Python, not Triton's compiler, so a kernel can be exact
in the interpreter and still fail to compile: for example constexpr arguments packed in a tuple
reach a device function as runtime values (``tl.arange``'s bounds then stop being constexpr),
which the interpreter accepts. This module lowers each kernel specialisation through Triton's
frontend and its TTIR / TTGIR passes for ``GPUTarget("cuda", 90, 32)``, which needs no GPU.
``--full`` continues through LLVM, PTX and ptxas to a cubin (with the GPU machine's Triton, 3.6;
on this CPU's Triton 3.9 LLVM's optimiser crashes on every version of the rows kernel, the
one that ran on the GPU included).

Run as a script in a process without ``TRITON_INTERPRET`` (the kernels must be decorated for
a GPU): ``python -P -m tests.aot_compile [--full]``. Prints one line per specialisation and
exits 1 if any fails.
"""

from __future__ import annotations

import inspect
import sys

# (name, D, LEVELS = log2 of the tile's tokens, V, SUB, SUBS, SYMMETRIC, GRID_W)
ROWS_CASES = [
    ("1-D, 32-token tiles", 4096, 5, 2, 512, 2, False, 0),
    ("1-D, 4-token tiles, symmetric", 4096, 2, 4, 512, 2, True, 0),
    ("haar2d, 8 x 8 tiles (PixArt 64 x 64)", 1152, 6, 1, 128, 9, False, 64),
    ("haar2d, 4 x 4 tiles, symmetric", 1152, 4, 2, 128, 9, True, 32),
    ("haar2d, 2 x 2 tiles", 1152, 2, 4, 128, 9, False, 8),
]
MODES = range(4)  # local, fused, stats, apply (lowering/triton_common.py)


def _compile(fn, constexprs: dict, pointers: dict, num_warps: int, full: bool) -> None:
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    names = list(inspect.signature(fn.fn).parameters)
    signature = {
        n: "constexpr"
        if n in constexprs
        else pointers.get(n, "i64" if n.startswith("stride") else "i32")
        for n in names
    }
    src = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    target = GPUTarget("cuda", 90, 32)
    if full:
        triton.compile(src, target=target, options={"num_warps": num_warps})
        return
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": num_warps})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(
        target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
        context,
    )  # fmt: skip
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    metadata: dict = {}
    for name in ("ttir", "ttgir"):
        module = stages[name](module, metadata)


def main(argv: list[str]) -> int:
    from stamp_fx.lowering import haar_rows

    full = "--full" in argv
    pointers = {
        "x_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32", "param_ptr": "*fp32",
        "sync_ptr": "*i64", "probe_ptr": "*bf16",
    }  # fmt: skip
    failed = 0
    for name, d, levels, v, sub, subs, symmetric, grid_w in ROWS_CASES:
        for mode in MODES:
            constexprs = {
                "D": d, "LEVELS": levels, "V": v, "SUB": sub, "SUBS": subs,
                "SYMMETRIC": symmetric, "MODE": mode, "PROBE": False, "EXACT": True,
                "GRID_W": grid_w,
            }  # fmt: skip
            try:
                _compile(haar_rows.rows_kernel, constexprs, pointers, sub // (v * 32), full)
                print(f"ok   rows kernel, {name}, mode {mode}", flush=True)
            except Exception as e:  # report every specialisation, then fail
                failed += 1
                print(f"FAIL rows kernel, {name}, mode {mode}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
