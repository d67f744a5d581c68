"""Run-page render time: the real app server, a real headless Chromium, a large live store.

Builds (or reuses) a synthetic store with :mod:`benchmarks.synth_store` (default 1M steps × 108
layers × 3 layer metrics, written through the writer path with its live rollups and never compacted
by hand; ``HEALTHWATCH_BENCH_LAYOUT=direct`` builds the same layout fast), starts ``healthwatch app`` on it, opens the
Run page in headless Chromium and measures the time from navigation until every plotly chart of
the page is drawn and Streamlit's "Running" status is gone (a JS condition polled every 25 ms).

* **cold** (budget ≤ 3 s): a running server — started, and warmed by one complete visit to its Runs
  page (imports, the store handle; the visit ends when that page's charts are drawn and its script run
  is over, so none of its work is counted in the next load) — and a new session (a new page load, a new Streamlit websocket
  session) opening the Run page, whose data caches are cold (nothing of it was read yet); the
  browser has the app's static files cached, as a user's new tab would; the OS page cache is warm.
* **warm** (budget ≤ 1.5 s): the same server, a new session each time (the query results come
  from the server's caches).

The expected number of charts comes from running the same page once with Streamlit's AppTest on
the same store, so the condition is exact (no "wait a bit and hope").

Usage::

    python -m benchmarks.bench_render                 # 1M steps x 108 layers (minutes to build)
    python -m benchmarks.bench_render --quick         # 100k steps x 108 layers
    python -m benchmarks.bench_render --steps 20000 --layers 24 --workdir /tmp/hw-render
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.apphost import free_port, headless_chromium, healthy, start_app, stop, wait_for

REPO_ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 3.0  # first load, new browser session on a running server, cold data caches
WARM_BUDGET_S = 1.5  # the same with warm data caches
RUN = "synth"

#: Charts counted as drawn: plotly has laid out the figure (``_fullData``) and drawn its SVG.
DRAWN_JS = ("return Array.from(document.querySelectorAll('.js-plotly-plot'))"
            ".filter(p => p._fullData && p._fullData.length && p.querySelector('.main-svg')).length")
#: Streamlit's status widget ("Running…") is present while a script run is in flight.
RUNNING_JS = "return !!document.querySelector('[data-testid=\"stStatusWidget\"]')"
EXCEPTION_JS = "return document.querySelectorAll('[data-testid=\"stException\"]').length"
TITLE_JS = "return Array.from(document.querySelectorAll('h1')).map(h => h.innerText.trim())"


# --------------------------------------------------------------------------------------------
# store, server, browser


def build_store(root: Path, steps: int, layers: int) -> dict[str, Any]:
    """Write the synthetic store at ``root`` unless a store of the same size is already there.

    Returns ``{"layer_rows", "scalar_rows", "bytes", "build_s", "reused"}``.
    """
    from benchmarks.synth_store import generate

    # HEALTHWATCH_BENCH_LAYOUT=direct: the writer's self-merged layout built without running the
    # flushes (benchmarks/live_layout.py); the writer path takes hours at 1M steps on 2 shared cores.
    layout = os.environ.get("HEALTHWATCH_BENCH_LAYOUT", "writer")
    meta_file = root / "bench-render.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("steps") == steps and meta.get("layers") == layers and meta.get("layout", "writer") == layout:
            meta["reused"] = True
            meta["bytes"] = store_bytes(root)
            return meta
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    if layout == "direct":
        from benchmarks.live_layout import generate_synth

        res = generate_synth(root, steps, layers)
    else:
        res = generate(root, run=RUN, steps=steps, layers=layers)
    meta = {"steps": steps, "layers": layers, "layout": layout, "layer_rows": int(res["layer_rows"]),
            "scalar_rows": int(res["scalar_rows"]), "write_s": res["write_s"], "compact_s": res["compact_s"],
            "build_s": time.perf_counter() - t0}
    meta_file.write_text(json.dumps(meta))
    meta["reused"] = False
    meta["bytes"] = store_bytes(root)
    return meta


def store_bytes(root: Path) -> int:
    """Bytes of all Parquet files under ``root`` (raw segments and rollups)."""
    return sum(p.stat().st_size for p in root.rglob("*.parquet"))


def page_ready(driver: Any, title: str, charts: int) -> bool:
    """The page's title is shown, ``charts`` plotly charts are drawn and no script run is in flight."""
    return (title in driver.execute_script(TITLE_JS) and driver.execute_script(DRAWN_JS) >= charts
            and not driver.execute_script(RUNNING_JS))


#: :func:`page_ready`'s condition checked inside the page every ``arguments[2]`` ms until it holds (or a
#: Streamlit exception shows); calls back ``{exc, drawn}``. One WebDriver call per load: polling from
#: Python (three ``execute_script`` round trips every 25 ms) cost Chromium and chromedriver ~0.3 CPU-s
#: per second of waiting, counted in the browser's CPU and taken from the 2 cores the page shares.
READY_ASYNC_JS = """
const [title, charts, every] = arguments, done = arguments[arguments.length - 1];
function check() {
  const exc = document.querySelectorAll('[data-testid="stException"]').length;
  const titled = Array.from(document.querySelectorAll('h1')).some(h => h.innerText.trim() === title);
  const drawn = Array.from(document.querySelectorAll('.js-plotly-plot'))
    .filter(p => p._fullData && p._fullData.length && p.querySelector('.main-svg')).length;
  const running = !!document.querySelector('[data-testid="stStatusWidget"]');
  if (exc || (titled && drawn >= charts && !running)) done({exc: exc, drawn: drawn});
  else setTimeout(check, every);
}
check();
"""


def load(driver: Any, url: str, title: str, charts: int, timeout: float = 300.0) -> float:
    """Navigate to ``url``; seconds until :func:`page_ready` holds (checked in the page every 25 ms).
    Raises on a Streamlit exception, and on ``timeout``."""
    from selenium.common.exceptions import TimeoutException

    driver.set_script_timeout(timeout)
    t0 = time.perf_counter()
    driver.get(url)
    try:
        got = driver.execute_async_script(READY_ASYNC_JS, title, charts, 25)
    except TimeoutException:
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {charts} drawn charts on {url}") from None
    elapsed = time.perf_counter() - t0
    if got["exc"]:
        raise RuntimeError(f"exception on {url}: " + driver.find_element("tag name", "body").text[:2000])
    return elapsed


class ProcessTreeCpu:
    """CPU seconds (user + system) of a process tree: the app server's, or the browser's.

    Wall time on a shared machine says as much about the other tenants as about the page; the CPU
    the server and Chromium spend on a load does not (hyperthreads and caches aside). Readings come
    from :func:`benchmarks.bench_common.descendant_cpu_seconds`; processes are followed by pid, and
    one that exits between two readings keeps the CPU it had at the last one (Chromium replaces
    renderer processes on navigation), so the total never goes backwards.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._seen: dict[int, float] = {}

    def total(self) -> float:
        """CPU seconds used so far by the process and every descendant seen at any reading."""
        from benchmarks.bench_common import descendant_cpu_seconds

        for pid, cpu in descendant_cpu_seconds(self.pid, include_root=True).items():
            self._seen[pid] = max(self._seen.get(pid, 0.0), cpu)
        return sum(self._seen.values())


def metered_load(driver: Any, url: str, title: str, charts: int, meters: dict[str, ProcessTreeCpu]) -> dict[str, float]:
    """:func:`load` plus the CPU seconds each meter's process tree spent on it (``wall_s`` and one key per meter)."""
    before = {k: m.total() for k, m in meters.items()}
    out = {"wall_s": load(driver, url, title, charts)}
    out.update({f"{k}_cpu_s": m.total() - before[k] for k, m in meters.items()})
    return out


def browser_meter(driver: Any) -> ProcessTreeCpu:
    """A meter of the Chromium processes behind a selenium ``driver`` (chromedriver's process tree)."""
    return ProcessTreeCpu(driver.service.process.pid)


def expected_charts(store: str | Path, page: str = "run", run: str = RUN) -> int:
    """How many plotly charts ``page`` draws for ``run``: the page itself, run once with AppTest."""
    from streamlit.testing.v1 import AppTest

    old = os.environ.get("HEALTHWATCH_STORE")
    os.environ["HEALTHWATCH_STORE"] = str(store)
    try:
        at = AppTest.from_file(str(REPO_ROOT / "app" / "views" / f"{page}.py"), default_timeout=600)
        at.query_params["run"] = run
        at.run()
        if at.exception:
            raise RuntimeError(f"the {page} page raised: {[e.value for e in at.exception]}")
        return len(at.get("plotly_chart"))
    finally:
        if old is None:
            os.environ.pop("HEALTHWATCH_STORE", None)
        else:
            os.environ["HEALTHWATCH_STORE"] = old


def built_in(driver: Any) -> float | None:
    """The server-side build time the Run page prints in its caption (``built in X s``)."""
    text = driver.find_element("tag name", "body").text
    i = text.find("built in ")
    if i < 0:
        return None
    try:
        return float(text[i + 9:].split()[0])
    except (ValueError, IndexError):
        return None


#: The framework floor: a page with a title and one tiny plotly chart, served the same way.
FLOOR_APP = """
import plotly.graph_objects as go
import streamlit as st
st.title("Run")
st.plotly_chart(go.Figure(go.Scatter(x=[0, 1], y=[0, 1])), key="floor")
"""


@contextmanager
def floor_server(workdir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A trivial Streamlit app (title + one 2-point chart) with the app's server flags."""
    from healthwatch.app.launch import streamlit_command

    app = workdir / "floor_app.py"
    app.write_text(FLOOR_APP)
    port = free_port()
    cmd = streamlit_command(workdir, port)
    cmd[cmd.index("run") + 1] = str(app)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: healthy(port, proc), 120, "the floor app's health endpoint")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc)


def floor(workdir: Path, warm_loads: int = 3) -> tuple[float, float, dict[str, float]]:
    """Cold and warm p50 seconds of the trivial page (what Streamlit + Chromium cost on this machine),
    and the p50 CPU seconds of a warm load in the browser and in the server."""
    with floor_server(workdir) as (url, proc), headless_chromium() as driver:
        meters = {"browser": browser_meter(driver), "server": ProcessTreeCpu(proc.pid)}
        cold = load(driver, url + "/", "Run", 1)
        warm = [metered_load(driver, url + "/", "Run", 1, meters) for _ in range(warm_loads)]
    cpu = {k: statistics.median(w[k] for w in warm) for k in ("browser_cpu_s", "server_cpu_s")}
    return cold, statistics.median(w["wall_s"] for w in warm), cpu


# --------------------------------------------------------------------------------------------
# the benchmark


def run(quick: bool, workdir: Path, steps: int | None = None, layers: int = 108, cold_loads: int | None = None,
        warm_loads: int | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the Run page's load time; returns seconds (cold/warm p50, every sample) and store facts.

    ``quick`` builds 100k steps (else 1M) unless ``steps`` says otherwise; the store lives in
    ``workdir/render-store-<steps>x<layers>`` and is reused by later calls.
    """
    say = progress or (lambda _msg: None)
    steps = steps or (100_000 if quick else 1_000_000)
    cold_n = cold_loads or (2 if quick else 3)
    warm_n = warm_loads or (3 if quick else 5)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / f"render-store-{steps}x{layers}"
    say(f"building the store ({steps:,} steps x {layers} layers)")
    facts = build_store(store, steps, layers)
    say("counting the Run page's charts (AppTest)")
    t0 = time.perf_counter()
    charts = expected_charts(store)
    apptest_s = time.perf_counter() - t0
    runs_charts = expected_charts(store, page="runs")
    url_path = f"/run?run={RUN}"
    cold: list[float] = []
    warm: list[float] = []
    server_build: list[float | None] = []
    log = workdir / "render-server.log"
    load_before = os.getloadavg()[0]
    say("framework floor (a trivial Streamlit page)")
    floor_cold, floor_warm, floor_cpu = floor(workdir, warm_loads=1 if quick else 3)
    first_visit: list[float] = []
    cold_cpu: list[dict[str, float]] = []
    warm_cpu: list[dict[str, float]] = []
    for i in range(cold_n):
        say(f"cold load {i + 1}/{cold_n}")
        proc, url = start_app(store, log=log)
        try:
            with headless_chromium() as driver:
                meters = {"browser": browser_meter(driver), "server": ProcessTreeCpu(proc.pid)}
                # A running server: started, and one visit to the Runs page has imported the app and opened
                # the store. The Run page's own data caches are still cold (nothing of it was read). Each
                # navigation below opens a new Streamlit session (a new websocket) in a browser that has
                # the app's static files cached, as a user opening the page in a new tab.
                first_visit.append(load(driver, url + "/", "Runs", runs_charts))
                got = metered_load(driver, url + url_path, "Run", charts, meters)
                cold.append(got["wall_s"])
                cold_cpu.append(got)
                server_build.append(built_in(driver))
                if i == cold_n - 1:
                    for j in range(warm_n):
                        say(f"warm load {j + 1}/{warm_n}")
                        got = metered_load(driver, url + url_path, "Run", charts, meters)  # new session, warm caches
                        warm.append(got["wall_s"])
                        warm_cpu.append(got)
        finally:
            stop(proc)
    return {
        "steps": steps, "layers": layers, "layer_rows": facts["layer_rows"], "scalar_rows": facts["scalar_rows"],
        "rows": facts["layer_rows"] + facts["scalar_rows"], "store_bytes": facts["bytes"],
        "layout_note": ("" if facts.get("layout", "writer") == "writer" else
                        ", in the layout its writer path leaves (built by benchmarks/live_layout.py), never compacted"),
        "store_build_s": None if facts["reused"] else facts["build_s"], "store_reused": facts["reused"],
        "charts": charts, "apptest_first_run_s": apptest_s,
        "cold_s": cold, "warm_s": warm, "cold_p50_s": statistics.median(cold), "warm_p50_s": statistics.median(warm),
        "server_build_cold_s": server_build, "budget_s": BUDGET_S, "warm_budget_s": WARM_BUDGET_S,
        "first_visit_s": first_visit, "cold_definition": "running server (one Runs-page visit), new session (page load) in the same browser",
        "floor_cold_s": floor_cold, "floor_warm_p50_s": floor_warm,
        # CPU seconds per load (load-independent, unlike the wall clock): the browser's and the server's.
        "cold_browser_cpu_s": [c["browser_cpu_s"] for c in cold_cpu], "cold_server_cpu_s": [c["server_cpu_s"] for c in cold_cpu],
        "warm_browser_cpu_s": [c["browser_cpu_s"] for c in warm_cpu], "warm_server_cpu_s": [c["server_cpu_s"] for c in warm_cpu],
        "floor_warm_browser_cpu_s": floor_cpu["browser_cpu_s"], "floor_warm_server_cpu_s": floor_cpu["server_cpu_s"],
        "load_average": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count(),
        "within_budget": statistics.median(cold) <= BUDGET_S and statistics.median(warm) <= WARM_BUDGET_S,
    }


# --------------------------------------------------------------------------------------------
# side by side: two source trees of the app on the same store, loads alternating


def source_tree(rev: str, workdir: Path) -> Path:
    """``git archive <rev>`` of this checkout unpacked at ``workdir/tree-<rev>``, importable with
    ``PYTHONPATH=<it>`` (its ``healthwatch/app`` links to ``app/``, as the installed package maps it).

    On ``PYTHONPATH`` it shadows the editable install (setuptools' finder comes after the path
    finder), so a server, AppTest or benchmark started with it runs that commit's code only.
    """
    sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", rev], capture_output=True,
                         text=True, check=True).stdout.strip()
    tree = Path(workdir) / f"tree-{sha}"
    if not (tree / "healthwatch" / "app").exists():
        if tree.exists():
            shutil.rmtree(tree)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", sha], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        (tree / "healthwatch" / "app").symlink_to("../app")
    return tree


def tree_env(tree: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that runs ``tree``'s code (None: this checkout's), plus ``extra``."""
    env = dict(os.environ, **(extra or {}))
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def count_charts(store: str | Path, tree: Path | None, env: dict[str, str] | None = None, page: str = "run") -> int:
    """:func:`expected_charts` of ``tree``'s ``page`` (None: this checkout's), in a child process."""
    code = ("import sys; from benchmarks.bench_render import expected_charts; "
            "print(expected_charts(sys.argv[1], page=sys.argv[2]))")
    out = subprocess.run([sys.executable, "-c", code, str(store), page], cwd=str(tree or REPO_ROOT),
                         env=tree_env(tree, env), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"counting the Run page's charts of {tree or REPO_ROOT} failed:\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def side_by_side(store: str | Path, trees: dict[str, Path | None], rounds: int = 2, warm_loads: int = 2,
                 env_for: Callable[[str, int], dict[str, str]] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run-page loads of several source trees of the app on one store, alternating (ABBA...).

    Each round starts, per tree in turn, a fresh server (``env_for(label, round)`` adds its
    environment, e.g. a fresh S3 segment cache), visits its Runs page, then measures one cold and
    ``warm_loads`` warm loads of the Run page as :func:`run` does (wall and CPU per load).
    """
    say = progress or (lambda _msg: None)
    labels = list(trees)
    charts = {k: count_charts(store, trees[k], env_for(k, -1) if env_for else None) for k in labels}
    runs_charts = {k: count_charts(store, trees[k], env_for(k, -1) if env_for else None, "runs") for k in labels}
    say(f"charts per first load: {charts}; on the Runs page: {runs_charts}")
    out: dict[str, Any] = {"store": str(store), "charts": charts, "load_average": [os.getloadavg()[0]],
                           "cpus": os.cpu_count(),
                           "sides": {k: {"tree": str(trees[k] or REPO_ROOT), "cold": [], "warm": [], "build_s": []}
                                     for k in labels}}
    for i in range(rounds):
        for k in (labels if i % 2 == 0 else labels[::-1]):
            say(f"round {i + 1}/{rounds}: {k}")
            proc, url = start_app(store, env=tree_env(trees[k], env_for(k, i) if env_for else None),
                                  cwd=trees[k] or REPO_ROOT)
            side = out["sides"][k]
            try:
                with headless_chromium() as driver:
                    meters = {"browser": browser_meter(driver), "server": ProcessTreeCpu(proc.pid)}
                    load(driver, url + "/", "Runs", runs_charts[k], timeout=900)
                    side["cold"].append(metered_load(driver, f"{url}/run?run={RUN}", "Run", charts[k], meters))
                    side["build_s"].append(built_in(driver))
                    for _ in range(warm_loads):
                        side["warm"].append(metered_load(driver, f"{url}/run?run={RUN}", "Run", charts[k], meters))
            finally:
                stop(proc)
    out["load_average"].append(os.getloadavg()[0])
    for side in out["sides"].values():
        for kind in ("cold", "warm"):
            for key in ("wall_s", "browser_cpu_s", "server_cpu_s"):
                side[f"{kind}_{key}_p50"] = statistics.median(x[key] for x in side[kind]) if side[kind] else None
    return out


def print_side_by_side(res: dict[str, Any]) -> None:
    """One line per tree and kind: wall p50 and CPU p50 of browser and server, samples."""
    print(f"store {res['store']}; load average {res['load_average'][0]:.1f} -> {res['load_average'][-1]:.1f} "
          f"on {res['cpus']} CPUs")
    for k, side in res["sides"].items():
        for kind in ("cold", "warm"):
            if not side[kind]:
                continue
            walls = ", ".join(f"{x['wall_s']:.2f}" for x in side[kind])
            print(f"{k:>8} {kind}: {res['charts'][k]} charts, wall p50 {side[f'{kind}_wall_s_p50']:.2f} s "
                  f"({walls}); CPU p50 browser "
                  f"{side[f'{kind}_browser_cpu_s_p50']:.2f} s, server {side[f'{kind}_server_cpu_s_p50']:.2f} s")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: print the numbers (and JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100k steps instead of 1M")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--layers", type=int, default=108)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hw-bench-render")
    ap.add_argument("--cold", type=int, default=None, help="cold loads (each on a fresh server)")
    ap.add_argument("--warm", type=int, default=None, help="warm loads")
    ap.add_argument("--json", action="store_true", help="also print the result as JSON")
    ap.add_argument("--ab-before", metavar="REV", default=None,
                    help="side by side: this commit's app against --ab-after's on the same store, loads alternating")
    ap.add_argument("--ab-after", metavar="REV", default=None, help="with --ab-before (default: this checkout)")
    ap.add_argument("--rounds", type=int, default=2, help="with --ab-before: rounds (one cold load per tree each)")
    ap.add_argument("--store", default=None, help="with --ab-before: an existing store (path or s3:// URI), reused")
    args = ap.parse_args(argv)
    if args.ab_before:
        steps = args.steps or (100_000 if args.quick else 1_000_000)
        store = args.store or str(args.workdir / f"render-store-{steps}x{args.layers}")
        if not args.store:
            build_store(Path(store), steps, args.layers)
        trees = {"before": source_tree(args.ab_before, args.workdir),
                 "after": source_tree(args.ab_after, args.workdir) if args.ab_after else None}
        res = side_by_side(store, trees, rounds=args.rounds, warm_loads=args.warm or 2,
                           progress=lambda m: print(f"... {m}", file=sys.stderr, flush=True))
        print_side_by_side(res)
        if args.json:
            print(json.dumps(res))
        return 0
    res = run(args.quick, args.workdir, steps=args.steps, layers=args.layers, cold_loads=args.cold,
              warm_loads=args.warm, progress=lambda m: print(f"... {m}", file=sys.stderr, flush=True))
    print(f"store: {res['steps']:,} steps x {res['layers']} layers = {res['layer_rows']:,} layer rows + "
          f"{res['scalar_rows']:,} scalar rows, {res['store_bytes'] / 2**20:,.0f} MiB of Parquet"
          + (f" (built in {res['store_build_s']:.0f} s)" if res["store_build_s"] else " (reused)"))
    print(f"Run page, {res['charts']} charts: cold p50 {res['cold_p50_s']:.2f} s "
          f"({', '.join(f'{v:.2f}' for v in res['cold_s'])}), warm p50 {res['warm_p50_s']:.2f} s "
          f"({', '.join(f'{v:.2f}' for v in res['warm_s'])}); budget {res['budget_s']:.0f} s: "
          f"{'PASS' if res['within_budget'] else 'MISS'}")
    print(f"server-side build of the charts fragment on the cold loads: {res['server_build_cold_s']}")
    print(f"framework floor (trivial Streamlit page, 1 chart): cold {res['floor_cold_s']:.2f} s, warm p50 "
          f"{res['floor_warm_p50_s']:.2f} s; load average {res['load_average'][0]:.1f} -> "
          f"{res['load_average'][1]:.1f} on {res['cpus']} CPUs")
    if args.json:
        print(json.dumps(res))
    return 0


# --------------------------------------------------------------------------------------------
# `python -m benchmarks` integration: one child job and a report section


def run_task(params: dict[str, Any]) -> dict[str, Any]:
    """Child task for the benchmark runner (``--task render``)."""
    from benchmarks.bench_common import emit_progress

    stages = iter(range(1, 100))
    return run(bool(params["quick"]), Path(params["workdir"]), steps=params.get("steps"),
               layers=int(params.get("layers", 108)), cold_loads=params.get("cold"), warm_loads=params.get("warm"),
               progress=lambda msg: emit_progress(next(stages), 12, msg))


TASKS = {"render": run_task}


def jobs(quick: bool, workdir: Path, store_dir: Path | None = None) -> list[Any]:
    """The render job: 1M steps x 108 layers (quick: 10k x 108, one cold and two warm loads)."""
    from benchmarks.bench_common import Job

    params: dict[str, Any] = {"quick": quick, "workdir": str(store_dir or (workdir / "render"))}
    if quick:
        params.update(steps=10_000, cold=1, warm=2)
    return [Job("render", "benchmarks.bench_render", "render", params,
                "Run page render (real server + headless Chromium)", timeout_s=600 if quick else 3600)]


def section(results: dict[str, dict[str, Any]]) -> Any:
    """Budget row and table of the render measurement."""
    from benchmarks.bench_common import NA, Budget, Section, Table, fmt_bytes, fmt_count, fmt_time, verdict

    sec = Section("render", "5. Run page in the browser")
    r = results.get("render")
    if r is None or "error" in r:
        sec.errors.append((r or {}).get("error", "did not run"))
        sec.budgets.append(Budget("Run page render", "≤ 3 s", "error", NA))
        return sec
    sec.intro = (
        f"Synthetic store of {r['steps']:,} steps × {r['layers']} layers: {fmt_count(r['rows'])} rows, "
        f"{fmt_bytes(r['store_bytes'])} of Parquet{r.get('layout_note', '')}. `healthwatch app` on it; headless "
        f"Chromium opens the Run page and the clock stops when all {r['charts']} plotly charts are drawn and "
        "Streamlit's status widget is gone (a JS condition polled every 25 ms). Cold = a new browser session on "
        "a running server (started, and its Runs page visited once until drawn) whose Run-page data caches are cold; "
        "warm = a new browser session on the same server (data caches warm)."
    )
    def cpu(kind: str) -> str:
        # Older result files have no CPU columns.
        b, v = r.get(f"{kind}_browser_cpu_s"), r.get(f"{kind}_server_cpu_s")
        if b is None or v is None:
            return "-"
        b, v = (statistics.median(x) if isinstance(x, list) else x for x in (b, v))
        return f"{b:.2f} s / {v:.2f} s"

    sec.tables.append(Table("Run page load", ["", "p50", "samples", "CPU per load: browser / server (p50)"], [
        ["cold (running server, new browser session, cold data caches)", fmt_time(r["cold_p50_s"]),
         ", ".join(fmt_time(x) for x in r["cold_s"]), cpu("cold")],
        ["warm (new browser session, warm data caches)", fmt_time(r["warm_p50_s"]),
         ", ".join(fmt_time(x) for x in r["warm_s"]), cpu("warm")],
        ["first visit of the fresh server (Runs page, not budgeted)",
         fmt_time(statistics.median(r["first_visit_s"])) if r.get("first_visit_s") else "-",
         ", ".join(fmt_time(x) for x in r.get("first_visit_s", [])), "-"],
        ["floor: trivial Streamlit page, cold / warm", f"{fmt_time(r['floor_cold_s'])} / "
         f"{fmt_time(r['floor_warm_p50_s'])}", "what Streamlit + Chromium cost here with one 2-point chart",
         cpu("floor_warm")],
    ], f"load average {r['load_average'][0]:.1f} → {r['load_average'][1]:.1f} on {r['cpus']} CPUs. CPU = user + "
       "system seconds of Chromium's processes and of the app server during the load: unlike the wall clock, "
       "not inflated by other tenants; on 2 cores a load cannot take less than about (browser + server) / 2."))
    for kind, budget in (("cold", BUDGET_S), ("warm", WARM_BUDGET_S)):
        v = r[f"{kind}_p50_s"]
        sec.budgets.append(Budget(f"Run page first load, {kind} data caches, {r['steps']:,} steps × {r['layers']} "
                                  "layers", f"≤ {budget:g} s", fmt_time(v), verdict(v <= budget),
                                  "new session (page load) on a running server"))
    return sec


if __name__ == "__main__":
    if "--task" in sys.argv:
        from benchmarks.bench_common import child_main

        raise SystemExit(child_main(TASKS))
    raise SystemExit(main())
