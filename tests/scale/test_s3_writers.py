"""Writers on S3 under failure: kill -9 mid-upload, and the server stopped and restarted mid-run.

Real processes and a real SeaweedFS server: the writer that is killed is a separate Python
process in the middle of sending a PUT body; the server that goes away is stopped and started
again on the same ports and data.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from s3servers import SeaweedS3

from healthwatch.objectstore import (
    S3FS,
    BackgroundUploader,
    S3SegmentWriter,
    S3Settings,
    parse_store_uri,
    segment_key,
)
from healthwatch.schema import TABLES
from healthwatch.store import open_store

REPO = Path(__file__).resolve().parents[2]

# The killed writer: publishes segments 1..3 whole, then sends segment 4 with a body that stops
# half-way through the network send (reads from inside http.client/urllib3 are the send; earlier
# passes over the body are botocore hashing it) and says so on stdout.
WRITER = textwrap.dedent(
    """
    import io, sys, time
    import numpy as np, pyarrow as pa
    from healthwatch.objectstore import S3FS, segment_key, parse_store_uri, table_bytes
    from healthwatch.schema import TABLES

    root, writer = sys.argv[1], sys.argv[2]
    fs = S3FS.for_uri(root)

    def segment(seq):
        n = 20_000 if seq == 4 else 500
        steps = np.arange(seq * 100_000, seq * 100_000 + n, dtype=np.int64)
        return table_bytes(pa.table({"attempt": np.ones(n, np.int32), "step": steps, "tokens": steps * 8,
            "name": ["loss/train"] * n, "value": np.sin(steps.astype(float)), "wall_time": np.zeros(n)},
            schema=TABLES["scalars"]))

    class Stalling(io.RawIOBase):
        def __init__(self, data):
            self.data, self.pos, self.said = data, 0, False
        def readable(self): return True
        def seekable(self): return True
        def tell(self): return self.pos
        def seek(self, off, whence=0):
            self.pos = off if whence == 0 else (len(self.data) + off if whence == 2 else self.pos + off)
            return self.pos
        def readinto(self, buf):
            sending = any(("http/client.py" in f.filename or "urllib3" in f.filename)
                          for f in __import__("traceback").extract_stack())
            if sending and self.pos >= len(self.data) // 2:
                if not self.said:
                    print("HALF-SENT", flush=True)
                    self.said = True
                time.sleep(3600)
            k = min(len(buf), len(self.data) - self.pos, 16384)
            buf[:k] = self.data[self.pos:self.pos + k]
            self.pos += k
            return k

    r = parse_store_uri(root)
    for seq in (1, 2, 3):
        fs.put_create_only(fs.uri(segment_key(r, "scalars", "killed", writer, seq)), segment(seq))
        print("PUBLISHED", seq, flush=True)
    key = segment_key(r, "scalars", "killed", writer, 4)
    fs.client.put_object(Bucket=r.bucket, Key=key, Body=Stalling(segment(4)), IfNoneMatch="*")
    print("UNEXPECTED-END", flush=True)
    """
)


@pytest.mark.timeout(180)
def test_kill_9_mid_upload_leaves_no_partial_object(s3_root: str, tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writer_id = "a0001r00000xkill0001"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), s3_root, writer_id], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("HALF-SENT"):
                break
        assert lines[-1:] == ["HALF-SENT"], (lines, proc.stderr.read() if proc.poll() is not None else "")
        proc.send_signal(signal.SIGKILL)  # the PUT body is half on the wire
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert lines[:3] == ["PUBLISHED 1", "PUBLISHED 2", "PUBLISHED 3"]
    fs = S3FS.for_uri(s3_root)
    time.sleep(1.0)  # give the server time to notice the dropped connection (no object may appear anyway)
    root = parse_store_uri(s3_root)
    names = sorted(fs.list(f"{s3_root}/table=scalars/run=killed"))
    # Segments 1-3 are there whole; the one being sent when the writer died is absent, not partial.
    assert names == [segment_key(root, "scalars", "killed", writer_id, s).rsplit("/", 1)[1] for s in (1, 2, 3)]
    assert not fs.exists(fs.uri(segment_key(root, "scalars", "killed", writer_id, 4)))
    tables = open_store(s3_root)
    steps = tables.sql("SELECT step FROM scalars WHERE run = 'killed' ORDER BY step").arrow()["step"].to_numpy()
    expected = np.concatenate([np.arange(s * 100_000, s * 100_000 + 500) for s in (1, 2, 3)])
    assert np.array_equal(steps, expected)  # loss is bounded by the flush in flight
    tables.close()


def _flush(step0: int, n: int = 10) -> pa.Table:
    steps = np.arange(step0, step0 + n, dtype=np.int64)
    return pa.table({"attempt": np.ones(n, np.int32), "step": steps, "tokens": steps * 16,
                     "name": ["loss/train"] * n, "value": steps.astype(np.float64) / 7, "wall_time": np.zeros(n)},
                    schema=TABLES["scalars"])


def _wait(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            faulthandler.dump_traceback(all_threads=True)  # where the writer thread was stuck, in the report
            raise AssertionError("condition not reached before the timeout")
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_server_stopped_and_restarted_mid_run(private_seaweed: SeaweedS3) -> None:
    root = "s3://hwstore/restart"
    fs = S3FS.for_uri(root, S3Settings(connect_timeout_s=1, read_timeout_s=5, max_attempts=1))
    writer = S3SegmentWriter(fs, root, "live")
    writer.start()
    up = BackgroundUploader(writer, max_queue=4)
    submitted = 0

    def flush(step0: int) -> None:
        nonlocal submitted
        up.submit("scalars", _flush(step0))
        submitted += 10

    # Phase 1: server up, every flush lands.
    for i in range(10):
        flush(i * 10)
        _wait(lambda: up.written_rows + up.dropped_rows == submitted)  # one flush per "5 s"
    assert up.written_rows == 100 and up.dropped_rows == 0
    # Phase 2: server down. Every submit returns at once (the caller is the training loop); the
    # flushes are dropped, either at the full queue or when their upload fails, and counted.
    private_seaweed.stop()
    for i in range(10, 30):
        flush(i * 10)
    assert submitted == 300  # the loop ran all 20 flushes while the server was down
    _wait(lambda: up.written_rows + up.dropped_rows == submitted)
    assert up.written_rows == 100 and up.dropped_rows == 200 and up.failures >= 1
    # Phase 3: server back; writing resumes with the same writer (new sequence numbers).
    private_seaweed.start()
    for i in range(30, 40):
        flush(i * 10)
        _wait(lambda: up.written_rows + up.dropped_rows == submitted, timeout=120)
    up.close()
    assert up.written_rows == 200 and up.dropped_rows == 200
    tables = open_store(root)
    steps = tables.sql("SELECT step FROM scalars WHERE run = 'live' ORDER BY step").arrow()["step"].to_numpy()
    assert np.array_equal(steps, np.concatenate([np.arange(0, 100), np.arange(300, 400)]))
    tables.close()


@pytest.mark.timeout(400)
def test_monitor_on_s3_survives_a_server_restart(private_seaweed: SeaweedS3) -> None:
    """A real Monitor training into s3:// while the server goes away and comes back: every step returns,
    the lost flushes are counted (``dropped_rows`` and the ``monitor/dropped_rows`` scalar), writing resumes."""
    import sys as _sys

    _sys.path.insert(0, str(REPO / "tests" / "core"))
    torch = pytest.importorskip("torch")
    from toymodel import ToyLM

    import healthwatch as hw

    root = "s3://hwstore/monitor-restart"
    torch.manual_seed(0)
    model = ToyLM()
    ids = torch.arange(8).reshape(1, 8) % 32

    def steps(mon: hw.Monitor, rng: range) -> None:
        for step in rng:
            out = model(ids).float().pow(2).mean()
            out.backward()
            mon.after_backward()
            model.zero_grad(set_to_none=False)
            mon.step(step, tokens=8 * (step + 1), loss=out.detach(), lr=1e-3)

    def logged() -> set[int]:
        with open_store(root) as st:
            return {int(r[0]) for r in st.sql(
                "SELECT step FROM scalars WHERE run = 'r' AND name = 'loss/train'").fetchall()}

    mon = hw.Monitor(store=root, run="r", flush_every_steps=2, expert_load_every=0, queue_size=4)
    try:
        mon.watch(model)
        steps(mon, range(0, 10))
        _wait(lambda: logged() == set(range(10)), timeout=120)  # phase 1: every flush lands
        assert mon.dropped_rows == 0
        private_seaweed.stop()
        steps(mon, range(10, 30))  # phase 2: the loop runs on (each step returns; nothing waits on S3)
        _wait(lambda: mon.dropped_rows > 0, timeout=120)
        private_seaweed.start()
        # Phase 3: the server is back. The writer thread may still be inside a request of the
        # outage (the S3 client's own retries), so a flush queued now can still be lost: train one
        # flush (2 steps) at a time until one lands, each time waiting until it either landed or
        # was counted as dropped (a logical cycle, not a fixed sleep). A flush always holds the
        # first of its two steps (the second may ride with the next flush: a step's values are read
        # from the device one step late, never by a sync in the loop) ...
        step = 30
        while True:
            before = mon.dropped_rows
            steps(mon, range(step, step + 2))
            step += 2
            _wait(lambda first=step - 2, before=before: first in logged() or mon.dropped_rows > before, timeout=120)
            if step - 2 in logged():
                break
            assert step < 130, "no flush landed after the server came back"
        resumed = step - 2
        steps(mon, range(step, step + 4))  # ... then every later step must land (close() flushes the rest)
        step += 4
    finally:
        mon.close()
    got = logged()
    missing = set(range(step)) - got
    assert set(range(10)) <= got and set(range(resumed, step)) <= got, sorted(got)  # before, and writing resumed
    assert missing and missing <= set(range(10, resumed)), sorted(missing)  # only flushes of the outage were lost
    assert mon.dropped_rows >= len(missing)  # each lost flush held at least its loss/train row
    with open_store(root) as st:
        dropped = st.sql("SELECT max(value) FROM scalars WHERE run = 'r' AND name = 'monitor/dropped_rows'").fetchone()
    assert dropped[0] is not None and dropped[0] > 0  # the drops are in the store too, for alerts and charts
