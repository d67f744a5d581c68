"""``python -m benchmarks [--quick] [--out BENCHMARKS.md]``: run every benchmark, write the report.

The benchmarks run one after another, each in a child process (see :mod:`benchmarks.bench_common`),
never two at once, so that one measurement cannot disturb another. A child that fails or runs
past its time limit is recorded as an error in the report; the others still run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import (
    bench_early_warning,
    bench_fleet,
    bench_ingest,
    bench_metrics,
    bench_overhead,
    bench_peers,
    bench_query,
    bench_render,
)
from benchmarks.bench_common import (
    MISS,
    NA,
    PASS,
    PROGRESS_PREFIX,
    REPO_ROOT,
    Job,
    Section,
    fmt_time,
    load_average,
    machine_info,
    versions,
)

BENCHES = ("overhead", "peers", "ingest", "query", "render", "early-warning", "metrics", "fleet")

#: What profiling found and what was changed because of it (kept with the code that measures it).
FINDINGS = [
    "Prometheus exporter (`healthwatch metrics`): a scrape renders the last snapshot; the store is read in a "
    "background thread. Its first version re-read every run whole at each refresh (0.75-1.5 s at 50 runs x 100 "
    "steps, growing with the run) and re-listed the store's directories for each of its 5 queries (~80 ms "
    "each at 50 runs); a refresh now lists once and reads, per run, only steps at or after the last one seen "
    "(reset when a new attempt starts), keeping earlier values of sparse scalars. Merged segments are sorted "
    "by (metric, layer, step), so the step floor prunes little inside them: a warm refresh still scans the "
    "step column of every row (1.3-1.8 s at 27M layer rows under load averages of 20-70 on 2 cores). A scrape "
    "rendered the 2,204 series with prometheus-client each time (p50 79 ms, p95 150 ms); the text is now "
    "rendered once per snapshot and a scrape sends the bytes.",
    "`Monitor.log` of ~270 tensors cost ~2 ms/step before this benchmark existed: one regex check of every "
    "name and four small torch ops per value, then a `torch.cat` of ~27,000 one-element tensors at each "
    "flush. Fixed in `hooks/monitor.py`: names are validated once and cached; a dict of 0-d tensors becomes "
    "one `torch.stack` + one cast (fallback to the old per-value path for mixed shapes or devices).",
    "`StatsCollector.after_backward` cast each parameter's grad norm to float64 separately (one small op per "
    "parameter, ~2 µs each on a host) and detached every grad. Fixed in `hooks/collector.py`: one "
    "`torch.stack` and one cast of all norms; no per-grad `detach()` inside `no_grad`. Same values.",
    "On a CPU trainer the Monitor's cost is per step and does not shrink with the batch: the grad norms read "
    "every gradient once (memory-bound: ~4 ms for 13M parameters here), the forward hooks run a few small ops "
    "per block, and the writer thread shares the trainer's cores. Its share of the step therefore falls as "
    "tokens per step grow; on a GPU the same work is a few kernels plus host work on otherwise idle cores "
    "(an estimate: nothing here ran on a GPU).",
    "A live store's writer now keeps its own 100/1,000/10,000-step rollups current (per attempt, exact across "
    "rollbacks), so the query benchmark runs on a store written through the writer path and never compacted; "
    "before, a live store had no rollups and a whole-run heatmap scanned every raw row until `healthwatch compact`.",
    "Alert evaluation: a rule that had never observed anything (its metric not logged, or its window never "
    "full) re-read a fixed 20,000-step horizon of every layer at each evaluation: 4.0 s per evaluation at 20k "
    "steps x 108 layers; it now reads only the new steps plus its own lookback (1.1 s). The snapshot of recent "
    "rows is now loaded with one query per run with constant bounds: with the bounds in a join condition, or "
    "one lower bound for all runs, an incremental evaluation scanned the parent run from the branch's steps "
    "on (8.7-13 s at 1M steps x 108 layers with a branch 400k steps behind).",
    "A first evaluation replays history at ~0.5M rows/s here (minutes at 1M steps x 108 layers); "
    "`Evaluator(start='latest')` / `alerts watch --start latest` start at the newest step instead, and the "
    "query benchmark uses it above 100k steps.",
    "Heatmap of a whole 1M-step run: it read the 100-step rollups (1.08M rows per metric) and then the last "
    "partial bucket raw, which decodes the tail row group of every layer (~13M rows): 662 ms. Compaction now "
    "also writes 1,000-step rollups, and each rollup level covers what the coarser ones left, down to raw "
    "rows only after the last complete 100-step bucket.",
    "`query.series` read the raw rows of its series (1M rows: 340-430 ms after compaction); a whole long "
    "series now reads the 100-step rollups for the steps they validly cover (exact min/max per bucket, placed "
    "at the bucket's first step) and raw rows after. Every `Store` caches Parquet footers (segments are "
    "immutable): a compacted 1M-step file has ~2,700 row groups whose metadata cost ~80 ms per query.",
    "Hook overhead on a CPU step of 0.47 s is ~2.4 %: forward hooks ~7 ms (RMS over every block's output), "
    "`_foreach_norm` over 13M gradients ~7 ms (memory-bound), writer thread ~4.6 ms of CPU on the same 2 "
    "cores. On a GPU the first two are a few kernels and the writer runs on idle host cores (an estimate: no "
    "GPU was lent to measure it).",
    "In-loop cost of `Monitor.log` with 272 separate 0-d tensors is dominated by one `torch.stack` (~200 µs "
    "here). Values are copied at log time on purpose: keeping references until the flush would record "
    "tensors the trainer mutates after logging. The mean also carries writer-thread contention on 2 cores.",
    "Run page: the `plotly_white` template cost ~1 s of server time per page and was removed; heatmaps send "
    "float32 values; collapsed charts are not built; the app lists the store once per page run instead of "
    "once per query. A cold load still pays Streamlit's own cold start (the trivial-page floor).",
]


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's waited-for children so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _command(argv: Sequence[str]) -> str:
    return " ".join(["python -m benchmarks", *argv])


class _Runner:
    """Runs child jobs one at a time, with progress bars, time limits and logs."""

    def __init__(self, workdir: Path, progress: Any, quiet: bool) -> None:
        self.workdir = workdir
        self.progress = progress
        self.quiet = quiet
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.timeline: list[dict[str, Any]] = []

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        home = self.workdir / "peer-home"
        env.update({
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(home),
            "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_CONFIG_DIR": str(home / "config"),
            "WANDB_DATA_DIR": str(home / "data"), "MLFLOW_ALLOW_FILE_STORE": "true",
            "TORCHDYNAMO_DISABLE": "1",
        })
        env.pop("HEALTHWATCH_STORE", None)
        return env

    def run(self, job: Job) -> dict[str, Any]:
        """Run one job in a child process; its JSON result, or ``{"error": ...}``."""
        jdir = self.workdir / "jobs" / job.key.replace(":", "-")
        jdir.mkdir(parents=True, exist_ok=True)
        result_path = jdir / "result.json"
        log_path = self.log_dir / f"{job.key.replace(':', '-')}.log"
        cmd = [sys.executable, "-m", job.module, "--task", job.task, "--params", json.dumps(job.params),
               "--result", str(result_path)]
        task = self.progress.add_task(job.desc, total=None) if self.progress else None
        load0 = load_average()
        cpu0 = _children_cpu_s()
        t0 = time.perf_counter()
        lines: queue.Queue[str | None] = queue.Queue()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=jdir, env=self._env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)

            def pump() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.put(line)
                lines.put(None)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            deadline = time.monotonic() + job.timeout_s
            timed_out = False
            while True:
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    if time.monotonic() > deadline and proc.poll() is None:
                        timed_out = True
                        self._kill(proc)
                    continue
                if line is None:
                    break
                if line.startswith(PROGRESS_PREFIX):
                    try:
                        msg = json.loads(line[len(PROGRESS_PREFIX):])
                    except ValueError:
                        continue
                    if self.progress is not None and task is not None:
                        self.progress.update(task, completed=msg["done"], total=msg["total"],
                                             description=f"{job.desc}: {msg.get('desc', '')}")
                else:
                    log.write(line)
            rc = proc.wait()
        wall = time.perf_counter() - t0
        # CPU seconds of the child and everything it waited for: on a shared machine the wall time
        # mostly says how busy the other tenants were.
        self.timeline.append({"job": job.key, "desc": job.desc, "wall_s": wall, "cpu_s": _children_cpu_s() - cpu0,
                              "load_start": load0,
                              "load_end": load_average(), "rc": rc})
        if self.progress is not None and task is not None:
            self.progress.update(task, completed=1, total=1, description=f"{job.desc} ({fmt_time(wall)})")
        if rc == 0 and result_path.exists():
            return json.loads(result_path.read_text())
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:]) if log_path.exists() else ""
        why = f"timed out after {job.timeout_s:.0f} s" if timed_out else f"child exited with {rc}"
        if not self.quiet:
            sys.stderr.write(f"benchmark {job.key} failed ({why}); log {log_path}:\n{tail}\n")
        last = tail.strip().splitlines()[-1] if tail.strip() else ""
        return {"error": f"{why}: {last}"[:500]}

    @staticmethod
    def _kill(proc: subprocess.Popen[str]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and any helper it started (own session)
        except (ProcessLookupError, PermissionError):
            proc.kill()


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=False)


def _md_escape(cell: str) -> str:
    return str(cell).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(_md_escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return out


#: A hand-written block of the report: ``<!-- hand:BEGIN id -->`` … ``<!-- hand:END id -->`` on
#: lines of their own (``<!-- hand:BEGIN id replaces -->``: the block stands in for the generated
#: paragraphs or tables that begin as its own do; see benchmarks/README.md).
_HAND_BEGIN = re.compile(r"^<!-- hand:BEGIN (?P<id>[A-Za-z0-9_.:/-]+)(?P<replaces> replaces)? -->[ \t]*$")
_HAND_END = re.compile(r"^<!-- hand:END (?P<id>[A-Za-z0-9_.:/-]+) -->[ \t]*$")
_HAND_ANY = re.compile(r"^<!-- hand:(BEGIN|END)\b")
_HEADING = re.compile(r"^#{1,6} ")


@dataclass
class HandBlock:
    """One hand-written block of an existing report, with where it was."""

    id: str
    lines: list[str]
    """The block verbatim, its marker lines included."""
    section: str | None
    """The heading line (outside hand blocks) it was under; None before the first heading."""
    anchor: str | None
    """The nearest non-blank line before it in its section that is not hand-written."""
    anchor_head: str | None = None
    """The first line of the anchor's paragraph or table (a table's header row keeps when its numbers change)."""
    replaces: bool = False
    problem: str = ""
    """Why its markers are broken (such a block is kept at the end of the report, with a note)."""

    @property
    def standalone(self) -> bool:
        """Whether the block is a section of its own (its first line of text is a heading)."""
        body = [ln for ln in self.lines[1:] if ln.strip()]
        return bool(body) and bool(_HEADING.match(body[0]))


def find_hand_blocks(text: str) -> list[HandBlock]:
    """The hand-written blocks of a report, in order; broken markers give blocks with a ``problem``."""
    lines = text.split("\n")
    blocks: list[HandBlock] = []
    section: str | None = None
    anchor: str | None = None
    head: str | None = None  # first line of the paragraph or table ``anchor`` is in
    prev_text = False  # whether the line before was generated text (not blank, not hand-written)
    fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            fence = not fence
        begin = None if fence else _HAND_BEGIN.match(line)
        if begin is None and not fence and _HAND_ANY.match(line):
            blocks.append(HandBlock("?", [line], section, anchor, head,
                                    problem=f"line {i + 1}: a hand marker without its BEGIN, or malformed: {line!r}"))
            i += 1
            continue
        if begin is not None:
            bid, j, problem = begin["id"], i + 1, ""
            while j < len(lines):
                end = _HAND_END.match(lines[j])
                if end is not None and end["id"] == bid:
                    break
                if _HAND_ANY.match(lines[j]):
                    problem = f"BEGIN {bid} at line {i + 1} has no END before the marker at line {j + 1}"
                    break
                j += 1
            else:
                problem = f"BEGIN {bid} at line {i + 1} has no END"
            stop = j if problem else j + 1
            blocks.append(HandBlock(bid, lines[i:stop], section, anchor, head, bool(begin["replaces"]), problem))
            i, prev_text = stop, False
            continue
        if not fence and _HEADING.match(line):
            section = anchor = head = line
        elif line.strip():
            anchor, head = line, head if prev_text else line
        prev_text = bool(line.strip())
        i += 1
    return blocks


def _chunk_end(lines: list[str], pos: int, stop: int) -> int:
    """Index just after the paragraph or table holding ``lines[pos]`` and the blank line after it."""
    while pos < stop and lines[pos].strip():
        pos += 1
    return min(pos + 1, stop)


def _chunks(lines: list[str], start: int, stop: int) -> list[int]:
    """Start indices of the paragraphs and tables in ``lines[start:stop]``."""
    return [k for k in range(start, stop) if lines[k].strip() and (k == start or not lines[k - 1].strip())]


def carry_hand_blocks(new: str, previous: str | None) -> str:
    """``new`` (a freshly rendered report) with every hand-written block of ``previous`` carried over.

    A block goes back under the heading it was under, after the paragraph or table it followed
    (found by its last line, else a line beginning as that one did, else the first line of that
    paragraph or table, e.g. a table's header; right after the heading when that text is gone); a block that is a section of its own goes at
    the end of the section it followed; a ``replaces`` block takes the place of the generated
    paragraphs or tables that begin as its own do (a line it extends counts). A block whose section
    no longer exists goes at the end under that section's old heading; a block with broken markers
    goes at the end with a note saying what is wrong. No block is ever dropped.
    """
    blocks = find_hand_blocks(previous) if previous else []
    if not blocks:
        return new
    lines = new.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    lines.append("")
    heads: dict[str, tuple[int, int]] = {}
    fence, at_heads = False, []
    for k, line in enumerate(lines):
        if line.startswith("```"):
            fence = not fence
        elif not fence and _HEADING.match(line):
            at_heads.append(k)
    for n, k in enumerate(at_heads):
        heads.setdefault(lines[k], (k, at_heads[n + 1] if n + 1 < len(at_heads) else len(lines)))
    inserts: dict[int, list[list[str]]] = {}
    removed: set[int] = set()
    orphans: dict[str, list[HandBlock]] = {}  # old heading ("" for a section of its own) -> blocks
    broken: list[HandBlock] = []
    for b in blocks:
        if b.problem:
            broken.append(b)
            continue
        if b.section is None:
            inserts.setdefault(0, []).append(b.lines)
            continue
        if b.section not in heads:
            orphans.setdefault("" if b.standalone else b.section, []).append(b)
            continue
        start, stop = heads[b.section]
        at = next((k for k in range(start, stop) if lines[k] == b.anchor), None) if b.anchor else None
        if at is None and b.anchor and len(b.anchor) >= 16:  # the same line with other numbers
            lead = b.anchor[:32]
            at = next((k for k in range(start, stop) if lines[k].startswith(lead)), None)
        if at is None and b.anchor_head:  # its paragraph or table changed: find where it begins
            at = next((k for k in range(start, stop) if lines[k] == b.anchor_head), None)
        pos: int | None = None
        if b.replaces:
            body = b.lines[1:-1]
            firsts = [ln for k, ln in enumerate(body) if ln.strip() and (k == 0 or not body[k - 1].strip())]
            for first in firsts:
                for c in _chunks(lines, start + 1, stop):
                    if at is not None and c < at:
                        continue  # the generated text it stands in for came after its anchor
                    g = lines[c]
                    if c not in removed and (g == first or (len(g) >= 20 and first.startswith(g))):
                        removed.update(range(c, _chunk_end(lines, c, stop)))
                        pos = c if pos is None else min(pos, c)
                        break
        if pos is None:
            pos = stop if b.standalone else _chunk_end(lines, at if at is not None else start, stop)
        inserts.setdefault(pos, []).append(b.lines)
    out: list[str] = []
    for k in range(len(lines) + 1):
        for blk in inserts.get(k, []):
            if out and out[-1].strip():
                out.append("")
            out += [*blk, ""]
        if k < len(lines) and k not in removed:
            out.append(lines[k])
    while out and not out[-1].strip():
        out.pop()
    out.append("")
    for heading, bs in orphans.items():
        if heading:
            out += [heading, "", "> Hand-written blocks kept from the previous report, which had this section; "
                    "the results this report was rendered from have none.", ""]
        for b in bs:
            out += [*b.lines, ""]
    if broken:
        out += ["## Hand-written blocks with broken markers", "",
                "> Kept verbatim from the previous report; fix their markers (benchmarks/README.md) so that the "
                "next regeneration puts them back in place.", ""]
        for b in broken:
            out += [f"> **{b.problem}** (it was under `{b.section or 'the top'}`)", "", *b.lines, ""]
    return "\n".join(out)


def render(sections: list[Section], meta: dict[str, Any], previous: str | None = None) -> str:
    """The Markdown report; ``previous`` (the report it overwrites) gives the hand-written blocks
    carried over into it (:func:`carry_hand_blocks`)."""
    m, v = meta["machine"], meta["versions"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{meta['command']}` at commit {m['commit']} (read at the start of the run) on "
        f"{meta['started']} (took {fmt_time(meta['wall_s'])}). "
        "Every number in the summary and the numbered sections is what that command measured and printed on "
        "the machine described; re-run it to refresh this file, do not edit it by hand. The *Findings* section at "
        "the end is hand-written (profiling notes kept in `benchmarks/__main__.py`), not measured by this run. "
        "Other hand-written notes sit between `<!-- hand:BEGIN id -->` and `<!-- hand:END id -->` lines (see the "
        "Markdown source); a regeneration keeps them (benchmarks/README.md). Budgets: DESIGN.md section 9.",
        "",
    ]
    end_commit = meta.get("commit_at_end")
    if end_commit and end_commit != m["commit"]:
        lines += [f"> The checkout changed during the run: commit {end_commit} at its end. Code measured by a "
                  "benchmark is the one its child process imported when it started.", ""]
    for r in meta.get("remeasured", []):
        lines += [f"> Re-measured after fixes: **{', '.join(r['benches'])}** by `{r['command']}` on {r['started']} "
                  f"(commit {r['commit']}; load average {r['load'][0] if r.get('load') else '?'} → "
                  f"{r['load'][1] if r.get('load') else '?'}); those sections show that run's numbers.", ""]
    if meta["quick"]:
        lines += ["> **Quick mode** (`--quick`): reduced sizes to keep the run under two minutes; these numbers "
                  "check that the benchmarks run, they are not the budget measurements.", ""]
    load = meta["load"]
    lines += ["## Machine", ""]
    lines += _md_table(["CPU", "cores (usable)", "RAM", "OS", "Python", "commit", "load average at start → end"], [[
        m["cpu"], f"{m['cores']} ({m['usable_cores']})", f"{m['ram_gib']:.1f} GiB", m["os"], m["python"], m["commit"],
        f"{load[0]} → {load[1]}",
    ]])
    lines += ["", "## Versions", ""]
    lines += _md_table(["package", "version"], [[k, val or "not installed"] for k, val in v.items()])
    lines += ["", "## Command", "", "```", meta["command"], "```", ""]
    lines += ["## Summary", ""]
    rows = []
    for sec in sections:
        for b in sec.budgets:
            mark = {PASS: "✅ pass", MISS: "❌ miss", NA: "—"}.get(b.verdict, b.verdict)
            rows.append([sec.title.split(".")[0], b.what, b.budget, b.measured, mark, b.note])
    lines += _md_table(["#", "what", "budget", "measured", "verdict", "note"], rows)
    lines.append("")
    for sec in sections:
        lines += [f"## {sec.title}", ""]
        if sec.intro:
            lines += [sec.intro, ""]
        for err in sec.errors:
            lines += [f"**Error:** {err}", ""]
        for t in sec.tables:
            lines += [f"**{t.title}**", ""]
            lines += _md_table(t.headers, t.rows)
            lines.append("")
            if t.note:
                lines += [t.note, ""]
        for n in sec.notes:
            lines += [f"- {n}"]
        if sec.notes:
            lines.append("")
    lines += ["## Findings and fixes (hand-written)", "",
              "> Written by hand from profiling sessions at earlier commits. Their figures were measured "
              "then, by hand, and are not produced or re-checked by the command above; the measured rows "
              "are the tables above.", ""]
    lines += [f"- {f}" for f in meta["findings"]]
    lines += ["", "## Run log", ""]
    lines += _md_table(["job", "wall", "load average (1 min) start → end", "exit"], [
        [t["desc"], fmt_time(t["wall_s"]),
         f"{t['load_start'][0]:.2f} → {t['load_end'][0]:.2f}" if t["load_start"] and t["load_end"] else "—",
         str(t["rc"])] for t in meta["timeline"]
    ])
    lines.append("")
    return carry_hand_blocks("\n".join(lines), previous)


def _read_previous(out: Path) -> str | None:
    """The report ``out`` will replace (its hand-written blocks are carried over), if any."""
    return out.read_text() if out.is_file() else None


def _print_console(sections: list[Section], console: Any) -> None:
    from rich.table import Table as RichTable

    summary = RichTable(title="healthwatch benchmarks: budgets")
    for h in ("#", "what", "budget", "measured", "verdict"):
        summary.add_column(h, overflow="fold")
    for sec in sections:
        for b in sec.budgets:
            style = {PASS: "green", MISS: "red"}.get(b.verdict, "")
            summary.add_row(sec.title.split(".")[0], b.what, b.budget, b.measured,
                            f"[{style}]{b.verdict}[/{style}]" if style else b.verdict)
    for sec in sections:
        for t in sec.tables:
            rt = RichTable(title=f"{sec.title}: {t.title}")
            for h in t.headers:
                rt.add_column(h, overflow="fold")
            for row in t.rows:
                rt.add_row(*[str(c) for c in row])
            console.print(rt)
        for err in sec.errors:
            console.print(f"[red]{sec.title}: {err}[/red]")
    console.print(summary)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m benchmarks``."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (≤ 2 minutes on 2 cores); checks, not budgets")
    ap.add_argument("--out", default="BENCHMARKS.md", help="report path (default: ./BENCHMARKS.md)")
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a new one under the temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (stores, logs, raw results)")
    ap.add_argument("--raw", default=None, help="also write every raw measurement as JSON to this path")
    ap.add_argument("--overhead-pairs", type=int, default=None, help="A/B step pairs (default 150; quick 8)")
    ap.add_argument("--overhead-batch", type=int, default=None,
                    help=f"sequences of {bench_overhead.SEQ} tokens per step (default {bench_overhead.BATCH}; quick 2)")
    ap.add_argument("--peer-steps", type=int, default=None, help="steps per logger (default 2000; quick 100)")
    ap.add_argument("--loggers", default=",".join(bench_peers.LOGGERS), help="loggers to compare")
    ap.add_argument("--query-steps", type=int, default=None,
                    help="steps of the synthetic store (default 1,000,000; quick 20,000)")
    ap.add_argument("--render-workdir", type=Path, default=None,
                    help="where the render benchmark builds (and later reuses) its synthetic store")
    ap.add_argument("--early-warning-data", type=Path, default=None,
                    help="where the early-warning benchmark keeps its recorded runs (reused: only missing runs train)")
    ap.add_argument("--param", action="append", default=[], metavar="BENCH.KEY=VALUE",
                    help="set one child-task parameter (VALUE is JSON, else text) in the jobs of BENCH (a benchmark "
                         "such as fleet, or one job such as fleet:s3query) that have KEY; repeatable")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--report-from", default=None, metavar="RAW.json",
                    help="only re-render the report from a --raw file of an earlier run (same numbers)")
    ap.add_argument("--merge-raw", action="append", default=[], metavar="RAW.json",
                    help="with --report-from: take these benchmarks' results from a later --only run's --raw file")
    return ap


def build_sections(names: Sequence[str], results: dict[str, dict[str, Any]], size_note: str = "") -> list[Section]:
    """The report sections of the benchmarks ``names``, from their results."""
    builders = {"overhead": bench_overhead.section, "peers": bench_peers.section, "ingest": bench_ingest.section,
                "query": lambda r: bench_query.section(r, size_note), "render": bench_render.section,
                "early-warning": bench_early_warning.section, "metrics": bench_metrics.section,
                "fleet": bench_fleet.section}
    return [builders[name](results) for name in names if name in builders]


def apply_params(plan: Sequence[tuple[str, Sequence[Job]]], settings: Sequence[str]) -> None:
    """Set ``BENCH.KEY=VALUE`` parameters (``--param``) in the planned jobs, in place.

    ``BENCH`` names a benchmark (every one of its jobs that has ``KEY``) or one job by its key
    (``fleet:s3query``). Only a parameter that a selected job already has can be set, so a typo is
    an error, not a silently ignored setting. ``VALUE`` is parsed as JSON (``3``, ``[500]``,
    ``true``), else kept as text. Raises ``ValueError`` naming the bad setting.
    """
    for setting in settings:
        target, eq, raw = setting.partition("=")
        bench, dot, key = target.rpartition(".")
        if not eq or not dot or not bench or not key:
            raise ValueError(f"--param {setting!r}: expected BENCH.KEY=VALUE, e.g. fleet.runs=2")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        jobs = [job for name, js in plan for job in js if bench in (name, job.key)]
        if not jobs:
            raise ValueError(f"--param {setting!r}: no selected benchmark or job {bench!r} "
                             f"(selected jobs: {', '.join(j.key for _n, js in plan for j in js) or 'none'})")
        having = [job for job in jobs if key in job.params]
        if not having:
            known = sorted({k for job in jobs for k in job.params})
            raise ValueError(f"--param {setting!r}: {bench!r} has no parameter {key!r} (it has: {', '.join(known)})")
        for job in having:
            job.params[key] = value


def _benches_in(results: dict[str, Any]) -> list[str]:
    return [b for b in BENCHES if any(k == b or k.startswith(b + ":") for k in results)]


def report_from_raw(raw: Path, out: Path, merge: Sequence[Path] = ()) -> int:
    """Re-render the report from a ``--raw`` file: the same measurements, current findings text.

    Each ``merge`` file (the ``--raw`` of a later ``--only …`` run) replaces the results of the
    benchmarks it ran; the report says which sections were re-measured, by which command, when.
    """
    data = json.loads(raw.read_text())
    meta, results = data["meta"], data["results"]
    names = meta.get("benches") or _benches_in(results)
    meta.setdefault("remeasured", [])
    for extra in merge:
        d2 = json.loads(Path(extra).read_text())
        redo = d2["meta"].get("benches") or _benches_in(d2["results"])
        names = [*names, *(b for b in redo if b not in names)]  # a benchmark the first run did not have
        results = {k: v for k, v in results.items() if k.split(":")[0] not in redo}
        results.update(d2["results"])
        meta["timeline"] = [t for t in meta["timeline"] if t["job"].split(":")[0] not in redo] + d2["meta"]["timeline"]
        if "size_note" in d2["meta"]:
            meta["size_note"] = d2["meta"]["size_note"]
        meta["remeasured"].append({"benches": redo, "command": d2["meta"]["command"], "started": d2["meta"]["started"],
                                   "commit": d2["meta"]["machine"].get("commit", "?"),
                                   "load": d2["meta"].get("load")})
    meta["findings"] = FINDINGS
    out.write_text(render(build_sections(names, results, meta.get("size_note", "")), meta, _read_previous(out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and write the report; returns the exit status (0 unless a job erred)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.report_from:
        return report_from_raw(Path(args.report_from), Path(args.out).resolve(), [Path(p) for p in args.merge_raw])
    from rich.console import Console

    console = Console(stderr=True)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        console.print(f"[red]unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHES)}[/red]")
        return 2
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="healthwatch-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve()
    started = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.perf_counter()
    load_start = load_average()
    machine = machine_info()  # the commit is read now, before anything runs: the code measured

    size_note = ""
    plan: list[tuple[str, list[Job]]] = []
    if "overhead" in only:
        plan.append(("overhead", bench_overhead.jobs(args.quick, workdir, args.overhead_pairs, args.overhead_batch)))
    if "peers" in only:
        loggers = [x.strip() for x in args.loggers.split(",") if x.strip()]
        plan.append(("peers", bench_peers.jobs(args.quick, workdir, args.peer_steps, loggers)))
    if "ingest" in only:
        plan.append(("ingest", bench_ingest.jobs(args.quick, workdir)))
    if "query" in only:
        wanted = args.query_steps or (20_000 if args.quick else 1_000_000)
        steps, size_note = bench_query.fit_steps(wanted, workdir)
        plan.append(("query", bench_query.jobs(args.quick, workdir, steps)))
    if "render" in only:
        plan.append(("render", bench_render.jobs(args.quick, workdir, args.render_workdir)))
    if "early-warning" in only:
        plan.append(("early-warning", bench_early_warning.jobs(args.quick, workdir, args.early_warning_data)))
    if "metrics" in only:
        plan.append(("metrics", bench_metrics.jobs(args.quick, workdir)))
    if "fleet" in only:
        plan.append(("fleet", bench_fleet.jobs(args.quick, workdir)))

    try:
        apply_params(plan, args.param)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return 2
    results: dict[str, dict[str, Any]] = {}
    progress = _progress(not args.no_progress)
    runner = _Runner(workdir, progress, quiet=False)
    try:
        if progress is not None:
            progress.start()
        for _name, jobs in plan:
            for job in jobs:
                results[job.key] = runner.run(job)
    finally:
        if progress is not None:
            progress.stop()

    sections = build_sections([name for name, _jobs in plan], results, size_note)
    meta = {
        "command": _command(argv), "started": started, "wall_s": time.perf_counter() - t_start,
        "quick": args.quick, "machine": machine, "commit_at_end": machine_info()["commit"], "versions": versions(),
        "load": [_fmt_load(load_start), _fmt_load(load_average())], "timeline": runner.timeline,
        "findings": FINDINGS, "size_note": size_note, "benches": [name for name, _jobs in plan],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = _read_previous(out)
    out.write_text(render(sections, meta, previous))
    stale = [b.id for b in find_hand_blocks(previous or "") if b.replaces]
    if stale:  # measured afresh, yet hand-written text still stands in for some generated text
        console.print(f"[yellow]hand blocks that replace generated text were kept: {', '.join(stale)}; check them "
                      f"against this run's numbers and remove what they no longer should hide[/yellow]")
    if args.raw:
        Path(args.raw).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    _print_console(sections, Console())
    console.print(f"wrote {out}")
    if own_workdir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    elif args.keep:
        console.print(f"scratch kept in {workdir}")
    return 1 if any("error" in r for r in results.values()) else 0


def _fmt_load(load: tuple[float, float, float] | None) -> str:
    return "—" if load is None else " / ".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    raise SystemExit(main())
