"""The Hadamard rotation kernel (lowering/hadamard_kernel.py) against the reference rotation.

Without CUDA it runs in the Triton interpreter (set before the kernel module is imported, as in
test_triton_haar.py). There it must equal :func:`stamp_fx.transforms.block_hadamard` bit for bit
(same butterflies in the same order, the same IEEE division by the float32 ``sqrt(B)``).
"""

import pytest
import torch

from tests.triton_interpreter import select_interpreter

select_interpreter("stamp_fx.lowering.hadamard_kernel")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from stamp_fx.lowering import hadamard_kernel  # noqa: E402

from stamp_fx.transforms import block_hadamard, feature_block_size  # noqa: E402
from tests.strategies import randn, seeds  # noqa: E402
from tests.tolerances import ROTATION_GPU_ULPS  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=25)
@given(
    rows=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    log_block=st.integers(0, 9),
    groups=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=seeds,
)
def test_kernel_equals_reference_rotation(rows, log_block, groups, dtype, seed):
    block = 1 << log_block
    x = randn((*rows, groups * block), seed, dtype).to(DEVICE)
    out = hadamard_kernel.hadamard_rotate(x, block)
    ref = block_hadamard(x, block)
    assert out.dtype == x.dtype and out.shape == x.shape
    if DEVICE == "cpu":
        assert torch.equal(out, ref)
    else:  # PyTorch's CUDA reference divides by the scalar as a reciprocal multiply
        torch.testing.assert_close(
            out, ref, rtol=ROTATION_GPU_ULPS * torch.finfo(dtype).eps, atol=0
        )


def test_kernel_is_its_own_inverse_and_takes_the_model_blocks():
    x = randn((3, 7, 576), 0, torch.float32).to(DEVICE)
    block = feature_block_size(576)  # 64
    once = hadamard_kernel.hadamard_rotate(x, block)
    torch.testing.assert_close(hadamard_kernel.hadamard_rotate(once, block), x)
    assert hadamard_kernel.eligible(x, block)
    assert not hadamard_kernel.eligible(x, 48)  # not a power of two
    assert not hadamard_kernel.eligible(x, 128)  # does not divide 576


def test_kernel_rejects_bad_blocks_with_a_clear_error():
    x = torch.zeros(2, 12, device=DEVICE)
    with pytest.raises(ValueError, match="block must be a power of two"):
        hadamard_kernel.hadamard_rotate(x, 8)


def test_kernel_handles_empty_and_non_contiguous_inputs():
    x = randn((4, 6, 32), 1, torch.float32).to(DEVICE).transpose(0, 1)
    assert torch.equal(hadamard_kernel.hadamard_rotate(x, 16), block_hadamard(x, 16))
    empty = torch.zeros(0, 32, device=DEVICE)
    assert hadamard_kernel.hadamard_rotate(empty, 32).shape == (0, 32)
