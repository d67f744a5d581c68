"""The importers write into ``s3://`` stores exactly what they write into a local one.

``healthwatch import tensorboard`` and ``healthwatch import te-debug`` on a real S3 server
(SeaweedFS on 127.0.0.1): every row read back from the S3 store equals the row the same import
wrote into a local store (the independent reference), and a second import of the same TE log is
refused on S3 as it is on disk (the refusal reads the store back).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _deps import require

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))

import healthwatch as hw  # noqa: E402

QUERIES = {
    "scalars": "SELECT step, tokens, name, value FROM scalars WHERE run = ? ORDER BY name, step",
    "layer_stats": "SELECT step, layer, layer_type, metric, value FROM layer_stats WHERE run = ? ORDER BY metric, layer, step",
    "attempts": "SELECT attempt, start_step, reason FROM attempts WHERE run = ? ORDER BY attempt",
}


def _rows(root: str | Path, run: str) -> dict[str, list[tuple]]:
    """Rows of each table, floats by ``repr`` (NaN equals NaN: an imported NaN must stay one)."""
    with hw.open_store(root) as st:
        return {t: [tuple(repr(v) if isinstance(v, float) else v for v in row) for row in st.sql(q, [run]).fetchall()]
                for t, q in QUERIES.items()}


def test_tensorboard_import_into_s3_equals_the_local_import(s3_root: str, tmp_path: Path) -> None:
    require("tensorboard", "TensorBoard event files (in the [dev] extra)")
    from test_tbimport import write_megatron_logdir

    from healthwatch.tbimport import import_tensorboard

    logdir = tmp_path / "tb"
    write_megatron_logdir(logdir, steps=8)
    n_local = import_tensorboard(logdir, run="tb-run", store=tmp_path / "local")
    n_s3 = import_tensorboard(logdir, run="tb-run", store=s3_root)
    assert n_s3 == n_local > 0
    local, remote = _rows(tmp_path / "local", "tb-run"), _rows(s3_root, "tb-run")
    assert local["scalars"] and local["layer_stats"]
    assert remote == local


def test_te_debug_import_into_s3_equals_the_local_import_and_refuses_twice(s3_root: str, tmp_path: Path) -> None:
    from test_signals_teimport import LINES

    from healthwatch.teimport import import_te_debug

    logdir = tmp_path / "te" / "nvdlfw_inspect_statistics_logs"
    logdir.mkdir(parents=True)
    (logdir / "nvdlfw_inspect_globalrank-0.log").write_text(LINES)
    n_local = import_te_debug(logdir.parent, run="te-run", store=tmp_path / "local")
    n_s3 = import_te_debug(logdir.parent, run="te-run", store=s3_root)
    assert n_s3 == n_local > 0
    local, remote = _rows(tmp_path / "local", "te-run"), _rows(s3_root, "te-run")
    assert local["layer_stats"] and remote == local
    with pytest.raises(ValueError, match="already imported"):
        import_te_debug(logdir.parent, run="te-run", store=s3_root)
