"""Compile-and-compare helpers shared by the passes/ and compile/ tiers."""

from __future__ import annotations

import copy

import torch

from stamp_fx import StampCompiler, apply_plan_eager
from tests.models import main_output


def compile_and_run(model, inputs, compiler: StampCompiler, **compile_kwargs) -> torch.Tensor:
    """Fresh Dynamo state, compile with ``compiler``, run once under no_grad."""
    torch._dynamo.reset()
    with torch.no_grad():
        return main_output(torch.compile(model, backend=compiler, **compile_kwargs)(**inputs))


def eager_with_plan(model, inputs, plan, dtype=torch.float32) -> torch.Tensor:
    """The independent oracle: the plan applied with forward pre-hooks (reference.py)."""
    m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    cast = {
        k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in inputs.items()
    }
    handles = apply_plan_eager(m, plan)
    try:
        with torch.no_grad():
            return main_output(m(**cast))
    finally:
        for h in handles:
            h.remove()


def eager(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**inputs))


def assert_no_worse_than_eager(compiled: torch.Tensor, model, inputs, plan) -> None:
    """DESIGN.md section 5: ``||compiled - ref64|| <= 2 ||eager32 - ref64|| + floor``."""
    from tests.tolerances import MODEL_ERROR_FLOOR_REL, MODEL_ERROR_RATIO

    ref64 = eager_with_plan(model, inputs, plan, torch.float64)
    eager32 = eager_with_plan(model, inputs, plan)
    err_compiled = (compiled.double() - ref64).norm().item()
    err_eager = (eager32.double() - ref64).norm().item()
    floor = MODEL_ERROR_FLOOR_REL * ref64.norm().item()
    assert err_compiled <= MODEL_ERROR_RATIO * err_eager + floor, (err_compiled, err_eager, floor)
