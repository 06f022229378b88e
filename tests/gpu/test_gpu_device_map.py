"""A Llama split over two GPUs with accelerate's device_map compiles through backend="stamp"
(graph breaks at the device hop) and equals the one-GPU stamp compile (issue 16, item 1)."""

from __future__ import annotations

import pytest
import torch

from stamp_fx import StampCompiler
from tests import models
from tests.distributed.test_device_map import llama_device_map
from tests.helpers import compile_and_run
from tests.tolerances import INDUCTOR_F32_TOL

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.mark.parametrize("options", [{}, {"feature_transform": "hadamard", "quantize_kv": True}])
def test_two_gpu_device_map_equals_one_gpu(options):
    import accelerate

    model, inputs = models.llama(hidden=64, heads=4, kv_heads=2, layers=4, seq=16)
    one = compile_and_run(model.to("cuda:0"), {k: v.cuda() for k, v in inputs.items()},
                          StampCompiler.from_options(options))  # fmt: skip
    dispatched = accelerate.dispatch_model(
        model, device_map=llama_device_map(["cuda:0", "cuda:1"], 4)
    )
    compiler = StampCompiler.from_options(options)
    two = compile_and_run(dispatched, {k: v.cuda() for k, v in inputs.items()}, compiler)
    assert len(compiler.merged_plan().sites) == 4 * 7 + (8 if options.get("quantize_kv") else 0)
    torch.testing.assert_close(two.to(one.device), one, **INDUCTOR_F32_TOL)
