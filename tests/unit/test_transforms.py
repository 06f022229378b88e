"""Sequence transforms: round trip, orthonormality, ordering, cost structure, errors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stamp_fx import available_transforms, make_transform, token_autocorrelation
from stamp_fx.transforms import Haar, auto_haar2d_levels, auto_haar_levels
from tests.strategies import batch_shapes, dtypes, feature_dims, randn, seeds, seq_lengths
from tests.tolerances import ENERGY_RTOL, ROUND_TRIP_RTOL


def _build(name: str, length: int, seed: int, levels: int):
    if name == "haar":
        return make_transform("haar", levels=levels)
    if name == "haar2d":
        # A grid whose size is the sequence length: pick the most square factorisation.
        h = max(d for d in range(1, int(math.isqrt(length)) + 1) if length % d == 0)
        return make_transform("haar2d", grid=(h, length // h), levels=min(levels, 3))
    if name == "klt":
        calib = randn((length + 3, 4 * length), seed + 1, torch.float64)
        return make_transform("klt", autocorr=token_autocorrelation(calib, dim=0))
    return make_transform(name)


transform_names = st.sampled_from(["identity", "haar", "haar2d", "dct", "wht", "klt"])


@given(
    name=transform_names,
    length=seq_lengths,
    features=feature_dims,
    batch=batch_shapes,
    dtype=dtypes,
    seed=seeds,
    levels=st.integers(0, 6),
    seq_axis=st.sampled_from(["first", "middle", "last"]),
)
def test_inverse_recovers_input_and_energy_is_preserved(
    name, length, features, batch, dtype, seed, levels, seq_axis
):
    if name == "klt" and length > 140:
        length = length % 140 + 1  # keep the eigendecomposition small
    t = _build(name, length, seed, levels)
    # The transform axis may sit anywhere; every other axis is a batch axis.
    dims = [*batch, features]
    dim = {"first": 0, "middle": len(batch), "last": len(dims)}[seq_axis]
    shape = tuple(dims[:dim] + [length] + dims[dim:])
    x = randn(shape, seed, dtype)
    y = t.forward(x, dim)
    assert y.dtype == dtype
    assert y.shape[dim] == t.coefficient_length(length)
    back = t.inverse(y, dim, length=length)
    assert back.shape == x.shape and back.dtype == dtype
    scale = x.abs().max().item() or 1.0
    # Round trip: per-element, relative to the largest input element (both roundings happen
    # at that scale in low precision). Sums over S terms can add a factor log2(S) in float32.
    tol = ROUND_TRIP_RTOL[dtype] * scale * (1 + math.log2(max(2, length)))
    assert (back.double() - x.double()).abs().max().item() <= tol
    # Orthonormal: the padded forward keeps the energy (float64 check of the stored result).
    e_in, e_out = x.double().square().sum().item(), y.double().square().sum().item()
    assert abs(e_out - e_in) <= ENERGY_RTOL[dtype] * max(e_in, 1e-30)


@pytest.mark.parametrize("name", ["identity", "haar", "dct", "wht"])
@pytest.mark.parametrize("length", [1, 5, 64, 100])
def test_transform_matrix_is_orthogonal(name, length):
    t = make_transform(name) if name != "haar" else make_transform("haar", levels=3)
    m = t.forward(torch.eye(length, dtype=torch.float64), 0)  # columns = images of unit vectors
    n = m.shape[0]
    # Rows of an orthonormal map on the padded space: m.T @ m == I (isometry of the input).
    torch.testing.assert_close(
        m.T @ m, torch.eye(length, dtype=torch.float64), atol=ROUND_TRIP_RTOL[torch.float64], rtol=0
    )
    assert n == t.coefficient_length(length)


def test_haar_output_order_is_approximation_then_coarse_to_fine_details():
    x = torch.arange(8, dtype=torch.float64).unsqueeze(1)
    y = make_transform("haar", levels=2).forward(x, 0).squeeze(1)
    # a_2 = sum of 4 samples / 2; d_2 = (sum first pair - sum second pair) / 2; d_1 = pair differences / sqrt2
    expected = [6 / 2, 22 / 2, (1 - 5) / 2, (9 - 13) / 2] + [-1 / math.sqrt(2)] * 4
    torch.testing.assert_close(y, torch.tensor(expected, dtype=torch.float64))


def test_haar_constant_sequence_puts_all_energy_in_approximation_band():
    x = torch.ones(2048, 3)
    y = make_transform("haar").forward(x, 0)  # auto levels: 5, band of 64
    assert Haar().levels_for(2048) == 5
    assert y[64:].abs().max() < 1e-5
    torch.testing.assert_close(y[:64].square().sum(), x.square().sum())


def test_haar_pads_short_and_odd_lengths_and_crops_back():
    t = make_transform("haar", levels=5)
    for length in (1, 7, 31, 33):
        x = torch.randn(length, 4, dtype=torch.float64)
        y = t.forward(x, 0)
        assert y.shape[0] == -(-length // 32) * 32
        torch.testing.assert_close(t.inverse(y, 0, length=length), x)


@pytest.mark.parametrize("name", ["haar", "wht"])
def test_fast_transforms_never_build_a_dense_matrix(name):
    """At S = 2**20 a dense S x S float64 matrix would need 8 TiB: finishing at all (and
    exactly) shows haar and wht use butterflies, O(S) and O(S log S) memory and work."""
    length = 1 << 20
    x = randn((length, 1), 0, torch.float64)
    t = make_transform(name, levels=10) if name == "haar" else make_transform(name)
    y = t.forward(x, 0)
    torch.testing.assert_close(y.square().sum(), x.square().sum())
    torch.testing.assert_close(t.inverse(y, 0, length=length), x)


def test_wht_rows_are_in_sequency_order():
    n = 32
    w = make_transform("wht").forward(torch.eye(n, dtype=torch.float64), 0)
    sign_changes = [int(((w[k, 1:] * w[k, :-1]) < 0).sum()) for k in range(n)]
    assert sign_changes == list(range(n))
    assert w.shape == (n, n)


def test_wht_pads_to_power_of_two():
    t = make_transform("wht")
    assert [t.coefficient_length(s) for s in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]


def test_dct_matches_closed_form_first_rows():
    n = 6
    c = make_transform("dct").forward(torch.eye(n, dtype=torch.float64), 0)
    torch.testing.assert_close(c[0], torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64))
    k1 = torch.tensor(
        [math.sqrt(2 / n) * math.cos(math.pi * (2 * t + 1) / (2 * n)) for t in range(n)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(c[1], k1)


def test_haar2d_ll_band_first_and_grid_padding():
    t = make_transform("haar2d", grid=(64, 64))
    assert t.levels == 3 and auto_haar2d_levels(64, 64) == 3
    x = torch.ones(64 * 64, 2)
    y = t.forward(x, 0)
    assert y[64:].abs().max() < 1e-5  # constant image: everything in the 8x8 LL band
    t = make_transform("haar2d", grid=(5, 7), levels=2)
    assert t.coefficient_length(35) == 8 * 8


def test_haar2d_matches_separable_1d_haar_for_one_level():
    h, w = 4, 6
    x = torch.randn(h * w, 3, dtype=torch.float64)
    y = make_transform("haar2d", grid=(h, w), levels=1).forward(x, 0)
    grid = x.reshape(h, w, 3)
    rows = make_transform("haar", levels=1).forward(grid, 0)  # [L; H] along height
    both = make_transform("haar", levels=1).forward(rows, 1)  # [L; H] along width
    ll = both[: h // 2, : w // 2].reshape(-1, 3)
    torch.testing.assert_close(y[: ll.shape[0]], ll)


def test_klt_diagonalises_its_autocorrelation_with_decreasing_energy():
    gen = torch.Generator().manual_seed(0)
    data = torch.cumsum(torch.randn(40, 500, generator=gen, dtype=torch.float64), 0)
    r = token_autocorrelation(data, dim=0)
    t = make_transform("klt", autocorr=r)
    basis = t.basis(40)
    d = basis @ r @ basis.T
    off = d - torch.diag(torch.diagonal(d))
    assert off.abs().max() < 1e-8 * d.abs().max()
    ev = torch.diagonal(d)
    assert (ev[:-1] >= ev[1:] - 1e-9).all()
    # Shorter sequences use the leading block; longer ones are refused.
    assert t.forward(data[:10], 0).shape[0] == 10
    with pytest.raises(ValueError, match="calibrated on 40 tokens"):
        t.forward(data[:10].repeat(5, 1), 0)


def test_auto_levels_target_64_tokens():
    assert [auto_haar_levels(s) for s in (1, 64, 90, 128, 2048, 4096)] == [0, 0, 0, 1, 5, 6]
    assert auto_haar_levels(2048, target=32) == 6


def test_registry_errors_list_valid_names():
    assert set(available_transforms()) == {"identity", "haar", "haar2d", "dct", "wht", "klt"}
    with pytest.raises(ValueError, match="valid transforms: dct, haar, haar2d, identity, klt, wht"):
        make_transform("fft")
    with pytest.raises(ValueError, match="needs grid"):
        make_transform("haar2d")
    with pytest.raises(ValueError, match="needs autocorr"):
        make_transform("klt")
    with pytest.raises(ValueError, match="levels"):
        make_transform("haar", levels=-1)
    with pytest.raises(ValueError, match="holds 12 tokens"):
        make_transform("haar2d", grid=(3, 4)).forward(torch.zeros(13, 2), 0)
    with pytest.raises(TypeError, match="floating-point"):
        make_transform("haar").forward(torch.zeros(4, 2, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="do not come from"):
        make_transform("wht").inverse(torch.zeros(3, 2), 0, length=3)


@given(
    rows=st.integers(1, 5),
    blocks=st.integers(1, 9),
    log_block=st.integers(0, 6),
    seed=seeds,
    dtype=dtypes,
)
def test_block_hadamard_is_orthonormal_and_self_inverse(rows, blocks, log_block, seed, dtype):
    from stamp_fx.transforms import block_hadamard, feature_block_size

    block = 1 << log_block
    x = randn((rows, blocks * block), seed, dtype)
    y = block_hadamard(x, block)
    scale = x.abs().max().item() or 1.0
    assert (block_hadamard(y, block).double() - x.double()).abs().max() <= ROUND_TRIP_RTOL[
        dtype
    ] * scale * (2 + log_block)
    assert (
        abs(y.double().square().sum() - x.double().square().sum())
        <= ENERGY_RTOL[dtype] * x.double().square().sum() + 1e-30
    )
    assert feature_block_size(blocks * block) % block == 0


def test_block_hadamard_rejects_bad_blocks():
    from stamp_fx.transforms import block_hadamard

    with pytest.raises(ValueError, match="power of two dividing the feature dim 12"):
        block_hadamard(torch.zeros(2, 12), 8)
