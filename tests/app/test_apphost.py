"""The test/benchmark harness starts the app server robustly on a busy machine.

``free_port()`` picks a port that another process may take before the server binds it (several
suites and benchmarks start servers at once): the harness starts the server again on a new port.
Any other early exit is an error that shows the server's own output.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from benchmarks import apphost


def test_a_port_taken_before_the_bind_is_retried_on_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        picks = iter([busy])  # the first pick is a port someone else holds
        real = apphost.free_port
        monkeypatch.setattr(apphost, "free_port", lambda: next(picks, None) or real())
        proc, url = apphost.start_app(tmp_path / "store", timeout=120)
        try:
            assert url != f"http://127.0.0.1:{busy}" and apphost.healthy(int(url.rsplit(":", 1)[1]), proc)
        finally:
            apphost.stop(proc)


def test_a_port_the_caller_chose_is_not_changed_and_the_error_shows_the_output(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"(?s)exited with.*{busy}"):
            apphost.start_app(tmp_path / "store", port=busy, timeout=120)


def test_a_source_tree_of_a_commit_serves_that_commits_app(tmp_path: Path) -> None:
    """bench_render's side-by-side mode serves another commit's app: ``source_tree`` unpacks it and
    ``tree_env`` + ``cwd`` make a child import the tree's ``healthwatch`` and ``healthwatch.app``
    (not the editable install's), as the server started by ``start_app(env=, cwd=)`` does."""
    import subprocess
    import sys

    from benchmarks.bench_render import source_tree, tree_env

    tree = source_tree("HEAD", tmp_path)
    assert source_tree("HEAD", tmp_path) == tree  # unpacked once, reused
    code = "import healthwatch, healthwatch.app.views, benchmarks; print(healthwatch.__file__, healthwatch.app.views.__path__[0])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=tree_env(tree), capture_output=True, text=True,
                         check=True).stdout.split()
    assert Path(out[0]).is_relative_to(tree) and Path(out[1]).resolve() == (tree / "app" / "views").resolve()
    proc, url = apphost.start_app(tmp_path / "store", env=tree_env(tree), cwd=tree, timeout=120)
    try:
        import psutil

        served = [" ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True)]
        assert any(f"{tree}/healthwatch/app/main.py" in c for c in served), served
    finally:
        apphost.stop(proc)
