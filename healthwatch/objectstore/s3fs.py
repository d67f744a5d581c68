"""The create-only S3 file system of the store (:class:`S3FS`), its settings and request counters."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from healthwatch.objectstore.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConditionalWriteUnsupportedError,
    CredentialsError,
    EndpointUnreachableError,
    KeyCollisionError,
    ObjectStoreError,
    StoreURIError,
)
from healthwatch.objectstore.uri import StoreURI, parse_store_uri, split_s3

ENV_ENDPOINT = "HEALTHWATCH_S3_ENDPOINT"
PROBE_DIR = "_probe"
DEFAULT_REGION = "us-east-1"


def endpoint_from_env() -> str | None:
    """The S3 endpoint: ``HEALTHWATCH_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, or None (AWS)."""
    for name in (ENV_ENDPOINT, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name)
        if value:
            return value
    return None


@dataclass
class S3Settings:
    """How to reach the server. Unset fields come from the standard AWS chain and the environment."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 3

    def resolved_endpoint(self) -> str | None:
        """The endpoint URL used (explicit, else from the environment)."""
        return self.endpoint_url or endpoint_from_env()

    def resolved_region(self) -> str:
        """Region: explicit, ``AWS_REGION``, ``AWS_DEFAULT_REGION``, else us-east-1."""
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


@dataclass
class RequestStats:
    """Requests made by one :class:`S3FS` (the fleet benchmark reports them)."""

    put: int = 0
    list: int = 0
    get: int = 0
    head: int = 0
    delete: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, kind: str, n: int = 1) -> None:
        """Add ``n`` requests of ``kind``."""
        with self._lock:
            setattr(self, kind, getattr(self, kind) + n)

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict."""
        with self._lock:
            return {k: getattr(self, k) for k in ("put", "list", "get", "head", "delete")}


# --------------------------------------------------------------------------------------------


class S3FS:
    """The store's file-system interface on one S3 bucket (create-only PUTs, no renames).

    Thread-safe (boto3 clients are). Paths are ``s3://bucket/key``; a directory is a key prefix.
    """

    def __init__(self, bucket: str, settings: S3Settings | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.settings = settings or S3Settings()
        self.endpoint = self.settings.resolved_endpoint()
        self.region = self.settings.resolved_region()
        session = boto3.session.Session(
            profile_name=self.settings.profile,
            aws_access_key_id=self.settings.access_key,
            aws_secret_access_key=self.settings.secret_key,
            aws_session_token=self.settings.session_token,
            region_name=self.region,
        )
        self._session = session
        # Few, short retries: the writer thread must get back to its queue (drop, never block).
        config = Config(
            connect_timeout=self.settings.connect_timeout_s,
            read_timeout=self.settings.read_timeout_s,
            retries={"max_attempts": self.settings.max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
            max_pool_connections=32,
        )
        self.client = session.client("s3", endpoint_url=self.endpoint, config=config)
        self.stats = RequestStats()
        #: Last-modified times (epoch s) seen by :meth:`walk` (no extra request to know a file's age).
        self.last_modified: dict[str, float] = {}
        #: Object sizes seen by :meth:`list`/:meth:`walk` (a dataset fragment then needs no HEAD).
        self.sizes: dict[str, int] = {}
        #: Entity tags seen by :meth:`list`/:meth:`walk`: with the size, the name of a local copy
        #: (:class:`SegmentCache`), so a re-created bucket's same-named object is never mistaken for it.
        self.etags: dict[str, str] = {}
        self._arrow_fs: Any = None
        self._handles: dict[str, Any] = {}  # key -> pyarrow input file (see _arrow_range)
        self._handles_lock = threading.Lock()

    @classmethod
    def for_uri(cls, uri: str | StoreURI, settings: S3Settings | None = None) -> S3FS:
        """An :class:`S3FS` for the bucket of an ``s3://`` store root."""
        parsed = uri if isinstance(uri, StoreURI) else parse_store_uri(uri)
        if not parsed.is_s3:
            raise StoreURIError(f"{uri!s} is not an s3:// store root")
        return cls(parsed.bucket, settings)

    # -- helpers -------------------------------------------------------------------------------
    def where(self) -> str:
        """The endpoint, for messages."""
        return self.endpoint or f"AWS S3 ({self.region})"

    def _key(self, path: str) -> str:
        bucket, key = split_s3(path)
        if bucket != self.bucket:
            raise StoreURIError(f"{path!r} is not in bucket {self.bucket!r}")
        return key

    def uri(self, key: str) -> str:
        """``s3://bucket/key`` for a key of this bucket."""
        return f"s3://{self.bucket}/{key}"

    def _error(self, exc: BaseException, op: str, path: str) -> ObjectStoreError:
        """Translate a botocore error into one clear :class:`ObjectStoreError`."""
        from botocore import exceptions as bx

        if path.startswith("s3:/") and not path.startswith("s3://"):  # pathlib's spelling: show the URI
            path = "s3://" + path[4:]

        where = self.where()
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            return CredentialsError(
                f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE (what failed: " + op + f" {path})"
            )
        if isinstance(exc, bx.ProfileNotFound):
            return CredentialsError(f"AWS profile not found: {exc}")
        if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ConnectionClosedError):
            return EndpointUnreachableError(
                f"cannot reach the S3 endpoint {where} ({exc}); check {ENV_ENDPOINT} / AWS_ENDPOINT_URL "
                f"and that the server is running (what failed: {op} {path})"
            )
        if isinstance(exc, bx.ReadTimeoutError):
            return EndpointUnreachableError(f"the S3 endpoint {where} stopped answering during {op} {path} ({exc})")
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and op == "head_bucket"):
                return BucketNotFoundError(f"bucket {self.bucket!r} does not exist at {where}: create it first")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"):
                return CredentialsError(
                    f"{where} rejected the credentials ({code}): check AWS_ACCESS_KEY_ID / "
                    f"AWS_SECRET_ACCESS_KEY / AWS_PROFILE (what failed: {op} {path})"
                )
            if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
                return AccessDeniedError(
                    f"{where} denied {op} on {path} ({code}): the credentials lack this permission "
                    "(a writer needs s3:PutObject, s3:GetObject, s3:ListBucket and s3:DeleteObject on the prefix)"
                )
            return ObjectStoreError(f"{op} {path} failed at {where}: {code} {err.get('Message', '')} (HTTP {status})")
        if isinstance(exc, bx.BotoCoreError):
            return ObjectStoreError(f"{op} {path} failed at {where}: {exc}")
        return ObjectStoreError(f"{op} {path} failed at {where}: {exc!r}")

    @contextlib.contextmanager
    def _call(self, op: str, path: str) -> Iterator[None]:
        from botocore import exceptions as bx

        try:
            yield
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise self._error(exc, op, path) from exc

    @staticmethod
    def _status(exc: BaseException) -> int | None:
        from botocore import exceptions as bx

        if isinstance(exc, bx.ClientError):
            return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return None

    # -- the FileSystem interface -----------------------------------------------------------------
    def list(self, directory: str) -> list[str]:
        """Names directly under ``directory`` (objects and sub-prefixes); ``[]`` when there are none."""
        prefix = self._key(directory).rstrip("/")
        prefix = prefix + "/" if prefix else ""
        names: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            with self._call("list", directory):
                self.stats.count("list")
                page = self.client.list_objects_v2(**kwargs)
            # Some servers list a directory marker (the prefix itself, or a key ending in "/"): skip it.
            objects = [o for o in page.get("Contents", ()) if not o["Key"].endswith("/")]
            names.extend(o["Key"][len(prefix):] for o in objects)
            for o in objects:
                self.sizes[self.uri(o["Key"])] = int(o["Size"])
                if o.get("ETag"):
                    self.etags[self.uri(o["Key"])] = str(o["ETag"]).strip('"')
            names.extend(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", ()))
            if not page.get("IsTruncated"):
                return names
            token = page.get("NextContinuationToken")

    def walk(self, directory: str) -> list[tuple[str, int]]:
        """Every object under ``directory`` as ``(path, size)``: one paginated listing, no delimiter."""
        prefix = self._key(directory).rstrip("/")
        prefix = prefix + "/" if prefix else ""
        out: list[tuple[str, int]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            with self._call("list", directory):
                self.stats.count("list")
                page = self.client.list_objects_v2(**kwargs)
            for o in page.get("Contents", ()):
                if not o["Key"].endswith("/"):
                    out.append((self.uri(o["Key"]), int(o["Size"])))
                    self.sizes[self.uri(o["Key"])] = int(o["Size"])
                    if o.get("ETag"):
                        self.etags[self.uri(o["Key"])] = str(o["ETag"]).strip('"')
                    if "LastModified" in o:
                        self.last_modified[self.uri(o["Key"])] = o["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return out
            token = page.get("NextContinuationToken")

    def _head(self, path: str) -> dict[str, Any] | None:
        from botocore import exceptions as bx

        try:
            self.stats.count("head")
            return self.client.head_object(Bucket=self.bucket, Key=self._key(path))
        except bx.ClientError as exc:
            if self._status(exc) == 404:
                return None
            raise self._error(exc, "head", path) from exc
        except bx.BotoCoreError as exc:
            raise self._error(exc, "head", path) from exc

    def exists(self, path: str) -> bool:
        """Whether the object ``path`` exists."""
        return self._head(path) is not None

    def mtime_ns(self, path: str) -> int | None:
        """A change signature of ``path``: the object's last-modified time in ns, None if absent.

        Object storage has no directories: for a prefix (no object of that name) it is a hash of
        the listing under it (keys and sizes; costs one paginated LIST), so a reader's "did this
        folder change" check works unchanged.
        """
        last = self._key(path).rstrip("/").rsplit("/", 1)[-1]
        # The store's folders (table=…, run=…) are never objects: skip the HEAD that would 404.
        head = None if last.startswith(("table=", "run=")) else self._head(path)
        if head is not None:
            return int(head["LastModified"].timestamp() * 1e9)
        return self._listing_signature(self.walk(path))

    @staticmethod
    def _listing_signature(listing: list[tuple[str, int]]) -> int | None:
        """A prefix's change signature: a hash of its ``(key, size)`` listing; None when empty."""
        if not listing:
            return None
        digest = hashlib.blake2b(repr(sorted(listing)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") >> 1

    def list_signed(self, directory: str) -> tuple[int | None, list[str]]:
        """``(mtime_ns(directory), list(directory))`` of a prefix from ONE paginated LIST.

        The store's readers ask both of every run folder they refresh (a signature to see whether
        it changed, the names to find its live segments): two LISTs, each ~10-20 ms of botocore
        XML parsing, became one. Names are as :meth:`list` gives them (objects directly under
        ``directory`` and the first component of deeper keys); the signature is what
        :meth:`mtime_ns` gives for a prefix (a folder of the store is never an object itself).
        """
        listing = self.walk(directory)
        base = self.uri(self._key(directory).rstrip("/")) + "/"
        names: set[str] = set()
        for key, _size in listing:
            rel = key[len(base):] if key.startswith(base) else key.rsplit("/", 1)[-1]
            names.add(rel.split("/", 1)[0])
        return self._listing_signature(listing), sorted(names)

    @contextlib.contextmanager
    def _getting(self, path: str) -> Iterator[None]:
        """Count one GET of ``path`` and translate its failures: ``FileNotFoundError`` when the object is
        absent (a merge may have retired it), else this store's clear errors."""
        from botocore import exceptions as bx

        self.stats.count("get")
        try:
            yield
        except bx.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(path) from exc
            raise self._error(exc, "get", path) from exc
        except bx.BotoCoreError as exc:
            raise self._error(exc, "get", path) from exc

    def read_bytes(self, path: str) -> bytes:
        """The whole object (``FileNotFoundError`` when absent)."""
        with self._getting(path):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read()

    def read_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object ``path`` (one ranged GET; ``FileNotFoundError`` when absent)."""
        if not 0 <= start < end:
            raise ValueError(f"read_range of {path}: empty or negative byte range [{start}, {end})")
        # pyarrow's C++ S3 client first: ~1 ms CPU per GET against boto3's ~3.5 ms (measured on SeaweedFS),
        # which is most of a cold s3:// Run page's ~90 footer and column-chunk reads. Any failure other
        # than a missing object falls back to boto3, whose errors this store already translates.
        try:
            data = self._arrow_range(path, start, end)
        except FileNotFoundError:
            raise
        except Exception:  # noqa: BLE001 - boto3 below raises the clear error, or succeeds
            data = None
        if data is not None:
            return data
        with self._getting(path):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(path),
                                          Range=f"bytes={start}-{end - 1}")["Body"].read()

    def _arrow_range(self, path: str, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` by one ranged GET through :meth:`arrow_filesystem` (counted), reusing an
        opened handle per object (its HEAD paid once); None when the read came back short."""
        key = self._key(path)
        with self._handles_lock:
            handle = self._handles.pop(key, None)
        fresh = handle is None
        if fresh:
            # Segments are immutable (create-only keys), so an object's handle stays valid until retired.
            self.stats.count("head")
            handle = self.arrow_filesystem().open_input_file(f"{self.bucket}/{key}")  # a HEAD; FileNotFoundError
        self.stats.count("get")
        try:
            data = handle.read_at(end - start, start)
        except Exception:
            if fresh:
                raise
            return self._arrow_range(path, start, end)  # a stale handle (object retired): open it again
        if len(data) != end - start:
            return None
        with self._handles_lock:  # the most recently used last; a bounded number kept
            self._handles[key] = handle
            while len(self._handles) > 256:
                self._handles.pop(next(iter(self._handles)))
        return data

    def download(self, path: str, dest: str | os.PathLike[str]) -> int:
        """Stream the object ``path`` into the local file ``dest`` (never whole in memory); returns its size.

        Raises ``FileNotFoundError`` when the object does not exist (a merge retired it).
        """
        with self._getting(path):
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(path))
            n = 0
            with open(dest, "wb") as fh:
                for chunk in resp["Body"].iter_chunks(8 * 2**20):
                    fh.write(chunk)
                    n += len(chunk)
            return n

    def open_input(self, path: str) -> Any:
        """``path`` opened for reading through pyarrow's S3 file system (what ``pq.read_schema`` etc. take).

        Raises ``FileNotFoundError`` when the object does not exist.
        """
        try:
            return self.arrow_filesystem().open_input_file(self.arrow_path(path))
        except FileNotFoundError:
            raise
        except OSError as exc:
            if "does not exist" in str(exc) or "NoSuchKey" in str(exc):
                raise FileNotFoundError(path) from exc
            raise

    def arrow_path(self, path: str) -> str:
        """The ``bucket/key`` path of ``path`` in :meth:`arrow_filesystem` (pyarrow datasets)."""
        return f"{self.bucket}/{self._key(path)}"

    def put_create_only(self, path: str, data: bytes | Path) -> None:
        """One PUT with ``If-None-Match: *``: the object appears whole, or the call fails.

        ``data`` is the bytes, or a local file streamed from disk (a large merge target is never
        held in memory). A 412 on a key that already holds exactly this content is success (a retry
        of a PUT whose answer was lost); on other content it raises :class:`KeyCollisionError`.
        """
        from botocore import exceptions as bx

        key = self._key(path)
        try:
            self.stats.count("put")
            if isinstance(data, Path):
                with open(data, "rb") as fh:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=fh, IfNoneMatch="*")
            else:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
            return
        except bx.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if self._status(exc) not in (412, 409) and code not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise self._error(exc, "put", path) from exc
            first = exc
        except bx.BotoCoreError as exc:
            raise self._error(exc, "put", path) from exc
        head = self._head(path)
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        if head is not None and head.get("ContentLength") == size:
            etag = str(head.get("ETag", "")).strip('"')
            if isinstance(data, Path):
                md5 = hashlib.md5(usedforsecurity=False)
                with open(data, "rb") as fh:
                    for chunk in iter(lambda: fh.read(8 * 2**20), b""):
                        md5.update(chunk)
                digest = md5.hexdigest()
            else:
                digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if etag == digest:
                return
        raise KeyCollisionError(
            f"{path} already exists at {self.where()} (create-only PUT refused with 412): two writers "
            "chose the same key, which writer ids + sequence numbers are meant to prevent"
        ) from first

    def publish(self, directory: str, name: str, write: Callable[[str], None]) -> str:
        """``write(tmp)`` fills a local temp file, then one create-only PUT publishes it whole."""
        fd, tmp = tempfile.mkstemp(prefix=".hw-", suffix=".partial")
        os.close(fd)
        try:
            write(tmp)
            return self.publish_bytes(directory, name, Path(tmp))  # streamed from the temp file
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def publish_bytes(self, directory: str, name: str, data: bytes | Path) -> str:
        """Publish ``data`` (bytes, or a local file streamed) as ``directory/name`` with one create-only PUT."""
        path = directory.rstrip("/") + "/" + name
        self.put_create_only(path, data)
        return path

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists (False then)."""
        try:
            self.put_create_only(path, data)
            return True
        except KeyCollisionError:
            return False

    def delete(self, path: str) -> bool:
        """Remove ``path``; False when it was already gone (S3 DELETE itself does not say)."""
        if self._head(path) is None:
            return False
        with self._call("delete", path):
            self.stats.count("delete")
            self.client.delete_object(Bucket=self.bucket, Key=self._key(path))
        return True

    # -- conditional operations (merge leases, see S3Lease) ----------------------------------------
    def _conditional_refused(self, exc: BaseException) -> bool:
        """Whether a ClientError is a failed precondition (412) or a concurrent conditional write (409)."""
        from botocore import exceptions as bx

        if not isinstance(exc, bx.ClientError):
            return False
        code = exc.response.get("Error", {}).get("Code")
        return self._status(exc) in (412, 409) or code in ("PreconditionFailed", "ConditionalRequestConflict")

    def put_conditional(self, path: str, data: bytes, *, if_match: str | None = None) -> str | None:
        """PUT ``data`` only if ``path`` is absent (``if_match`` None) or still has entity tag ``if_match``.

        Returns the new object's entity tag, or None when the condition failed (412/409): another
        process created or replaced the object first. On AWS S3 ``If-Match`` on PutObject exists
        since 2024-11; SeaweedFS and moto enforce both conditions (docs/scale.md).
        """
        from botocore import exceptions as bx

        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(path), "Body": data}
        if if_match is None:
            kwargs["IfNoneMatch"] = "*"
        else:
            kwargs["IfMatch"] = if_match
        try:
            self.stats.count("put")
            return str(self.client.put_object(**kwargs)["ETag"])
        except bx.ClientError as exc:
            if self._conditional_refused(exc):
                return None
            raise self._error(exc, "put (conditional)", path) from exc
        except bx.BotoCoreError as exc:
            raise self._error(exc, "put (conditional)", path) from exc

    def get_versioned(self, path: str) -> tuple[bytes, str, float, float] | None:
        """``(body, etag, last_modified, server_now)`` of ``path`` (epoch seconds), or None when absent.

        ``server_now`` is the response's ``Date`` header: the age of an object is then measured on
        the server's one clock (``server_now - last_modified``), never against a local clock that may
        be skewed from the writer's.
        """
        from email.utils import parsedate_to_datetime

        from botocore import exceptions as bx

        try:
            self.stats.count("get")
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(path))
            body = resp["Body"].read()
        except bx.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404") or self._status(exc) == 404:
                return None
            raise self._error(exc, "get", path) from exc
        except bx.BotoCoreError as exc:
            raise self._error(exc, "get", path) from exc
        modified = resp["LastModified"].timestamp()
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            now = parsedate_to_datetime(date).timestamp() if date else modified
        except (TypeError, ValueError):
            now = modified  # no usable Date header: the object always looks fresh (never broken early)
        return body, str(resp["ETag"]), modified, now

    def delete_if_match(self, path: str, etag: str) -> bool:
        """Delete ``path`` only if it still has entity tag ``etag``; False when it does not (or is gone).

        A server that does not take ``If-Match`` on DELETE (400/501) gets a GET and a plain DELETE
        when the tag still matches (a window of one round trip; see docs/scale.md).
        """
        from botocore import exceptions as bx

        with self._call("delete", path):
            try:
                self.stats.count("delete")
                self.client.delete_object(Bucket=self.bucket, Key=self._key(path), IfMatch=etag)
                return True
            except bx.ClientError as exc:
                if self._conditional_refused(exc) or self._status(exc) == 404:
                    return False
                if self._status(exc) not in (400, 501):
                    raise
        got = self.get_versioned(path)
        if got is None or got[1] != etag:
            return False
        with self._call("delete", path):
            self.stats.count("delete")
            self.client.delete_object(Bucket=self.bucket, Key=self._key(path))
        return True

    # -- startup checks ---------------------------------------------------------------------------
    def check_bucket(self) -> None:
        """Raise a clear error unless the bucket exists and the credentials may read it."""
        # A one-key LIST, not HEAD: a HEAD answer has no body, so a rejected signature and a missing
        # permission both read as a bare 403; the LIST error names which (and NoSuchBucket).
        with self._call("head_bucket", f"s3://{self.bucket}"):
            self.stats.count("list")
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)

    def probe(self, prefix: str = "") -> None:
        """Require the server to enforce ``If-None-Match: *`` before any segment is written.

        PUTs one fresh probe key twice; the second PUT must be refused with 412. A server that
        accepts it would let two writers overwrite each other's objects without anyone noticing,
        so it is refused with :class:`ConditionalWriteUnsupportedError` naming the endpoint.
        """
        from botocore import exceptions as bx

        self.check_bucket()
        key = "/".join(p for p in (prefix.strip("/"), PROBE_DIR, f"{uuid.uuid4().hex}.probe") if p)
        path = self.uri(key)
        with self._call("put (probe)", path):
            try:
                self.stats.count("put")
                self.client.put_object(Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
            except bx.ClientError as exc:
                if self._status(exc) in (400, 501):
                    raise ConditionalWriteUnsupportedError(
                        f"S3 endpoint {self.where()} rejects conditional PUTs (If-None-Match: *): "
                        f"{exc.response.get('Error', {}).get('Code')}; healthwatch needs create-only writes"
                    ) from exc
                raise
        try:
            try:
                self.stats.count("put")
                self.client.put_object(Bucket=self.bucket, Key=key, Body=b"2", IfNoneMatch="*")
            except bx.ClientError as exc:
                if self._status(exc) in (412, 409):
                    return  # enforced
                raise self._error(exc, "put (probe)", path) from exc
            except bx.BotoCoreError as exc:
                raise self._error(exc, "put (probe)", path) from exc
            raise ConditionalWriteUnsupportedError(
                f"S3 endpoint {self.where()} ignores If-None-Match: a second create-only PUT of the probe "
                f"key {path} succeeded instead of failing with 412 Precondition Failed. Writers there could "
                "silently overwrite each other's segments, so healthwatch refuses to write to it; use AWS S3 "
                "or a server that enforces conditional writes (e.g. SeaweedFS)"
            )
        finally:
            with contextlib.suppress(ObjectStoreError, OSError):
                self.delete(path)

    def probe_if_match(self, prefix: str = "") -> None:
        """Require the server to enforce ``If-Match`` on PUT (merge leases: :class:`S3Lease`).

        Creates a probe key, then overwrites it with ``If-Match`` of a tag it does not have: that PUT
        must be refused with 412, and one with the right tag must succeed. A server that ignores the
        condition would let two mergers break the same stale lease and publish the same rows twice.
        """
        key = "/".join(p for p in (prefix.strip("/"), PROBE_DIR, f"{uuid.uuid4().hex}.probe") if p)
        path = self.uri(key)
        try:
            tag = self.put_conditional(path, b"1")
            if tag is None:
                raise ConditionalWriteUnsupportedError(f"S3 endpoint {self.where()}: a fresh probe key {path} already existed")
            try:
                wrong = self.put_conditional(path, b"2", if_match='"0123456789abcdef0123456789abcdef"')
                right = self.put_conditional(path, b"3", if_match=tag)
            except ObjectStoreError as exc:
                raise ConditionalWriteUnsupportedError(
                    f"S3 endpoint {self.where()} rejects conditional overwrites (PUT with If-Match): {exc}; "
                    "healthwatch compact needs them for its merge leases (docs/scale.md)") from exc
            if wrong is not None or right is None:
                raise ConditionalWriteUnsupportedError(
                    f"S3 endpoint {self.where()} does not enforce If-Match on PUT (a PUT with a wrong entity tag "
                    f"{'succeeded' if wrong is not None else 'was fine, but one with the right tag failed'}): two "
                    "compactors could then both break a stale merge lease and publish the same rows twice, so "
                    "healthwatch compact refuses to run there (docs/scale.md)")
        finally:
            with contextlib.suppress(ObjectStoreError, OSError):
                self.delete(path)

    # -- reading --------------------------------------------------------------------------------
    def arrow_filesystem(self) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` with the same endpoint and credentials."""
        if self._arrow_fs is None:
            import pyarrow.fs as pafs

            creds = self._session.get_credentials()
            if creds is None:
                raise CredentialsError(
                    f"no AWS credentials for {self.where()}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
                )
            frozen = creds.get_frozen_credentials()
            kwargs: dict[str, Any] = {
                "access_key": frozen.access_key,
                "secret_key": frozen.secret_key,
                "session_token": frozen.token,
                "region": self.region,
                "connect_timeout": self.settings.connect_timeout_s,
                "request_timeout": self.settings.read_timeout_s,
            }
            if self.endpoint:
                parsed = urlparse(self.endpoint)
                kwargs["endpoint_override"] = parsed.netloc or self.endpoint
                kwargs["scheme"] = parsed.scheme or "https"
            self._arrow_fs = pafs.S3FileSystem(**kwargs)
        return self._arrow_fs


# --------------------------------------------------------------------------------------------
