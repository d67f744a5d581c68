"""RELIABILITY.md and BENCHMARKS.md say only what a test or a raw result shows.

* every test RELIABILITY.md names as proof exists;
* faults made by patching a call are called that (not "no mocks");
* no count of SQL call sites is quoted as a fixed number (the security test computes and prints it);
* the benchmark report names the commit read at the start of its run, says when the checkout moved
  during the run, and keeps the hand-written findings apart from the measured tables.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_test_reliability_md_names_exists() -> None:
    text = (REPO / "RELIABILITY.md").read_text(encoding="utf-8")
    named: list[tuple[str, str]] = []
    for cell in re.findall(r"`(tests/[^`]+?\.py)::([A-Za-z_0-9]+)[^`]*`((?:, `::[A-Za-z_0-9]+[^`]*`)*)", text):
        path, first, more = cell
        named.append((path, first))
        named += [(path, m) for m in re.findall(r"`::([A-Za-z_0-9]+)", more)]
    assert len(named) >= 15, named  # the table is being read
    missing = [f"{p}::{n}" for p, n in named if not (REPO / p).exists() or n not in _test_names(REPO / p)]
    assert not missing, f"RELIABILITY.md names tests that do not exist: {missing}"


def test_reliability_md_says_where_faults_are_injected_by_patching() -> None:
    text = (REPO / "RELIABILITY.md").read_text(encoding="utf-8")
    assert "No mocks" not in text
    patched = (REPO / "tests" / "reliability" / "test_faulty_storage.py").read_text(encoding="utf-8")
    assert "monkeypatch.setattr" in patched or "mp.setattr" in patched
    rows = [line for line in text.splitlines() if "test_faulty_storage.py::test_storage_fault" in line
            or "test_faulty_storage.py::test_slow_store" in line]
    assert rows and all("injected by patching" in row for row in rows), rows


def test_no_fixed_count_of_sql_call_sites_is_quoted() -> None:
    for name in ("RELIABILITY.md", "BENCHMARKS.md"):
        text = (REPO / name).read_text(encoding="utf-8")
        quoted = re.findall(r"\b\d+ SQL call", text)
        assert not quoted, f"{name} quotes {quoted}: the count changes with the code; the test prints it"


def _meta(commit: str, commit_at_end: str | None) -> dict:
    return {"command": "python -m benchmarks --quick", "started": "now", "wall_s": 1.0, "quick": True,
            "machine": {"cpu": "cpu", "cores": 2, "usable_cores": 2, "ram_gib": 1.0, "os": "os", "python": "3",
                        "commit": commit},
            "commit_at_end": commit_at_end, "versions": {"torch": "2"}, "load": ["0", "0"], "timeline": [],
            "findings": ["a profiling note"]}


def test_benchmark_report_names_the_commit_read_at_the_start() -> None:
    from benchmarks.__main__ import render
    from benchmarks.bench_common import Section, Table

    sec = Section("x", "9. Example", intro="intro", tables=[Table("t", ["a"], [["1"]])])
    same = render([sec], _meta("abc1234", "abc1234"))
    header = same.split("## Machine")[0]
    assert "at commit abc1234 (read at the start of the run)" in header
    assert "checkout changed during the run" not in same
    moved = render([sec], _meta("abc1234", "def5678"))
    assert "checkout changed during the run: commit def5678 at its end" in moved.split("## Machine")[0]
    # Hand-written findings come after every measured table and say what they are.
    findings = moved.index("## Findings and fixes (hand-written)")
    assert moved.index("| a |") < findings and "a profiling note" in moved[findings:]
    assert "not measured by this run" in header


def test_the_benchmark_main_reads_the_commit_before_running() -> None:
    """``main`` takes ``machine_info()`` (with the commit) before the first job, not after the last."""
    src = (REPO / "benchmarks" / "__main__.py").read_text(encoding="utf-8")
    body = src[src.index("def main("):]
    assert body.index("machine = machine_info()") < body.index("runner.run(job)")
    assert '"machine": machine,' in body


def test_benchmarks_md_separates_findings_from_measured_rows() -> None:
    text = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert "## Findings and fixes (hand-written)" in text
    head = text.split("## Machine")[0]
    assert "hand-written" in head and "not measured by this run" in head
