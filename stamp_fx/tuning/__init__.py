"""Per-layer bit-budget tuning: measure each site's sensitivity, solve a global budget, write a plan.

``tune(model, batches, avg_bits=4.25, objective="fisher")``:

1. compiles ``model`` in observer mode (no Inductor) and runs the calibration batches; at every
   planned site it fake-quantizes the float input ``x`` with each candidate :class:`Option`
   (``high_tokens`` transformed tokens at ``high_bits``, the rest at ``low_bits``, drawn from
   ``high_token_grid x low_bits_grid``) and records, per option, the error at the output of
   the linear reading it, ``||(x_hat - x) W^T||^2``, the Theorem-1 bound, and, when the
   objective needs it, the loss-aware error below;
2. turns each site into a :class:`~stamp_fx.allocation.LayerCurve`: the average bits of each
   option at the calibration length against the objective's error (weighted in the budget by
   the activation size ``tokens x features``) and solves the global budget with
   :func:`~stamp_fx.allocation.allocate_layer_budgets`;
3. returns a :class:`TuneResult` whose ``plan`` gives every site its chosen ``high_tokens`` and
   ``low_bits`` (``plan.meta["tune"]``, schema below, records how).

Objectives (registry :data:`OBJECTIVES`; an unknown name raises ``ValueError`` listing them):

* ``"fisher"`` (default): the predicted increase of the loss, ``0.5 * sum g**2 * (x_hat - x)**2``
  summed over the calibration batches, with ``g`` the gradient of the loss (``loss_fn``; by
  default next-token cross-entropy) with respect to the site's input *as read by that site
  alone* (diagonal empirical Fisher; one extra eager forward and backward per batch). It is in
  loss units, so errors of different sites add up to the quantity we care about.
* ``"output_nsr"``: the output noise-to-signal ratio ``||(x_hat - x) W^T||^2 / ||x W^T||^2``
  (relative, because RMSNorm/LayerNorm downstream rescales every layer's output). Measured
  worse than the uniform rule at 4.5 bits on SmolLM2 (benchmarks/RESULTS.md).

The paper's uniform rule is the special case where every site takes the same option.

``plan.meta["tune"]`` (``schema`` 2; schema 1, written before ``objective`` existed, had
``grid`` and ``[bits, error]`` curves)::

    {"schema": 2, "objective": "fisher", "budget": 4.5, "achieved": 4.4996,
     "calibration_length": 512, "high_token_grid": [0, 1, 16, ...], "low_bits_grid": [4],
     "curves": {"<site key>": [[high_tokens, low_bits, avg_bits, error], ...]},
     "chosen": {"<site key>": [high_tokens, low_bits]}}

The plan itself (``plan.sites``) is an ordinary versioned :class:`~stamp_fx.plan.AllocationPlan`;
the backend reads only the site policies, so a hand-edited site is used as written.

Layout (one job per file; every public name is re-exported here):

* :mod:`.objectives`: :class:`Option` and the objective registry :data:`OBJECTIVES`;
* :mod:`.sensitivity`: :class:`SensitivityObserver`, the per-option measurement at each site;
* :mod:`.loss_gradients`: :class:`LossGradients` and :func:`next_token_loss` (``"fisher"``);
* :mod:`.solve`: :func:`tune`, :func:`solve` and :class:`TuneResult`;
* :mod:`stamp_fx.tune_report` (beside the CLI): the report table and plots.
"""

from ..tune_report import depth_order, layer_and_role
from .loss_gradients import LossFn, LossGradients, next_token_loss
from .objectives import DEFAULT_OBJECTIVE, OBJECTIVES, Objective, Option
from .sensitivity import SensitivityObserver, SiteSensitivity, linear_projection
from .solve import DEFAULT_HIGH_TOKEN_GRID, TUNE_META_SCHEMA, TuneResult, solve, tune

__all__ = [
    "DEFAULT_HIGH_TOKEN_GRID",
    "DEFAULT_OBJECTIVE",
    "OBJECTIVES",
    "TUNE_META_SCHEMA",
    "LossFn",
    "LossGradients",
    "Objective",
    "Option",
    "SensitivityObserver",
    "SiteSensitivity",
    "TuneResult",
    "depth_order",
    "layer_and_role",
    "linear_projection",
    "next_token_loss",
    "solve",
    "tune",
]
