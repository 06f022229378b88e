"""Every numeric tolerance of the test suite, in one table (DESIGN.md section 5)."""

import torch

# Transform round trip / energy preservation, relative to the input's max magnitude (or norm).
ROUND_TRIP_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    # bf16/fp16 results are rounded once to the storage dtype on the way out and once more on
    # the way back in: two half-ulp roundings of the largest element.
    torch.bfloat16: 2 * 2.0**-8,
    torch.float16: 2 * 2.0**-11,
}

# Energy preservation of forward transforms, relative to ||x||^2.
ENERGY_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 4e-3,
}

# Quantization error per element: at most half a step, plus float32 rounding of the
# dequantized value (a few ulps of the value's magnitude).
HALF_STEP_SLACK_ULPS = 4

# Fake quant applied twice differs from once by float32 rounding only.
IDEMPOTENT_RTOL = 1e-5

# 16-bit fake quant must reach at least this SQNR (dB) on Gaussian data in float32/float64.
SQNR_FLOOR_16BIT_DB = 80.0

# Whole models (DESIGN.md section 5): the compiled output may be at most this many times as far
# from the float64 eager application of the plan as the float32 eager application is, plus a
# floor relative to the output norm for runs where float32 and float64 agree to rounding.
MODEL_ERROR_RATIO = 2.0
MODEL_ERROR_FLOOR_REL = 1e-5

# Fused kernels (the hand-written Triton kernel, Inductor's generated code) against the
# reference once a value has been dequantized (DESIGN.md section 5, "ulp-level"): integer codes
# and q/dq values are compared exactly; the output after the inverse transform within
# FUSED_OUTPUT_ULPS ulps of the output dtype at each element's magnitude plus
# FUSED_OUTPUT_ABS_F32_ULPS float32 ulps of the largest |reference| (inverse-transform sums of
# nearly cancelling terms have a tiny magnitude but carry the rounding of their summands).
FUSED_OUTPUT_ULPS = {torch.float32: 8, torch.bfloat16: 1, torch.float16: 1}
FUSED_OUTPUT_ABS_F32_ULPS = 8

# Inductor's Triton code on CUDA multiplies by the reciprocal of constant divisors and fuses
# multiply-adds, so a transformed coefficient sitting on a rounding tie may get the neighbouring
# code: at most this fraction of output elements may then be off by up to one quantization step.
GPU_TIE_FRACTION = 1e-3

# The Hadamard rotation kernel on CUDA divides by sqrt(B); PyTorch's CUDA reference multiplies by
# its reciprocal: at most this many ulps of the output dtype apart, element by element.
ROTATION_GPU_ULPS = 1
# ... and its error against float64 at most this factor of the reference's own (ties may round
# either way; the kernel's exact division is no less accurate than the reciprocal multiply).
ROTATION_ERROR_RATIO = 1.01

# Full-width rotations (stamp_fx/rotations.py) in float64: R Rᵀ - I, and |R| - 1/sqrt(D) for a
# Hadamard, within this many float64 epsilons per feature (each entry of R Rᵀ sums D products;
# measured well under 0.1 eps per feature up to D = 2048).
ROTATION_ORTHO_EPS_PER_FEATURE = 2

# Two float32 computations of one quantity that differ only in the order of their operations:
# the graph run without Inductor (observer / FX) against the eager hook oracle
# (reference.apply_plan_eager), or ``x @ M`` against the module's own matmul.
F32_REORDER_TOL = {"rtol": 1e-5, "atol": 1e-5}

# CPU Inductor's generated code (fused loops, reassociated sums) against the eager oracle, float32.
INDUCTOR_F32_TOL = {"rtol": 1e-4, "atol": 1e-4}

# "Quantization happened": the quantized model's output is not allclose to the float model's
# at this absolute tolerance; the smaller margin where only a few small sites are quantized.
QUANTIZED_DIFFERS_ATOL = 1e-3
QUANTIZED_DIFFERS_ATOL_SMALL = 1e-4

# Exact solvers against brute force on small cases: equal up to float64 summation order.
BRUTE_FORCE_REL = 1e-12

# Budgets: the solvers may spend up to this many bits above a budget (allocation._BUDGET_EPS),
# so that a budget met exactly in real arithmetic is not refused for a float rounding.
BUDGET_SLACK_BITS = 1e-9

CLIP_SEARCH_REL = 1e-4
"""The clip search sums float32 per-token errors in the quantized domain; its brute-force oracle
computes each ratio pair's whole-site error in float64 through the reference: the chosen pair's
error may exceed the best one by this relative amount (float32 rounding of near-equal sums)."""

# Tensor parallelism against one process, float64: the row-parallel linears' partial sums are
# added in another order (float64 rounding, far below a quantization step, so no code moves;
# measured 0 on the tiny Llama). In float32 the same reordering can move a value across a
# rounding boundary of a 4-bit code, and that step then propagates through the model: float32
# runs are therefore compared site by site, not as whole models.
TP_F64_TOL = {"rtol": 1e-10, "atol": 1e-10}
