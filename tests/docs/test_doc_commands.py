"""Every ``healthwatch …`` command that README.md and docs/*.md show is run here.

The commands are read from the docs when the tests are collected (``doc_commands.py``), so a
command added to the docs is tested without editing this file. Each runs as a real process
(``python -m healthwatch.cli …``) against its own copy of a small real store (the app tests'
store: a diverging run ``main`` with a rollback, its BF16 branch ``main-bf16``, alerts), in a
scratch directory that holds the files the docs refer to (``alerts/packs/…``, ``typo.yaml``,
``wrong_test.yaml``, a TensorBoard log directory). Notification URLs are replaced by a receiver on
127.0.0.1. Servers and daemons (``app``, ``metrics``, ``alerts watch``, ``--follow``) are started,
must answer on their port or print, and are stopped; ``demo`` (minutes of training; run to the end
by tests/demo) must start and print its progress. A command that fails fails its test with the
command and its output.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "app"))

from doc_commands import REPO, DocCommand, Fixture, all_commands, concretize, kind  # noqa: E402

pytestmark = pytest.mark.slow


def _unique(commands: list[DocCommand]) -> list[DocCommand]:
    """One test per distinct command once example values are filled in (the README's synopsis and a
    doc's example often come out the same)."""
    probe = Fixture(Path("/S"), Path("/W"), ["main", "main-bf16"], "json://127.0.0.1:1/hw", Path("/W/tb"), 1)
    seen: set[tuple[tuple[str, ...], int]] = set()
    out = []
    for c in commands:
        key = (tuple(concretize(c, probe)), c.expect_rc)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


#: Commands the docs show that another test runs the same way, through the same CLI, with stricter
#: checks than this file's (exit status, no traceback): run once in the suite, there. Shown text ->
#: (test file, test function, the argument words that test passes to ``healthwatch``).
RUN_ELSEWHERE = {
    # The pack's own rule tests (~40 s of evaluation): every case PASS, none FAIL, exit 0.
    "healthwatch alerts test alerts/packs/default_test.yaml": (
        "tests/alerts/test_promtest.py", "test_default_pack_test_file_passes_via_cli",
        'hw("alerts", "test", str(PACK_TEST)'),
}

COMMANDS = [c for c in _unique(all_commands()) if c.text not in RUN_ELSEWHERE]

TYPO_RULES = """\
groups:
  - name: g
    rules:
      - alert: Spiky
        expr:
          spike: {metric: loss/train, windw: 50, k: 6}
        severity: critcal
"""

WRONG_TEST = """\
rule_files: [default]
tests:
  - name: right
    input_series:
      - series: loss/train
        values: "2.0x59 3.0 2.0x40"
    alert_rule_test:
      - eval_step: 60
        alertname: LossSpike
        exp_alerts:
          - labels: {severity: critical}
  - name: deliberately wrong
    input_series:
      - series: loss/train
        values: "2.0x59 3.0 2.0x40"
    alert_rule_test:
      - eval_step: 60
        alertname: LossSpike
        exp_alerts:
          - labels: {severity: warning}
"""


class _Receiver(BaseHTTPRequestHandler):
    """Webhook receiver on 127.0.0.1 that stands in for every notification URL of the docs."""

    posts: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        _Receiver.posts.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture(scope="session")
def receiver_url() -> Iterator[str]:
    """``json://127.0.0.1:PORT/hw``: a real local receiver."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"json://127.0.0.1:{server.server_address[1]}/hw"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def doc_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small real store every command gets a copy of (built once per session)."""
    from tests_app_store import build_app_store

    return build_app_store(tmp_path_factory.mktemp("docs") / "store")


@pytest.fixture(scope="session")
def tb_logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Megatron-style TensorBoard log directory written by torch's SummaryWriter."""
    from _deps import require

    require("tensorboard", "TensorBoard event files for `healthwatch import tensorboard` (in the [dev] extra)")
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path_factory.mktemp("tb") / "ultra-tb"
    w = SummaryWriter(str(logdir))
    for step in range(1, 21):
        w.add_scalar("lm loss", 5.0 - 0.1 * step, step)
        w.add_scalar("mtp_1 loss", 5.1 - 0.1 * step, step)
        w.add_scalar("grad-norm", 1.0 + 0.01 * step, step)
        w.add_scalar("learning-rate", 3e-4, step)
    w.close()
    return logdir


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fixture(tmp_path: Path, doc_store: Path, receiver_url: str, tb_logdir: Path) -> Fixture:
    """A fresh copy of the store and a scratch working directory with the files the docs name."""
    store = tmp_path / "hw-store"
    shutil.copytree(doc_store, store)
    scratch = tmp_path / "work"
    scratch.mkdir()
    (scratch / "alerts").symlink_to(REPO / "alerts", target_is_directory=True)
    (scratch / "typo.yaml").write_text(TYPO_RULES)
    (scratch / "wrong_test.yaml").write_text(WRONG_TEST)
    (scratch / "runs").mkdir()
    shutil.copytree(tb_logdir, scratch / "runs" / "ultra-tb")
    return Fixture(store=store, scratch=scratch, runs=["main", "main-bf16"], notify_url=receiver_url,
                   tb_logdir=scratch / "runs" / "ultra-tb", port=_free_port())


def _env(fx: Fixture, argv: list[str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The demo writes a store of its own (its default store must not be the fixture's copy).
    store = fx.scratch / "demo-store" if argv and kind(argv) == "long" else fx.store
    env.update({"HEALTHWATCH_STORE": str(store), "COLUMNS": "120", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
                "TORCHDYNAMO_DISABLE": "1"})
    return env


def _describe(cmd: DocCommand, argv: list[str], rc: object, output: str) -> str:
    return (f"{cmd.source}: `{cmd.text}`\nran: {' '.join(argv)}\nexit status {rc}"
            f" (the docs show {cmd.expect_rc})\n--- output ---\n{output[-6000:]}")


def _answers(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def _run_background(cmd: DocCommand, argv: list[str], fx: Fixture, what: str) -> None:
    """Start a server/daemon/demo, wait until it answers (servers) or prints (others), stop it."""
    import time

    log = fx.scratch.parent / "out.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "healthwatch.cli", *argv[1:]], cwd=fx.scratch,
                                env=_env(fx, argv), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    sub = " ".join(w for w in argv[1:3] if not w.startswith("-"))
    path = "/_stcore/health" if sub.startswith("app") else "/metrics"
    ok = False
    deadline = time.monotonic() + 180  # a timeout against a hang only: start-up is slow on a busy machine
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if what == "server":
                ok = _answers(fx.port, path)
            elif what == "long":  # the demo's progress bars print at the end: it has started writing
                ok = (fx.scratch / "demo-store" / "table=scalars").is_dir()
            else:
                ok = bool(log.read_text(errors="replace").strip())
            if ok:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    output = log.read_text(errors="replace")
    early = proc.returncode if not ok else None
    never = {"server": "answered on its port", "long": "wrote its store"}.get(what, "printed")
    assert ok, _describe(cmd, argv, early, output + f"\n[{what}: never {never}]")
    assert "Traceback" not in output, _describe(cmd, argv, proc.returncode, output)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_doc_command_runs(cmd: DocCommand, fixture: Fixture) -> None:
    """The command as the docs show it (example values replaced by the fixture's) succeeds, or
    fails with the exit status the docs show."""
    argv = concretize(cmd, fixture)
    what = kind(argv)
    if what != "once":
        _run_background(cmd, argv, fixture, what)
        return
    res = subprocess.run([sys.executable, "-m", "healthwatch.cli", *argv[1:]], cwd=fixture.scratch,
                         env=_env(fixture), capture_output=True, text=True, timeout=300)
    output = res.stdout + res.stderr
    assert res.returncode == cmd.expect_rc, _describe(cmd, argv, res.returncode, output)
    assert "Traceback" not in output, _describe(cmd, argv, res.returncode, output)


def test_commands_run_elsewhere_are_shown_and_run_there() -> None:
    """A command left out here is still in the docs, and the named test runs it through the CLI."""
    shown = {c.text for c in _unique(all_commands())}
    for text, (path, func, call) in RUN_ELSEWHERE.items():
        assert text in shown, f"{text!r} is no longer in the docs: drop it from RUN_ELSEWHERE"
        source = (REPO / path).read_text()
        assert f"def {func}(" in source and call in source, (path, func, call)


def test_the_docs_show_commands_and_the_extractor_finds_them() -> None:
    """The extractor sees the README's synopsis table, the console blocks with their exit statuses,
    and the multi-line daemon example (so an empty parametrization cannot pass by accident)."""
    texts = {c.text: c for c in COMMANDS}
    assert "healthwatch compare --store S --runs A B --out FILE" in texts
    assert texts["healthwatch alerts check typo.yaml"].expect_rc == 2
    assert texts["healthwatch alerts test wrong_test.yaml"].expect_rc == 1
    live = [c for c in COMMANDS if c.text.startswith("healthwatch alerts watch --store /shared/hw-store")]
    assert live and "--jsonl" in live[0].argv and live[0].argv.count("--notify") == 2
    assert not [c for c in COMMANDS if "pip" in c.argv], "fresh-machine install lines are not run here"
