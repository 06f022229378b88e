"""The stamp ops are decomposed however the process compiled before (regression).

Inductor memoises a copy of its decomposition table (``fast_random_decomps``) on first use. A
process that compiled something with ``backend="inductor"`` before its first stamp compile (every
benchmark does: the baseline comes first) used to keep a copy without the stamp entries, and
every decomposed site silently ran as an extern call to the eager reference (25x the inductor
latency on PixArt-Sigma on an H200). Order matters, so the first test runs in a fresh process.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from stamp_fx.lowering.decompositions import decompositions_active

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import torch
from torch._inductor.utils import run_and_get_code
from stamp_fx import StampCompiler, StampConfig
from tests import models
from tests.helpers import stamp_calls

# An Inductor compile before any stamp compile: Inductor memoises its table here.
torch.compile(torch.nn.Linear(8, 8), backend="inductor")(torch.randn(2, 8))
model, inputs = models.llama(layers=1, seq=20)
compiler = StampCompiler(StampConfig(high_tokens=4, feature_transform="hadamard"))
compiled = torch.compile(model, backend=compiler, fullgraph=True)
with torch.no_grad():
    _, codes = run_and_get_code(lambda: models.main_output(compiled(**inputs)))
assert compiler.last.plan.sites, "nothing was quantized"
print("EXTERN", len(stamp_calls("\\n".join(codes))))
"""


def test_a_prior_inductor_compile_leaves_stamp_ops_decomposed(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # no cached code to hide it
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "EXTERN 0" in done.stdout, done.stdout[-2000:]


def test_a_stale_memoised_table_is_rebuilt_on_activation():
    from torch._inductor import decomposition

    ops = [torch.ops.stamp.fake_quant.default, torch.ops.stamp.hadamard.default]
    with decompositions_active():
        pass  # installs our entries
    saved = {op: decomposition.decompositions.pop(op) for op in ops}
    try:
        decomposition.fast_random_decomps.cache_clear()
        stale = decomposition.select_decomp_table()  # memoised without our entries
        assert not any(op in stale for op in ops)
    finally:
        decomposition.decompositions.update(saved)
    with decompositions_active():
        table = decomposition.select_decomp_table()
        assert all(op in table for op in ops)
