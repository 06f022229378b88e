"""Models dispatched with accelerate (``device_map``, AlignDevicesHook) compile through
``backend="stamp"`` to the same computation as the undispatched model (issue 16, item 1).

On a CPU-only machine every device in the map is ``"cpu"`` (``force_hooks=True`` keeps the hooks,
so the graph Dynamo sees carries them); ``tests/gpu/test_gpu_device_map.py`` spreads the layers
over two GPUs, where the device hops also break the graph.
"""

from __future__ import annotations

import pytest
import torch

from stamp_fx import StampCompiler
from tests import models
from tests.helpers import compile_and_run
from tests.tolerances import F32_REORDER_TOL

accelerate = pytest.importorskip("accelerate")


def llama_device_map(devices: list[str], layers: int) -> dict[str, str]:
    """Embeddings on the first device, the blocks spread in order, norm and head on the last."""
    per = -(-layers // len(devices))
    placement = {f"model.layers.{i}": devices[i // per] for i in range(layers)}
    return {
        "model.embed_tokens": devices[0], "model.rotary_emb": devices[0], **placement,
        "model.norm": devices[-1], "lm_head": devices[-1],
    }  # fmt: skip


@pytest.mark.parametrize("options", [{}, {"feature_transform": "hadamard", "quantize_kv": True}])
def test_accelerate_hooks_compile_to_the_same_computation(options):
    model, inputs = models.llama(hidden=64, heads=4, kv_heads=2, seq=16)
    plain = StampCompiler.from_options({"inductor": False, **options})
    expected = compile_and_run(model, inputs, plain)
    dispatched = accelerate.dispatch_model(
        model, device_map=llama_device_map(["cpu", "cpu"], 2), force_hooks=True
    )
    assert type(dispatched.model.layers[0]._hf_hook).__name__ == "AlignDevicesHook"
    hooked = StampCompiler.from_options({"inductor": False, **options})
    got = compile_and_run(dispatched, inputs, hooked)
    # Same site names (FQNs without accelerate's ``_old_forward`` wrapper), same policies.
    assert hooked.merged_plan().sites == plain.merged_plan().sites
    torch.testing.assert_close(got, expected, **F32_REORDER_TOL)
