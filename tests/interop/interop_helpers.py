"""Helpers of the interop tests: a store writer whose values the test knows independently, and real
Prometheus / Alertmanager servers on 127.0.0.1 with generated configs."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from healthwatch.schema import SCHEMA_VERSION
from healthwatch.store import StoreWriter

SCALARS = ("loss/train", "loss/mtp_1", "loss/mtp_2", "grad_norm/total")
LAYER_METRICS = ("maxvio", "resid_rms_max", "wgrad_norm", "dead_experts")
TOKENS_PER_STEP = 4096


def needs(module: str) -> Any:
    """Import ``module``; skip the test without it, but fail under ``CI=true`` (a dev dependency)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} is a dev dependency and must be installed in CI: {exc}")
        pytest.skip(f"{module} not installed")


def needs_binary(name: str) -> str:
    """Path of executable ``name``; skip without it (fail under ``CI=true``: .ci/run apt-installs it)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is not installed (.ci/run installs it with apt-get)")
        pytest.skip(f"{name} not installed")
    return path


def scalar_value(run_seed: int, attempt: int, step: int, name: str) -> float:
    """The value the test writer logs for a scalar (a function of its inputs only)."""
    base = {"loss/train": 3.0, "loss/mtp_1": 3.4, "loss/mtp_2": 3.7, "grad_norm/total": 1.5}[name]
    return base + run_seed * 0.01 + attempt * 0.5 + ((step * 7919) % 101) / 1000.0


def layer_value(run_seed: int, attempt: int, step: int, layer: int, metric: str) -> float:
    """The value the test writer logs for one layer metric."""
    k = {"maxvio": 1.0, "resid_rms_max": 10.0, "wgrad_norm": 0.1, "dead_experts": 1.0}[metric]
    return k * (1.0 + ((step * 31 + layer * 17 + run_seed * 5 + attempt * 3) % 23) / 7.0)


def layer_type(layer: int) -> str:
    return ("mamba", "moe", "attention", "moe")[layer % 4]


class RunWriter:
    """Writes one attempt of a run through the store's real writer, step by step, and keeps what it logged."""

    def __init__(self, root: Path, run: str, layers: int = 6, attempt: int = 1, start_step: int = 0,
                 seed: int = 0, parent: str | None = None) -> None:
        self.root, self.run, self.layers, self.attempt, self.seed = root, run, layers, attempt, seed
        self.w = StoreWriter(root, run, attempt=attempt)
        now = time.time()
        self.w.write("runs", {"parent": [parent], "branch_step": [None], "branch_tokens": [None],
                              "precision": ["nvfp4"], "config": [json.dumps({"seed": seed})], "created": [now],
                              "schema_version": [SCHEMA_VERSION]})
        self.w.write("attempts", {"attempt": [attempt], "start_step": [start_step], "started_at": [now],
                                  "host": ["test"], "reason": ["start" if attempt == 1 else "rollback"],
                                  "schema_version": [SCHEMA_VERSION]})
        #: step -> {"scalars": {...}, "layers": {metric: [values by layer]}, "wall": t}
        self.logged: dict[int, dict[str, Any]] = {}

    def write_steps(self, steps: range | list[int], wall: float | None = None,
                    tables: tuple[str, ...] = ("scalars", "layer_stats")) -> None:
        """Write ``steps`` as one segment per table (like one flush); ``tables`` lets a test land them apart."""
        sc: dict[str, list[Any]] = {k: [] for k in ("attempt", "step", "tokens", "name", "value", "wall_time")}
        ls: dict[str, list[Any]] = {k: [] for k in ("attempt", "step", "tokens", "layer", "layer_type", "metric", "value")}
        for step in steps:
            t = time.time() if wall is None else wall
            entry: dict[str, Any] = {"scalars": {}, "layers": {}, "wall": t}
            for name in SCALARS:
                v = scalar_value(self.seed, self.attempt, step, name)
                entry["scalars"][name] = v
                for k, x in zip(sc, (self.attempt, step, step * TOKENS_PER_STEP, name, v, t)):
                    sc[k].append(x)
            for metric in LAYER_METRICS:
                vals = [layer_value(self.seed, self.attempt, step, layer, metric) for layer in range(self.layers)]
                entry["layers"][metric] = vals
                for layer, v in enumerate(vals):
                    for k, x in zip(ls, (self.attempt, step, step * TOKENS_PER_STEP, layer, layer_type(layer), metric, v)):
                        ls[k].append(x)
            self.logged[step] = entry
        for table, cols in (("scalars", sc), ("layer_stats", ls)):
            if table in tables:
                self.w.write(table, cols)


def expected_latest(logged: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Latest scalars and per-layer max / median / arg-max computed from what the writer logged."""
    import statistics

    step = max(logged)
    e = logged[step]
    out: dict[str, Any] = {"step": step, "tokens": step * TOKENS_PER_STEP, "wall": e["wall"],
                           "scalars": dict(e["scalars"]), "layers": {}}
    for metric, vals in e["layers"].items():
        mx = max(vals)
        out["layers"][metric] = {"max": mx, "median": statistics.median(vals), "argmax": vals.index(mx)}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, data: Any = None, method: str | None = None, timeout: float = 10.0) -> Any:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def wait_until(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.25) -> Any:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = cond()
            if got:
                return got
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last_exc = exc
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


@contextlib.contextmanager
def server_process(argv: list[str], ready_url: str, log_path: Path, timeout: float = 60.0) -> Iterator[subprocess.Popen]:
    """Start a server, wait until ``ready_url`` answers 200, always stop it."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"{argv[0]} exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
                with urllib.request.urlopen(ready_url, timeout=2) as resp:
                    return resp.status == 200

            wait_until(ready, timeout, f"{argv[0]} to be ready at {ready_url}")
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)


class Receiver:
    """A webhook receiver on 127.0.0.1 (http.server) that records every JSON body it gets."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.received: list[Any] = []
        self.lock = threading.Lock()
        got, lock = self.received, self.lock

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"null")
                with lock:
                    got.append(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def bodies(self) -> list[Any]:
        with self.lock:
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
