"""stamp-fx: STaMP sequence-transform mixed-precision activation quantization for torch.compile.

``torch.compile(model, backend="stamp", options={...})`` (or ``backend=StampCompiler(config)``)
inserts STaMP fake quantization in front of every linear layer of the transformer blocks.
The numerical core (transforms, quantizer, Theorem-1 solvers, ``StampConfig``) and the
pure-PyTorch reference (the spec) are public too.
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
from .api import calibrate, explain
from .backend import CompileRecord, StampCompiler, generation_bits, stamp_backend
from .bit_meter import BitMeter
from .config import CONFIG_VERSION, StampConfig
from .plan import AllocationPlan, SitePolicy, load_plan
from .quantizer import TokenBits, compute_qparams, dequantize, fake_quant, quantize
from .reference import (
    apply_plan_eager,
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
from .tuning import TuneResult, tune
from .weights import WeightPlan, WeightQuantConfig, load_weight_plan, quantize_weights

__version__ = "0.1.0"

__all__ = [
    "AllocationPlan",
    "BitMeter",
    "CompileRecord",
    "generation_bits",
    "SitePolicy",
    "StampCompiler",
    "apply_plan_eager",
    "calibrate",
    "explain",
    "load_plan",
    "stamp_backend",
    "tune",
    "TuneResult",
    "WeightPlan",
    "WeightQuantConfig",
    "load_weight_plan",
    "quantize_weights",
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
