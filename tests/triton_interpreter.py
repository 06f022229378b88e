"""Run the hand-written Triton kernels in the Triton interpreter when there is no GPU.

``TRITON_INTERPRET=1`` must be set before ``@triton.jit`` decorates a kernel, i.e. before its
module is first imported; a kernel test module calls :func:`select_interpreter` at collection
time, before its own imports. Triton itself may already be imported by then (Inductor imports it
when the compile tests are collected); that is fine because the kernels call only device
functions of their own package, none of triton.language's pre-decorated helpers.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch


def select_interpreter(*kernel_modules: str) -> None:
    """Without CUDA, select the interpreter; skip the calling module if one of
    ``kernel_modules`` was already compiled for a GPU (then run that file on its own)."""
    if torch.cuda.is_available():
        return
    if any(m in sys.modules for m in kernel_modules) and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "the Triton kernels were compiled for a GPU before this module could select the "
            "interpreter; run this file on its own",
            allow_module_level=True,
        )
    os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
