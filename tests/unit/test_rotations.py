"""Full-width feature rotations (stamp_fx/rotations.py): constructions, orthogonality for every
width, the power-of-two case being exactly ``block_hadamard``, determinism, the op's autograd."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stamp_fx.rotations import (
    HADAMARD_CONSTRUCTIONS,
    feature_rotation,
    hadamard_matrix,
    random_orthogonal,
    resolve_block,
    rotation_plan,
)
from stamp_fx.transforms import block_hadamard, feature_block_size
from tests.strategies import randn, seeds
from tests.tolerances import ROTATION_ORTHO_EPS_PER_FEATURE, ROUND_TRIP_RTOL

EPS64 = torch.finfo(torch.float64).eps


def assert_close_to_identity(m: torch.Tensor) -> None:
    n = m.shape[0]
    # Each entry of R Rᵀ sums n products: its rounding grows with n.
    tol = ROTATION_ORTHO_EPS_PER_FEATURE * max(n, 1) * EPS64
    assert (m - torch.eye(n, dtype=torch.float64)).abs().max().item() <= tol


# Every width up to 1024, and wide structured ones (a dense 2047 x 2047 random core takes
# seconds per example on a shared CPU; the structured widths are what models use).
widths = st.integers(1, 1024) | st.sampled_from([1152, 1536, 1540, 2000, 2046, 2048])


@given(width=widths)
def test_every_width_gets_an_orthonormal_rotation(width):
    rotation = rotation_plan(width)
    m = rotation.matrix()  # R itself: the rotation of the identity's rows
    assert m.shape == (width, width)
    # R Rᵀ (= rotating R's rows back, inverse=True applies Rᵀ) and Rᵀ R (= rotating Rᵀ's rows),
    # through the structured code path: as exact as a dense product, and cheap at D = 2048.
    assert_close_to_identity(feature_rotation(m, width, inverse=True))
    assert_close_to_identity(feature_rotation(m.T.contiguous(), width))
    if width <= 256:  # the dense product too, where it is cheap
        assert_close_to_identity(m @ m.T)
    if rotation.is_hadamard:
        # A Hadamard rotation spreads every feature evenly: all entries ±1/sqrt(width).
        dev = (m.abs() - 1 / math.sqrt(width)).abs().max().item()
        assert dev <= ROTATION_ORTHO_EPS_PER_FEATURE * EPS64 * math.log2(2 * width)
    else:
        # Only when no Hadamard of any order odd * 2**j is built here.
        odd = width // (width & -width)
        assert rotation.core == odd and rotation.kind == "random"


@pytest.mark.parametrize(
    ("width", "expected"),
    [
        (576, "paley2(36)x16"),  # SmolLM2's hidden size
        (1152, "paley2(36)x32"),
        (1536, "paley1(12)x128"),  # SmolLM2's MLP width
        (4096, "hadamard(4096)"),
        (14336, "paley2(28)x512"),  # Llama-3-8B's MLP width: order 28 from q = 13
        (48, "paley1(12)x4"),
        (6, "random(3)x2"),  # no Hadamard of order 3, 6 (not multiples of 4)
    ],
)
def test_rotation_plan_picks_the_smallest_hadamard_core(width, expected):
    assert rotation_plan(width).describe() == expected


@pytest.mark.parametrize("order", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 68, 72, 108, 148])
def test_constructions_are_hadamard(order):
    h = hadamard_matrix(order)
    assert h is not None
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.float64))


def test_constructions_decline_orders_they_cannot_build():
    # 92 = 4 * 23 needs q = 91 (Paley I) or 45 (Paley II): neither prime.
    assert not any(c.applies(92) for c in HADAMARD_CONSTRUCTIONS.values())
    assert hadamard_matrix(92) is None
    assert hadamard_matrix(6) is None


@given(log_block=st.integers(0, 9), blocks=st.integers(1, 3), rows=st.integers(1, 5), seed=seeds)
def test_power_of_two_blocks_are_block_hadamard_bit_for_bit(log_block, blocks, rows, seed):
    block = 1 << log_block
    x = randn((rows, blocks * block), seed)
    assert torch.equal(feature_rotation(x, block), block_hadamard(x, block))
    assert torch.equal(feature_rotation(x, block, inverse=True), block_hadamard(x, block))


@given(
    width=st.sampled_from([12, 20, 48, 96, 576, 7, 6, 92]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=seeds,
)
def test_round_trip_and_energy_in_every_dtype(width, dtype, seed):
    x = randn((2, 3, width), seed, dtype)
    y = feature_rotation(x, width)
    assert y.dtype == dtype and y.shape == x.shape
    back = feature_rotation(y, width, inverse=True).double()
    scale = x.double().abs().max().item()
    assert (back - x.double()).abs().max().item() <= ROUND_TRIP_RTOL[dtype] * scale * 4
    # Blockwise: a block smaller than the width rotates each block on its own.
    if width % 12 == 0 and width > 12:
        blocked = feature_rotation(x, 12)
        for i in range(width // 12):
            part = x[..., 12 * i : 12 * (i + 1)]
            # To rounding, not bit for bit: BLAS may pick another kernel for another row count.
            got, want = blocked[..., 12 * i : 12 * (i + 1)].double(), feature_rotation(part, 12)
            assert (got - want.double()).abs().max().item() <= ROUND_TRIP_RTOL[dtype] * scale * 4


def test_random_core_is_deterministic_and_fixed():
    a = random_orthogonal(7)
    random_orthogonal.cache_clear()
    b = random_orthogonal(7)
    assert torch.equal(a, b)
    assert (torch.diagonal(torch.linalg.qr(a)[1]) != 0).all()
    # The fixed seed, not the global RNG, decides it.
    torch.manual_seed(1234)
    random_orthogonal.cache_clear()
    assert torch.equal(random_orthogonal(7), a)


def test_resolve_block_names_and_ints():
    assert resolve_block("pow2", 576) == feature_block_size(576) == 64
    assert resolve_block("full", 576) == 576
    assert resolve_block(36, 576) == 36
    with pytest.raises(ValueError, match="feature_block 40 does not divide the 576 features"):
        resolve_block(40, 576)
    with pytest.raises(ValueError, match="feature_block: must be one of 'pow2', 'full'"):
        resolve_block("half", 576)
    with pytest.raises(ValueError, match="rotation block 12 does not divide the feature dim 20"):
        feature_rotation(torch.zeros(2, 20), 12)


@pytest.mark.parametrize("width", [12, 7])
def test_rotate_op_gradient_is_the_transpose(width):
    import stamp_fx.ops  # noqa: F401  (registers stamp::rotate)

    x = randn((3, width), 5, torch.float64).requires_grad_(True)
    g = randn((3, width), 6, torch.float64)
    torch.ops.stamp.rotate(x, width, False).backward(g)
    r = rotation_plan(width).matrix()
    torch.testing.assert_close(x.grad, g @ r.T, rtol=0, atol=1e-12)
