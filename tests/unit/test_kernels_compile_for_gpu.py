"""The hand-written Triton kernels compile for an sm_90 GPU (Triton's frontend and its TTIR /
TTGIR passes, no GPU needed): a check the interpreter cannot make (see tests/aot_compile.py).
A fresh process, since the kernels must be decorated without ``TRITON_INTERPRET``."""

import os
import subprocess
import sys

import pytest


def test_rows_kernel_specialisations_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.aot_compile"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok   rows kernel") == 20, proc.stdout
