"""stamp-fx: STaMP sequence-transform mixed-precision activation quantization for torch.compile.

The numerical core (this release): sequence transforms, the per-token quantizer, the Theorem-1
bit-allocation solvers, ``StampConfig`` and the pure-PyTorch reference (the spec).
"""

from .allocation import (
    DEFAULT_ALLOWED_BITS,
    LayerCurve,
    SpectralBitPlan,
    allocate_layer_budgets,
    bound_objective,
    continuous_bits,
    haar_band_fractions,
    haar_band_plan,
    paper_preset,
    solve_band_bits,
    solve_token_bits,
)
from .config import CONFIG_VERSION, StampConfig
from .quantizer import TokenBits, compute_qparams, dequantize, fake_quant, quantize
from .reference import (
    sqnr_db,
    stamp_fake_quant_config_ref,
    stamp_fake_quant_ref,
    theorem1_bound,
    transformed_token_energies,
    transformed_tokens,
)
from .transforms import (
    SequenceTransform,
    available_transforms,
    make_transform,
    register_transform,
    token_autocorrelation,
)

__version__ = "0.1.0"

__all__ = [
    "CONFIG_VERSION",
    "DEFAULT_ALLOWED_BITS",
    "LayerCurve",
    "SequenceTransform",
    "SpectralBitPlan",
    "StampConfig",
    "TokenBits",
    "allocate_layer_budgets",
    "available_transforms",
    "bound_objective",
    "compute_qparams",
    "continuous_bits",
    "dequantize",
    "fake_quant",
    "haar_band_fractions",
    "haar_band_plan",
    "make_transform",
    "paper_preset",
    "quantize",
    "register_transform",
    "solve_band_bits",
    "solve_token_bits",
    "sqnr_db",
    "stamp_fake_quant_config_ref",
    "stamp_fake_quant_ref",
    "theorem1_bound",
    "token_autocorrelation",
    "transformed_token_energies",
    "transformed_tokens",
]
