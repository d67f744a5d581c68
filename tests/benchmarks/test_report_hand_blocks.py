"""Hand-written blocks of BENCHMARKS.md survive a regeneration (``render`` / ``report_from_raw``).

An existing report gets hand blocks in several places (the preamble, after a table, two in a row,
a whole section of its own, under a section the next run no longer writes, one standing in for
the generated summary); a report rendered over it with other numbers must hold each block
verbatim, in its section, after what it followed, and rendering again over that output must
change nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.__main__ import carry_hand_blocks, find_hand_blocks, render, report_from_raw
from benchmarks.bench_common import MISS, PASS, Budget, Section, Table

REPO = Path(__file__).resolve().parents[2]


def _meta() -> dict:
    return {"command": "python -m benchmarks --quick", "started": "2026-12-03 07:00 UTC", "wall_s": 12.0,
            "quick": False, "machine": {"cpu": "cpu", "cores": 2, "usable_cores": 2, "ram_gib": 1.0, "os": "os",
                                        "python": "3.11", "commit": "abc1234"},
            "versions": {"torch": "2.13"}, "load": ["1", "2"], "timeline": [], "findings": ["a finding"]}


def _sections(p95: str, with_gone: bool = False) -> list[Section]:
    """Two sections (three with ``with_gone``); ``p95`` changes the numbers as a new run would."""
    out = [
        Section("query", "4. Queries at scale", intro="A live store.",
                budgets=[Budget("series p95", "≤ 100 ms", p95, MISS)],
                tables=[Table("Queries", ["what", "measured", "note"],
                              [["series p50", "200 ms", "matches raw SQL"], ["series p95", p95, ""]]),
                        Table("Fresh process", ["what", "measured", "note"], [["open + series", "116 ms", ""]])],
                notes=["checked against raw SQL"]),
        Section("render", "5. Run page in the browser", budgets=[Budget("cold load", "≤ 3 s", "6.96 s", MISS)],
                tables=[Table("Loads", ["load", "p50"], [["cold", "6.96 s"], ["warm", "3.43 s"]])]),
    ]
    if with_gone:
        out.append(Section("gone", "7. A benchmark since removed", budgets=[Budget("x", "≤ 1", "0.5", PASS)],
                           tables=[Table("Gone", ["a"], [["1"]])]))
    return out


BLOCKS = {
    "top": ["<!-- hand:BEGIN top -->", "> Re-measured on 2026-12-03 by hand: see the notes of sections 4 and 5.",
            "<!-- hand:END top -->"],
    "after-table": ["<!-- hand:BEGIN q-note -->", "**Re-measured rows (hand)**", "",
                    "| what | measured |", "|---|---|", "| series p95 | 253 ms |", "",
                    "Load 2–4 on 2 cores; raw JSON in `benchmarks/results/`.", "<!-- hand:END q-note -->"],
    "second": ["<!-- hand:BEGIN q-note-2 -->", "- a second note right after the first", "<!-- hand:END q-note-2 -->"],
    "after-heading": ["<!-- hand:BEGIN r-head -->", "> Re-measured on an idle machine: cold 6.96 s.",
                      "<!-- hand:END r-head -->"],
    "section": ["<!-- hand:BEGIN s3 -->", "## S3 store (measured by hand)", "",
                "> Not produced by `python -m benchmarks`.", "", "| query | S3 |", "|---|---|",
                "| one layer series | 1.99 s |", "", "Budget: miss.", "<!-- hand:END s3 -->"],
    "gone": ["<!-- hand:BEGIN gone-note -->", "A note under a section the benchmarks stopped writing.",
             "<!-- hand:END gone-note -->"],
    "summary": ["<!-- hand:BEGIN summary replaces -->", "| # | what | budget | measured | verdict | note |",
                "|---|---|---|---|---|---|", "| 4 | series p95 (load 2–4) | ≤ 100 ms | 253 ms | ❌ miss | by hand |",
                "| 5 | cold load | ≤ 3 s | 6.96 s | ❌ miss |  |", "<!-- hand:END summary -->"],
}


def _insert_after(lines: list[str], anchor: str, block: list[str], blank: bool = True) -> None:
    k = lines.index(anchor) + 1
    lines[k:k] = [*block, ""] if blank else block


def _existing() -> str:
    """A report of the first run with every hand block inserted where a person would put it."""
    lines = render(_sections("676 ms", with_gone=True), _meta()).split("\n")
    k = next(i for i, ln in enumerate(lines) if ln.startswith("Written by"))
    lines[k + 2:k + 2] = [*BLOCKS["top"], ""]
    _insert_after(lines, "| series p95 | 676 ms |  |", ["", *BLOCKS["after-table"], *BLOCKS["second"]], blank=False)
    _insert_after(lines, "## 5. Run page in the browser", ["", *BLOCKS["after-heading"]], blank=False)
    _insert_after(lines, "| warm | 3.43 s |", ["", *BLOCKS["section"]], blank=False)
    _insert_after(lines, "| 1 |", ["", *BLOCKS["gone"]], blank=False)
    s = lines.index("## Summary") + 2  # the generated summary table, replaced by the hand one
    e = lines.index("", s)
    lines[s:e] = BLOCKS["summary"]
    return "\n".join(lines)


def _at(text: list[str], block: list[str]) -> int:
    """Where ``block`` starts, contiguous and verbatim, in ``text``; -1 if it is not there."""
    for k in range(len(text) - len(block) + 1):
        if text[k:k + len(block)] == block:
            return k
    return -1


def _section_of(text: list[str], k: int) -> str:
    """The heading line a line index is under (hand headings included)."""
    return next(text[i] for i in range(k, -1, -1) if text[i].startswith("#"))


def test_hand_blocks_survive_regeneration_and_it_is_idempotent() -> None:
    existing = _existing()
    assert [b.id for b in find_hand_blocks(existing)] == ["top", "summary", "q-note", "q-note-2", "r-head", "s3",
                                                        "gone-note"]
    new = render(_sections("301 ms"), _meta(), previous=existing)
    out = new.split("\n")
    pos = {name: _at(out, block) for name, block in BLOCKS.items()}
    assert all(p >= 0 for p in pos.values()), {n: p for n, p in pos.items() if p < 0}
    # Each under the heading it was under, after what it followed.
    assert _section_of(out, pos["top"]) == "# Benchmarks" and pos["top"] < out.index("## Machine")
    assert _section_of(out, pos["summary"]) == "## Summary"
    assert _section_of(out, pos["after-table"]) == "## 4. Queries at scale"
    assert out.index("| series p95 | 301 ms |  |") < pos["after-table"] < out.index("**Fresh process**")
    end = pos["after-table"] + len(BLOCKS["after-table"])
    assert pos["second"] == end + 1 and out[end] == ""  # still right after the first (a blank line between)
    assert pos["after-heading"] == out.index("## 5. Run page in the browser") + 2
    assert out.index("| warm | 3.43 s |") < pos["section"] < out.index("## Findings and fixes (hand-written)")
    # The section the new run does not write: its notes at the end, under the old heading.
    assert "## 7. A benchmark since removed" in out and pos["gone"] > out.index("## Run log")
    assert _section_of(out, pos["gone"]) == "## 7. A benchmark since removed"
    # The hand summary stands in for the generated one: one summary table, the new number not in it.
    assert out.count("| # | what | budget | measured | verdict | note |") == 1
    assert "| 4 | series p95 | ≤ 100 ms | 301 ms | ❌ miss |  |" not in out
    # Generated text is the new run's; nothing of the old run's numbers left outside hand blocks.
    assert "| series p95 | 301 ms |  |" in out and "| series p95 | 676 ms |  |" not in out
    # Idempotent: rendering the same run over its own output changes nothing; nor does a third time.
    assert render(_sections("301 ms"), _meta(), previous=new) == new
    again = render(_sections("250 ms"), _meta(), previous=new)
    assert all(_at(again.split("\n"), block) >= 0 for block in BLOCKS.values())
    assert render(_sections("250 ms"), _meta(), previous=again) == again


def test_without_hand_blocks_the_report_is_the_generated_one() -> None:
    plain = render(_sections("676 ms"), _meta())
    assert render(_sections("676 ms"), _meta(), previous=plain) == plain
    assert carry_hand_blocks(plain, None) == plain


def test_broken_markers_keep_the_block_at_the_end_with_a_note() -> None:
    lines = render(_sections("676 ms"), _meta()).split("\n")
    unclosed = ["<!-- hand:BEGIN lost -->", "A note whose END marker was deleted."]
    stray = ["<!-- hand:END orphan -->"]
    _insert_after(lines, "## 5. Run page in the browser", ["", *unclosed, ""], blank=False)
    k = lines.index("## Run log")
    lines[k:k] = [*stray, ""]
    out = render(_sections("301 ms"), _meta(), previous="\n".join(lines)).split("\n")
    note = out.index("## Hand-written blocks with broken markers")
    assert _at(out, unclosed) > note and _at(out, stray) > note
    assert any("BEGIN lost at line" in ln and "has no END" in ln for ln in out)
    assert any("hand marker without its BEGIN" in ln for ln in out)
    assert "| series p95 | 301 ms |  |" in out  # the generated report is whole


def test_report_from_raw_keeps_hand_blocks_of_the_file_it_overwrites(tmp_path: Path) -> None:
    """The ``--report-from`` path over a checked-in raw file: hand blocks kept, a rerun identical."""
    raw = tmp_path / "raw.json"
    shutil.copyfile(REPO / "benchmarks" / "results" / "metrics-2026-12-02.json", raw)
    out = tmp_path / "BENCHMARKS.md"
    assert report_from_raw(raw, out) == 0
    lines = out.read_text().split("\n")
    heading = next(ln for ln in lines if ln.startswith("## 8."))
    _insert_after(lines, heading, ["", *BLOCKS["after-heading"]], blank=False)
    lines += ["", *BLOCKS["section"], ""]
    out.write_text("\n".join(lines))
    assert report_from_raw(raw, out) == 0
    first = out.read_text()
    text = first.split("\n")
    assert _at(text, BLOCKS["after-heading"]) == text.index(heading) + 2
    assert _at(text, BLOCKS["section"]) > text.index("## Run log")
    assert report_from_raw(raw, out) == 0
    assert out.read_text() == first
    assert json.loads(raw.read_text())["meta"]["benches"] == ["metrics"]  # the raw file is only read
