"""Hypothesis strategies and seeded tensor factories shared by the tests.

Shapes always include sequence lengths that are not powers of two and lengths below 2**J.
Tensors come from a seeded ``torch.Generator`` so failures are reproducible from the seed.
"""

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = (torch.float32, torch.bfloat16)

seeds = st.integers(0, 2**31 - 1)
# Deliberately biased towards awkward lengths: tiny, odd, just off powers of two.
seq_lengths = st.one_of(
    st.integers(1, 9),
    st.sampled_from([31, 33, 63, 64, 65, 100, 127, 129, 255, 257]),
    st.integers(10, 300),
)
feature_dims = st.sampled_from([1, 2, 3, 8, 16, 24])
batch_shapes = st.sampled_from([(), (1,), (2,), (2, 3)])
dtypes = st.sampled_from(FLOAT_DTYPES)


def randn(shape, seed: int, dtype=torch.float32, *, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def ar1(length: int, features: int, rho: float, seed: int) -> torch.Tensor:
    """Unit-variance AR(1) sequence along dim 0 (float64): locally correlated like real tokens."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(length, features, generator=gen, dtype=torch.float64)
    out = torch.empty_like(noise)
    out[0] = noise[0]
    innov = (1 - rho**2) ** 0.5
    for t in range(1, length):
        out[t] = rho * out[t - 1] + innov * noise[t]
    return out
