"""GPU tier: the default lowering (``auto``) takes the hand-written kernels where they apply.

* The Hadamard rotation kernel equals the reference rotation on the same GPU within one ulp
  (PyTorch's CUDA reference divides by the scalar as a reciprocal multiply; the kernel divides).
* A model compiled with no ``lowering=`` option launches the fused Haar kernel and the rotation
  kernel (and calls no ``stamp::`` op through the reference) for the configurations users run,
  and equals the eager application of its plan under the whole-model rule.
* ``dynamic=True`` with auto Haar depth: one compile across depth brackets, the kernel picking
  the depth per call.
"""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from stamp_fx import StampCompiler, StampConfig
from stamp_fx.transforms import block_hadamard, feature_block_size
from tests import models
from tests.helpers import REFERENCE_OPS, assert_no_worse_than_eager, stamp_calls
from tests.tolerances import ROTATION_ERROR_RATIO, ROTATION_GPU_ULPS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def randn(shape, seed, dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 300, 4096), (1, 77, 1152), (3, 5, 14336), (2, 9, 64)])
def test_hadamard_kernel_matches_the_reference_rotation(shape, dtype):
    from stamp_fx.lowering.hadamard_kernel import hadamard_rotate

    block = feature_block_size(shape[-1])
    x = randn(shape, sum(shape), dtype)
    out = hadamard_rotate(x, block)
    ref = block_hadamard(x, block)
    torch.testing.assert_close(out, ref, rtol=ROTATION_GPU_ULPS * torch.finfo(dtype).eps, atol=0)
    exact = block_hadamard(x.double(), block)
    assert (out.double() - exact).norm() <= ROTATION_ERROR_RATIO * (
        ref.double() - exact
    ).norm() + 1e-30


@pytest.mark.parametrize(
    "options",
    [{}, {"feature_transform": "hadamard"}, {"feature_transform": "hadamard", "quantize_kv": True}],
    ids=["none", "hadamard", "hadamard_kv"],
)
def test_llama_default_lowering_launches_the_hand_written_kernels(options):
    model, inputs = models.llama(layers=1, seq=70, hidden=64)
    model = model.cuda()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    compiler = StampCompiler(StampConfig(high_tokens=4, **options))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    with torch.no_grad():
        out, codes = run_and_get_code(lambda: compiled(**inputs).logits)
    code = "\n".join(codes)
    assert "rows_kernel" in code, "the fused Haar kernel did not launch"
    if options.get("feature_transform") == "hadamard":
        assert "_hadamard_kernel" in code, "the rotation kernel did not launch"
    assert not stamp_calls(code, REFERENCE_OPS), stamp_calls(code, REFERENCE_OPS)[:3]
    labels = {n.meta.get("stamp_kernel") for n in compiler.last.graph.graph.nodes} - {None}
    assert "haar kernel" in labels and "reference" not in labels, labels
    assert_no_worse_than_eager(out, model, inputs, compiler.last.plan)


def test_dynamic_lengths_with_auto_depth_compile_once_on_the_kernel():
    model, _ = models.llama(layers=1, hidden=64)
    model = model.cuda()
    compiler = StampCompiler(StampConfig(high_tokens=4))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for seq in (9, 17, 33, 130):  # (max_position_embeddings is 256)
            inputs = {"input_ids": models._ids(2, seq, seq).cuda()}
            out = compiled(**inputs).logits
            assert_no_worse_than_eager(out, model, inputs, compiler.last.plan)
    assert len(compiler.records) == 1
    labels = {n.meta.get("stamp_kernel") for n in compiler.last.graph.graph.nodes} - {None}
    assert labels == {"haar kernel (depth per call)"}, labels


@pytest.mark.parametrize("side", [8, 32], ids=["grid4x4", "grid16x16"])
def test_pixart_haar2d_hadamard_default_lowering(side):
    """The haar2d sites take the grid kernel (2 x 2 tiles on the 4 x 4 grid, the 64-token
    8 x 8 tiles on the 16 x 16 one), the rotations the Hadamard kernel."""
    pytest.importorskip("diffusers")  # not on the GPU machine unless its wheels are carried
    model, inputs = models.pixart(side=side)
    model = model.cuda()
    inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    grid = (side // 2, side // 2)
    config = StampConfig(transform="haar2d", grid=grid, high_tokens=4, feature_transform="hadamard")
    compiler = StampCompiler(config)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    with torch.no_grad():
        out, codes = run_and_get_code(lambda: models.main_output(compiled(**inputs)))
    code = "\n".join(codes)
    assert "_hadamard_kernel" in code and "rows_kernel" in code
    assert not stamp_calls(code, REFERENCE_OPS), stamp_calls(code, REFERENCE_OPS)[:3]
    labels = {n.meta.get("stamp_kernel") for n in compiler.last.graph.graph.nodes} - {None}
    assert "haar2d kernel" in labels, labels
    assert_no_worse_than_eager(out, model, inputs, compiler.last.plan)


def test_padded_batch_runs_the_kernel_per_row():
    model, _ = models.llama(layers=1, hidden=64)
    model = model.cuda()
    ids = models._ids(2, 40, 3).cuda()
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # left padding on the first row
    inputs = {"input_ids": ids, "attention_mask": mask}
    compiler = StampCompiler(StampConfig(high_tokens=4))
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=compiler, fullgraph=True)(**inputs).logits
    labels = {n.meta.get("stamp_kernel") for n in compiler.last.graph.graph.nodes} - {None}
    assert labels == {"haar kernel (padded rows)"}, labels
    # The oracle: the same padded batch through the eager graph (the masked reference op), in
    # float64 and float32; the whole-model rule of DESIGN.md section 5.
    import copy

    from tests.tolerances import MODEL_ERROR_FLOOR_REL, MODEL_ERROR_RATIO

    def eager(dtype):
        m = copy.deepcopy(model).to(dtype)
        torch._dynamo.reset()
        run = torch.compile(m, backend=StampCompiler(StampConfig(high_tokens=4), inductor=False))
        with torch.no_grad():
            return run(**inputs).logits.double()

    ref64, eager32 = eager(torch.float64), eager(torch.float32)
    err, err_eager = (out.double() - ref64).norm(), (eager32 - ref64).norm()
    assert err <= MODEL_ERROR_RATIO * err_eager + MODEL_ERROR_FLOOR_REL * ref64.norm(), (
        err,
        err_eager,
    )
