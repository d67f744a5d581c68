"""Stores on S3-compatible object storage: root URIs, a create-only S3 file system, and a reader.

A store root is a URI: a local path (``runs/store``, ``file:///data/store``) or
``s3://bucket/prefix`` on any S3-compatible endpoint. On object storage there is no atomic
rename, so a segment is published with **one create-only PUT** (``If-None-Match: *``) to a key
that cannot collide (writer id + sequence, as on disk). Several S3 emulators accept that header
and ignore it; :meth:`S3FS.probe` PUTs a probe key twice at start and refuses a server that does
not answer the second PUT with ``412 Precondition Failed``.

:class:`S3FS` implements the store's small file-system interface (``healthwatch.store.fs``:
``list``, ``exists``, ``mtime_ns``, ``read_bytes``, ``open_input``, ``publish``,
``publish_bytes``, ``create_exclusive``, ``delete``) so that the segment protocol runs unchanged
on S3. Paths are ``s3://bucket/key`` strings; "directories" are key prefixes ending in ``/``.

Reads go through pyarrow's S3 file system and datasets (:func:`s3_dataset`,
:func:`s3_table_source`, which the store's one reader, :class:`healthwatch.store.Store`, registers
for ``s3://`` roots): DuckDB scans them with column and row-filter pushdown, without its own S3
extension (which downloads at run time and is not available offline).

Credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, config files); the endpoint from ``HEALTHWATCH_S3_ENDPOINT``, then
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (unset: AWS itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa

ENV_ENDPOINT = "HEALTHWATCH_S3_ENDPOINT"
#: Tables small enough to hold in memory after each listing (a few rows per run and attempt).
SMALL_TABLES = ("runs", "attempts")
#: A table whose live objects add up to at most this many bytes (compressed) is read into memory at
#: each refresh that changed it (env ``HEALTHWATCH_S3_MEMORY_BYTES``).
IN_MEMORY_BYTES = int(os.environ.get("HEALTHWATCH_S3_MEMORY_BYTES", 16 * 2**20))
PROBE_DIR = "_probe"
DEFAULT_REGION = "us-east-1"


# --------------------------------------------------------------------------------------------
# errors: one clear message per way object storage can refuse us


class StoreURIError(ValueError):
    """A store root that is neither a local path nor an ``s3://bucket/prefix`` URI."""


class ObjectStoreError(RuntimeError):
    """Object storage refused or failed a request; the message says which endpoint and why."""


class EndpointUnreachableError(ObjectStoreError, ConnectionError):
    """No S3 server answers at the configured endpoint."""


class CredentialsError(ObjectStoreError):
    """No credentials were found, or the server does not accept them."""


class AccessDeniedError(ObjectStoreError, PermissionError):
    """The credentials are valid but lack a permission the store needs (e.g. PutObject)."""


class BucketNotFoundError(ObjectStoreError, FileNotFoundError):
    """The bucket of an ``s3://`` store does not exist."""


class ConditionalWriteUnsupportedError(ObjectStoreError):
    """The server ignores ``If-None-Match: *``: writers could silently overwrite each other."""


class KeyCollisionError(ObjectStoreError, FileExistsError):
    """A create-only PUT met an existing object with other content (412)."""


# --------------------------------------------------------------------------------------------
# root URIs


@dataclass(frozen=True)
class StoreURI:
    """A parsed store root: ``scheme`` is ``"file"`` (``path`` set) or ``"s3"`` (``bucket``, ``prefix``)."""

    scheme: str
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""

    @property
    def is_s3(self) -> bool:
        """Whether the store lives on object storage."""
        return self.scheme == "s3"

    def __str__(self) -> str:
        if self.is_s3:
            return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return str(self.path)


def parse_store_uri(uri: str | os.PathLike[str]) -> StoreURI:
    """Parse a store root: a local path, ``file://`` URI or ``s3://bucket[/prefix]``.

    Raises :class:`StoreURIError` for another scheme (``gs://``, ``http://``, …) or an ``s3://``
    URI without a bucket, naming what was given and what is accepted.
    """
    if isinstance(uri, os.PathLike):
        return StoreURI("file", path=Path(uri))
    text = str(uri).strip()
    if not text:
        raise StoreURIError("empty store root: give a directory or s3://bucket/prefix")
    # A Windows drive letter ("C:\\x") or a plain path has no "://".
    if "://" not in text:
        return StoreURI("file", path=Path(text))
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreURIError(f"file URI {text!r} names host {parsed.netloc!r}: use file:///absolute/path")
        return StoreURI("file", path=Path(unquote(parsed.path)))
    if scheme in ("s3", "s3a"):
        bucket = parsed.netloc
        if not bucket:
            raise StoreURIError(f"store URI {text!r} has no bucket: use s3://bucket/prefix")
        if not (3 <= len(bucket) <= 63):
            raise StoreURIError(f"store URI {text!r}: bucket name {bucket!r} must be 3-63 characters")
        prefix = parsed.path.strip("/")
        if any(part in (".", "..") for part in prefix.split("/")):
            raise StoreURIError(f"store URI {text!r}: '.' and '..' are not allowed in the prefix")
        return StoreURI("s3", bucket=bucket, prefix=prefix)
    raise StoreURIError(
        f"unsupported store URI scheme {parsed.scheme!r} in {text!r}: use a local directory, "
        "file:///path or s3://bucket/prefix"
    )


def is_object_store(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` names an object-storage store (``s3://``)."""
    return parse_store_uri(uri).is_s3


def split_s3(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``s3://bucket/key`` (or ``bucket/key``) -> ``(bucket, key)``.

    Also accepts ``s3:/bucket/key``: what ``pathlib.Path("s3://bucket/key")`` turns the URI into,
    so store code that joins paths with ``/`` works on S3 roots unchanged.
    """
    path = os.fspath(path)
    if path.startswith("s3://"):
        rest = path[5:]
    elif path.startswith("s3:/"):
        rest = path[4:]
    else:
        rest = path
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StoreURIError(f"{path!r} is not an s3://bucket/key path")
    return bucket, key


# --------------------------------------------------------------------------------------------
# settings


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
# the file system


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
        listing = self.walk(path)
        if not listing:
            return None
        digest = hashlib.blake2b(repr(sorted(listing)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") >> 1

    def read_bytes(self, path: str) -> bytes:
        """The whole object (``FileNotFoundError`` when absent)."""
        from botocore import exceptions as bx

        try:
            self.stats.count("get")
            return self.client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read()
        except bx.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(path) from exc
            raise self._error(exc, "get", path) from exc
        except bx.BotoCoreError as exc:
            raise self._error(exc, "get", path) from exc

    def download(self, path: str, dest: str | os.PathLike[str]) -> int:
        """Stream the object ``path`` into the local file ``dest`` (never whole in memory); returns its size.

        Raises ``FileNotFoundError`` when the object does not exist (a merge retired it).
        """
        from botocore import exceptions as bx

        try:
            self.stats.count("get")
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(path))
            n = 0
            with open(dest, "wb") as fh:
                for chunk in resp["Body"].iter_chunks(8 * 2**20):
                    fh.write(chunk)
                    n += len(chunk)
            return n
        except bx.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(path) from exc
            raise self._error(exc, "get", path) from exc
        except bx.BotoCoreError as exc:
            raise self._error(exc, "get", path) from exc

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
# writing segments: keys that cannot collide, spread over the key space


def new_writer_id(attempt: int, rank: int) -> str:
    """Writer id in the store's format (``a<attempt>r<rank>x<random>``): unique per process start."""
    return f"a{attempt:04d}r{rank:05d}x{uuid.uuid4().hex[:8]}"


def segment_key(root: StoreURI, table: str, run: str, writer_id: str, seq: int, level: int = 0) -> str:
    """The key of one segment: ``<prefix>/table=<t>/run=<r>/<writer>-<seq>-L<level>.parquet``.

    Same layout as on disk (hive partitions read by DuckDB, Spark, Trino). The file name starts
    with the writer id, so the writers of one run occupy distinct key ranges that S3 can split
    into separate partitions when the request rate of a run's prefix grows (see docs/scale.md).
    """
    parts = [root.prefix] if root.prefix else []
    parts += [f"table={table}", f"run={run}", f"{writer_id}-{seq:09d}-L{level}.parquet"]
    return "/".join(parts)


def table_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes (zstd), as the store writes segments."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=128_000)
    return sink.getvalue().to_pybytes()


class S3SegmentWriter:
    """Publishes the segments of one writer (run x attempt x rank) to an ``s3://`` store.

    Each :meth:`write` is one create-only PUT of a new key (writer id + sequence number). Call
    :meth:`start` once (bucket check + conditional-write probe) before the first write.
    """

    def __init__(self, fs: S3FS, root: str | StoreURI, run: str, attempt: int = 1, rank: int = 0) -> None:
        from healthwatch.schema import validate_run_name

        self.fs = fs
        self.root = root if isinstance(root, StoreURI) else parse_store_uri(root)
        self.run = validate_run_name(run)
        self.writer_id = new_writer_id(attempt, rank)
        self.seq = 0

    def start(self) -> None:
        """Check the bucket and that the server enforces create-only PUTs (raises a clear error if not)."""
        self.fs.probe(self.root.prefix)

    def write(self, table: str, data: pa.Table) -> str | None:
        """Publish ``data`` (schema of ``table``) as one new segment; returns its ``s3://`` path."""
        from healthwatch.schema import TABLES

        data = data.select(TABLES[table].names).cast(TABLES[table])
        if data.num_rows == 0:
            return None
        self.seq += 1
        key = segment_key(self.root, table, self.run, self.writer_id, self.seq)
        path = self.fs.uri(key)
        self.fs.put_create_only(path, table_bytes(data))
        return path


class BackgroundUploader:
    """A bounded queue and one thread that uploads: :meth:`submit` never blocks the caller.

    This is the Monitor writer's contract (drop, count, never block) for an ``s3://`` writer:
    when the queue is full, or an upload fails (server down, timeouts), the rows of that flush
    are counted in :attr:`dropped_rows` and writing goes on with the next flush.
    """

    def __init__(self, writer: S3SegmentWriter, max_queue: int = 8) -> None:
        import queue

        self.writer = writer
        self._queue: queue.Queue[tuple[str, pa.Table] | None] = queue.Queue(maxsize=max_queue)
        self.dropped_rows = 0
        self.written_rows = 0
        self.failures = 0
        self.last_error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="healthwatch-s3-writer", daemon=True)
        self._thread.start()

    def submit(self, table: str, data: pa.Table) -> bool:
        """Queue one flush; False (rows counted as dropped) when the queue is full."""
        import queue

        try:
            self._queue.put_nowait((table, data))
            return True
        except queue.Full:
            with self._lock:
                self.dropped_rows += data.num_rows
            return False

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            table, data = item
            try:
                self.writer.write(table, data)
                with self._lock:
                    self.written_rows += data.num_rows
            except (ObjectStoreError, OSError) as exc:
                with self._lock:
                    self.dropped_rows += data.num_rows
                    self.failures += 1
                    self.last_error = exc

    def close(self, timeout: float = 60.0) -> None:
        """Upload what is queued (within ``timeout``) and stop the thread."""
        import queue

        with contextlib.suppress(queue.Full):  # a wedged upload: the daemon thread dies with the process
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)


# --------------------------------------------------------------------------------------------
# reading: pyarrow datasets that DuckDB scans with pushdown


def live_segments(paths: list[str]) -> list[str]:
    """The published, not-superseded segment paths among a listing (same rules as on disk).

    Temp names (starting with ``.``) are never listed as segments; merge manifests are applied by
    the caller that can read them (see :func:`live_listing`).
    """
    return sorted(p for p in paths if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("."))


def s3_dataset(fs: S3FS, files: list[tuple[str, str, int | None]], schema: pa.Schema,
               cache: dict[str, Any] | None = None) -> Any:
    """A ``pyarrow.dataset`` over segment files ``(s3 path, run, size)`` with the ``run`` column.

    Fragments are built from the listing (sizes known, ``run`` as each fragment's partition
    expression), so opening the dataset costs no request per file; DuckDB's scan then reads only
    the row groups and columns a query needs. With ``cache`` (path -> fragment, kept by the
    caller across refreshes), each footer is read once (one GET) and kept: segments are
    immutable, so every later query prunes row groups by their statistics without refetching it.
    """
    import pyarrow.dataset as ds

    fmt = ds.ParquetFileFormat()
    afs = fs.arrow_filesystem()
    fragments = []
    for path, run, size in files:
        frag = cache.get(path) if cache is not None else None
        if frag is None:
            frag = fmt.make_fragment(fs.arrow_path(path), filesystem=afs,
                                     partition_expression=ds.field("run") == run, file_size=size)
            if cache is not None:
                frag.ensure_complete_metadata()
                cache[path] = frag
        fragments.append(frag)
    return ds.FileSystemDataset(fragments, schema.append(pa.field("run", pa.string())), fmt, afs)


def table_base(fs: S3FS, root: StoreURI, table: str) -> str:
    """The ``s3://`` folder of one table (above its ``run=`` folders)."""
    parts = [root.prefix] if root.prefix else []
    return fs.uri("/".join([*parts, f"table={table}"]))


def live_listing(fs: S3FS, root: StoreURI, table: str, sizes: dict[str, int] | None = None) -> dict[tuple[str, str], str]:
    """Live segments of ``table`` as ``{(run, name): s3 path}``: one paginated listing, manifests applied.

    Same rules as the store's own listing (``healthwatch.store.segments.list_segments``) with one
    LIST walk for every run at once (the publisher's view): temp names are never segments; the
    sources named by a merge manifest whose target exists are hidden (the merge published its
    target first). ``sizes``, when given, receives every listed object's size.
    """
    import json

    walked = fs.walk(table_base(fs, root, table))
    if sizes is not None:
        sizes.update(walked)
    listing = [p for p, _size in walked]
    names = set(listing)
    hidden: set[str] = set()
    for p in listing:
        if p.rsplit("/", 1)[-1].startswith("_merge-") and p.endswith(".json"):
            try:
                manifest = json.loads(fs.read_bytes(p))
            except (FileNotFoundError, ValueError):
                continue
            directory = p.rsplit("/", 1)[0]
            if f"{directory}/{manifest.get('target')}" in names:
                hidden.update(f"{directory}/{s}" for s in manifest.get("sources", []))
    out: dict[tuple[str, str], str] = {}
    for p in live_segments(listing):
        if p in hidden:
            continue
        folder, name = p.rsplit("/", 1)
        run = folder.rsplit("/", 1)[-1]
        if run.startswith("run="):
            out[(run[4:], name)] = p
    return out


#: Where :class:`SegmentCache` keeps local copies of ``s3://`` segments (env ``HEALTHWATCH_S3_CACHE_DIR``).
CACHE_DIR = Path(os.environ.get("HEALTHWATCH_S3_CACHE_DIR") or Path.home() / ".cache" / "healthwatch" / "s3")
#: Most bytes the cache holds (env ``HEALTHWATCH_S3_CACHE_BYTES``; 0 turns the cache off).
CACHE_BYTES = int(os.environ.get("HEALTHWATCH_S3_CACHE_BYTES", 8 * 2**30))


class SegmentCache:
    """Local copies of ``s3://`` segments, so queries on an object store run at local-disk speed.

    A published segment never changes (create-only PUTs; merges write new names and retire old
    ones), so a copy needs no invalidation: it is named by endpoint, bucket, key, size and entity
    tag, and a retired segment's copy simply stops being asked for. The reader asks for the live
    segments of a table (its scoped runs) when it builds the table's view; missing copies are
    downloaded in parallel (temp name + rename, so concurrent readers never see half a file), then
    DuckDB reads them exactly as it reads a local store (one read path). Least recently used copies
    are removed when the cache exceeds ``max_bytes``; a table that would not fit is not cached (the
    caller then scans it over HTTP). Before this cache, every query scanned raw segments over HTTP:
    a 100k-step layer series took 5.9 s on S3 against 0.64 s on disk (docs/scale.md).
    """

    def __init__(self, root: Path = CACHE_DIR, max_bytes: int = CACHE_BYTES, workers: int = 8) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.workers = workers
        self._lock = threading.Lock()
        self._sizes: dict[Path, int] | None = None  # every copy on disk -> bytes (read once, then kept)
        self.downloads = 0
        self.downloaded_bytes = 0

    @classmethod
    def from_env(cls) -> SegmentCache | None:
        """The cache configured by ``HEALTHWATCH_S3_CACHE_DIR``/``_BYTES``, or None when turned off."""
        budget = int(os.environ.get("HEALTHWATCH_S3_CACHE_BYTES", CACHE_BYTES))
        if budget <= 0:
            return None
        return cls(Path(os.environ.get("HEALTHWATCH_S3_CACHE_DIR") or CACHE_DIR), budget)

    def local_path(self, fs: S3FS, path: str) -> Path:
        """Where the copy of ``path`` lives (the key's ``table=``/``run=`` folders kept for DuckDB)."""
        key = fs._key(str(path))
        where = hashlib.blake2b((fs.endpoint or fs.region).encode(), digest_size=6).hexdigest()
        folder, _, name = key.rpartition("/")
        stem = name.removesuffix(".parquet")
        tag = fs.etags.get(fs.uri(key), "")
        tag = hashlib.blake2b(f"{fs.sizes.get(fs.uri(key))}:{tag}".encode(), digest_size=6).hexdigest()
        return self.root / where / fs.bucket / folder / f"{stem}.{tag}.parquet"

    def _index(self) -> dict[Path, int]:
        if self._sizes is None:
            sizes: dict[Path, int] = {}
            if self.root.exists():
                for f in self.root.rglob("*.parquet"):
                    with contextlib.suppress(OSError):
                        sizes[f] = f.stat().st_size
            self._sizes = sizes
        return self._sizes

    def fetch(self, fs: S3FS, paths: list[str]) -> list[Path] | None:
        """Local copies of ``paths`` (downloading the missing ones), or None when they do not fit.

        Raises ``FileNotFoundError`` when a listed object is gone (a merge retired it): the caller lists again.
        """
        from concurrent.futures import ThreadPoolExecutor

        wanted = [(p, self.local_path(fs, p)) for p in paths]
        with self._lock:
            index = self._index()
            need = sum(fs.sizes.get(fs.uri(fs._key(str(p))), 0) for p, _ in wanted)
            if need > self.max_bytes:
                return None
            missing = [(p, local) for p, local in wanted if local not in index or not local.exists()]

        def download(item: tuple[str, Path]) -> tuple[Path, int]:
            p, local = item
            data = fs.read_bytes(str(p))  # FileNotFoundError when retired meanwhile
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.partial")
            tmp.write_bytes(data)
            os.replace(tmp, local)
            return local, len(data)

        if missing:
            with ThreadPoolExecutor(max_workers=min(self.workers, len(missing))) as pool:
                got = list(pool.map(download, missing))
            with self._lock:
                for local, n in got:
                    self._index()[local] = n
                    self.downloads += 1
                    self.downloaded_bytes += n
        for _, local in wanted:  # used now: the newest in the LRU order (mtime)
            with contextlib.suppress(OSError):
                os.utime(local)
        self._evict({local for _, local in wanted})
        return [local for _, local in wanted]

    def _evict(self, keep: set[Path]) -> None:
        """Remove least recently used copies (not in ``keep``) until the cache fits its budget."""
        with self._lock:
            index = self._index()
            total = sum(index.values())
            if total <= self.max_bytes:
                return
            def age(f: Path) -> float:
                try:
                    return f.stat().st_mtime
                except OSError:
                    return 0.0
            for f in sorted((f for f in index if f not in keep), key=age):
                if total <= self.max_bytes:
                    break
                with contextlib.suppress(OSError):
                    f.unlink()
                total -= index.pop(f)


def s3_table_source(paths: list[str], schema: pa.Schema, cache: dict[str, Any],
                    in_memory_bytes: int | None = None) -> Any:
    """What the store's reader registers in DuckDB for one table of an ``s3://`` store.

    ``paths`` are the table's live segments (``s3://b/…/table=<t>/run=<r>/<name>``, or the
    ``s3:/`` spelling of ``pathlib``), as the reader listed them. Returns a ``pyarrow.dataset``
    that DuckDB scans with projection and filter pushdown (each footer read once and kept in
    ``cache``: segments are immutable), or, for a table whose objects add up to at most
    ``in_memory_bytes`` (``HEALTHWATCH_S3_MEMORY_BYTES``, 16 MiB; ``runs``/``attempts`` always),
    an Arrow table held in memory: those tables (runs, attempts, rollups, a young run) are joined by
    nearly every query, and one HTTP scan per query cost more than the query (1.7 s vs 120 ms).
    Every file is then downloaded once (``cache`` keeps its rows).
    """
    from healthwatch.store import fs as _fs

    limit = IN_MEMORY_BYTES if in_memory_bytes is None else in_memory_bytes
    fs = _fs.fs_for(paths[0])
    assert isinstance(fs, S3FS)
    files: list[tuple[str, str, int | None]] = []
    for p in paths:
        uri = fs.uri(fs._key(str(p)))
        run = uri.rsplit("/", 2)[-2]
        files.append((uri, run[4:] if run.startswith("run=") else run, fs.sizes.get(uri)))
    # ``cache`` belongs to this table: forget the segments its listing no longer has (retired by merges).
    forget_retired(cache, {path for path, _run, _size in files})
    table = uri.rsplit("/", 3)[-3] if files else ""
    known = [size for _p, _r, size in files]
    small = table.removeprefix("table=") in SMALL_TABLES or (
        None not in known and sum(s for s in known if s is not None) <= limit)
    if not small:
        return s3_dataset(fs, files, schema, cache)
    parts = []
    for path, run, size in files:
        key = "rows:" + path
        got = cache.get(key)
        if got is None:
            got = s3_dataset(fs, [(path, run, size)], schema).to_table()
            cache[key] = got
        parts.append(got)
    return pa.concat_tables(parts) if parts else schema.empty_table()


def forget_retired(cache: dict[str, Any], alive: set[str]) -> None:
    """Drop the cached footers and rows of segments no longer listed (retired by merges)."""
    for key in list(cache):
        path = key[5:] if key.startswith("rows:") else key
        if path not in alive:
            del cache[key]


def merge_s3(directory: str, sources: list[str], target_name: str, table: str,
             merge: Callable[[Any, list[Any], str, str], Any], manifest_prefix: str = "_merge-",
             leases: dict[str, S3Lease] | None = None) -> str:
    """Merge segments of one ``s3://`` directory into ``target_name``, with the store's merge protocol.

    Every merger on object storage (a writer merging its own segments, ``healthwatch compact``) holds
    the **merge lease of each source's owner** (:func:`owner_leases`; the writer id in the segment
    name) while it merges: ``leases`` when the caller took them (the compactor), else this function
    takes them without waiting and raises :class:`MergeSkipped` when one is held by a live merger (a
    writer never blocks; it merges at a later flush). Holding the leases, it lists the directory
    again and raises :class:`MergeSkipped` unless every source is still live (a merger that held them
    before may have merged them), after finishing merges that died after publishing (:func:`recover_s3`).

    The sources are downloaded to a local temp folder and merged there by ``merge`` (the writer
    passes :func:`healthwatch.store.merge.merge_files`: the same DuckDB sort and chunking as on disk;
    passed in, because the store's lower layers import this module), with the leases renewed in the
    background. Then, each step after a lease check (renewal by conditional PUT; :class:`LeaseLost`
    if a lease was broken): the manifest naming target and sources is PUT first, the target second
    (create-only), the sources are deleted third and the manifest last. A reader that lists the
    target also lists the manifest (LIST is strongly consistent on S3) and hides the sources, so it
    never counts a row twice; until the target is visible it reads the sources, which are deleted
    only after. A merger killed in between leaves either an unused manifest (target never published:
    ignored) or target + manifest + some sources (hidden by the manifest; finished by the next
    merger's :func:`recover_s3`). Returns the target's path.
    """
    import json
    from pathlib import Path

    from healthwatch.store import fs as _fs

    fs = _fs.fs_for(directory)
    assert isinstance(fs, S3FS)
    directory = str(directory).rstrip("/")
    names = [str(s).rsplit("/", 1)[-1] for s in sources]
    owners = {segment_owner(n) for n in names}
    with contextlib.ExitStack() as stack:
        held = leases if leases is not None else stack.enter_context(
            owner_leases(directory, owners, segment_owner(target_name) or f"merger{uuid.uuid4().hex[:8]}"))
        if missing := owners - set(held):
            raise MergeSkipped(f"{directory}: the merge leases of {sorted(missing)} are held by another merger")
        mine = [held[o] for o in sorted(owners)]
        live, finished = _live_names(fs, directory)
        if finished:
            recover_s3(directory)
            live, _ = _live_names(fs, directory)
        if gone := [n for n in names if n not in live]:
            raise MergeSkipped(f"{directory}: {len(gone)} of the {len(names)} sources were merged or removed "
                               f"meanwhile (e.g. {gone[0]})")
        with contextlib.ExitStack() as beating, tempfile.TemporaryDirectory(prefix="hw-merge-") as tmp:
            # The whole publish runs inside the temp folder: the merged target is streamed from disk.
            for lease in mine:
                beating.enter_context(lease.keep_alive())
            local = []
            for src in sources:
                name = str(src).rsplit("/", 1)[-1]
                fs.download(f"{directory}/{name}", Path(tmp) / name)
                local.append(Path(tmp) / name)
            data = Path(merge(Path(tmp), local, target_name, table))
            for src in local:  # the sources' copies are no longer needed: free the disk before the upload
                with contextlib.suppress(OSError):
                    src.unlink()
            for lease in mine:
                lease.check()
            manifest = fs.publish_bytes(directory, f"{manifest_prefix}{uuid.uuid4().hex}.json",
                                        json.dumps({"target": target_name, "sources": names}).encode())
            try:
                for lease in mine:
                    lease.check()
            except BaseException:
                with contextlib.suppress(ObjectStoreError):
                    fs.delete(manifest)  # unused (no target): harmless, but tidy
                raise
            target = fs.publish_bytes(directory, target_name, data)
        for name in names:
            fs.delete(f"{directory}/{name}")
        fs.delete(manifest)
    return target


# --------------------------------------------------------------------------------------------
# merge leases: who may merge which segments on object storage


#: Seconds a merge lease stays valid without renewal (env ``HEALTHWATCH_S3_LEASE_S``): how long a
#: merger that died holding one blocks the merges of those segments.
LEASE_S = float(os.environ.get("HEALTHWATCH_S3_LEASE_S", 60.0))
#: Both times of a staleness check have one-second resolution (``Last-Modified``, ``Date``).
LEASE_SLACK_S = 2.0
#: Name of the lease that serialises compactors' rollup backfill in one ``table=…/run=…`` folder.
COMPACT_LEASE = ".compact.lock"


def owner_lease_name(owner: str) -> str:
    """The lease object (in a segment's folder) that every merger of ``owner``'s segments must hold."""
    return f".merge-{owner or '_foreign'}.lock"


#: ``<writer>-<seq>[-s<lo>_<hi>]-L<level>``, as ``healthwatch.store.segments.parse_segment`` reads it
#: (not imported: the store's lower layers import this module).
_SEGMENT_NAME = re.compile(r"^(?P<writer>.+)-[0-9]+(?:-s[0-9]+_[0-9]+)?-L[0-9]+$")


def segment_owner(path: str) -> str:
    """The writer id in a segment name ``<writer>-<seq>[-s<lo>_<hi>]-L<level>.parquet`` (``""``: foreign)."""
    m = _SEGMENT_NAME.match(str(path).rsplit("/", 1)[-1].removesuffix(".parquet"))
    return m.group("writer") if m else ""


class LeaseLost(ObjectStoreError):
    """A merger no longer holds its lease (it expired and another merger took it over)."""


class MergeSkipped(ObjectStoreError):
    """A merge on object storage was not done: its lease is held by someone else, or its sources changed."""


class S3Lease:
    """A lease on one lock object, taken and kept with conditional PUTs (no lock service needed).

    * **take**: ``PUT If-None-Match: *`` of a body that names the holder, a fresh nonce and the lease
      length. The nonce makes every write's entity tag unique, so no two holders ever share a tag.
    * **break a stale lease**: GET the lock; it is stale when the server's ``Date`` minus its
      ``Last-Modified`` exceeds the lease length it states (one clock: the server's). Then
      ``PUT If-Match: <that tag>``: of several breakers exactly one succeeds, the others get 412.
    * **keep**: :meth:`renew` is ``PUT If-Match: <own tag>`` with a new nonce; 412 means the lease
      was broken and :class:`LeaseLost` is raised. A merger renews before each publish step and
      a :meth:`keep_alive` thread renews every third of the lease during long downloads and merges.
    * **release**: ``DELETE If-Match: <own tag>`` (never removes a successor's lease).
    """

    def __init__(self, fs: S3FS, path: str, holder: str, lease_s: float | None = None) -> None:
        self.fs = fs
        self.path = path
        self.holder = holder
        self.lease_s = float(LEASE_S if lease_s is None else lease_s)
        self.etag: str | None = None
        #: ``time.monotonic()`` when the last successful take/renew was sent (the lease runs from there).
        self.since = 0.0
        self.broke: str | None = None  # holder of the stale lease this one replaced, if any
        self._lock = threading.Lock()
        self._lost = False

    @property
    def held(self) -> bool:
        """Whether this lease was taken and not released or lost."""
        return self.etag is not None and not self._lost

    def _body(self) -> bytes:
        import json
        import socket

        return json.dumps({"holder": self.holder, "nonce": uuid.uuid4().hex, "lease_s": self.lease_s,
                           "host": socket.gethostname(), "pid": os.getpid()}).encode()

    def remaining(self) -> float:
        """Seconds the lease surely still runs (local monotonic clock; <= 0 when it may have expired)."""
        import time

        return self.lease_s - (time.monotonic() - self.since) if self.held else 0.0

    def acquire(self) -> bool:
        """Take the lease if it is free or stale; False (at once) when a live holder has it."""
        import json
        import time

        for _ in range(3):
            sent = time.monotonic()
            etag = self.fs.put_conditional(self.path, self._body())
            if etag is not None:
                self.etag, self.since, self._lost = etag, sent, False
                return True
            got = self.fs.get_versioned(self.path)
            if got is None:
                continue  # released between our PUT and GET: try to take it again
            body, tag, modified, now = got
            try:
                info = json.loads(body)
                lease_s = float(info.get("lease_s", LEASE_S))
                holder = str(info.get("holder", "?"))
            except (ValueError, TypeError, AttributeError):
                lease_s, holder = LEASE_S, "?"  # unreadable lock: still honour a default lease
            if now - modified <= lease_s + LEASE_SLACK_S:
                return False  # live
            sent = time.monotonic()
            etag = self.fs.put_conditional(self.path, self._body(), if_match=tag)
            if etag is None:
                return False  # another breaker (or the holder's renewal) won
            self.etag, self.since, self._lost, self.broke = etag, sent, False, holder
            import logging

            logging.getLogger("healthwatch.store").warning(
                "took over the stale merge lease %s of %s (%.0f s without renewal)", self.path, holder, now - modified)
            return True
        return False

    def renew(self) -> None:
        """Extend the lease (conditional overwrite of our own version); :class:`LeaseLost` if it was broken."""
        import time

        with self._lock:
            if self.etag is None or self._lost:
                raise LeaseLost(f"merge lease {self.path} is not held by {self.holder}")
            sent = time.monotonic()
            etag = self.fs.put_conditional(self.path, self._body(), if_match=self.etag)
            if etag is None:
                self._lost = True
                raise LeaseLost(f"merge lease {self.path} of {self.holder} was taken over by another merger "
                                f"(it went {self.lease_s:g} s without renewal)")
            self.etag, self.since = etag, sent

    def check(self, margin: float = 0.5) -> None:
        """Renew, and require that at least ``margin`` of the lease is left afterwards.

        Called right before each publish step: a process stalled so long that its own renewal took
        more than half the lease is too close to losing it to publish anything.
        """
        self.renew()
        if self.remaining() < self.lease_s * margin:
            raise LeaseLost(f"merge lease {self.path}: renewal took too long ({self.lease_s - self.remaining():.1f} s "
                            f"of a {self.lease_s:g} s lease); not publishing")

    def release(self) -> None:
        """Give the lease back (only our own version of the lock object is deleted)."""
        with self._lock:
            etag, self.etag = self.etag, None
            if etag is None or self._lost:
                return
        with contextlib.suppress(ObjectStoreError):  # an unreleased lease just expires
            self.fs.delete_if_match(self.path, etag)

    @contextlib.contextmanager
    def keep_alive(self) -> Iterator[None]:
        """Renew every third of the lease in a background thread for the duration of the block."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease_s / 3):
                try:
                    self.renew()
                except (ObjectStoreError, OSError):
                    return  # lost (or the server is away): the next check() raises

        thread = threading.Thread(target=beat, name="healthwatch-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


@contextlib.contextmanager
def owner_leases(directory: str, owners: set[str], holder: str, wait_s: float = 0.0,
                 lease_s: float | None = None) -> Iterator[dict[str, S3Lease]]:
    """Take the merge leases of ``owners`` in ``directory``; yields ``{owner: lease}`` of those taken.

    Retries the ones held by live mergers for up to ``wait_s`` seconds (a writer's own merge is short);
    releases every lease taken when the block ends.
    """
    import time

    from healthwatch.store import fs as _fs

    fs = _fs.fs_for(directory)
    assert isinstance(fs, S3FS)
    held: dict[str, S3Lease] = {}
    deadline = time.monotonic() + wait_s
    try:
        while True:
            for owner in sorted(owners - set(held)):
                lease = S3Lease(fs, f"{directory.rstrip('/')}/{owner_lease_name(owner)}", holder, lease_s)
                if lease.acquire():
                    held[owner] = lease
            if len(held) == len(owners) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        yield held
    finally:
        for lease in held.values():
            lease.release()


def _live_names(fs: S3FS, directory: str) -> tuple[set[str], dict[str, dict[str, Any]]]:
    """Names in ``directory`` that are live segments (manifests applied), and every manifest by name."""
    import json

    names = set(fs.list(directory))
    manifests: dict[str, dict[str, Any]] = {}
    for n in names:
        if n.startswith("_merge-") and n.endswith(".json"):
            try:
                manifests[n] = json.loads(fs.read_bytes(f"{directory}/{n}"))
            except (FileNotFoundError, ValueError):
                continue
    hidden = {s for m in manifests.values() if m.get("target") in names for s in m.get("sources", [])}
    live = {n for n in names if n.endswith(".parquet") and not n.startswith(".") and n not in hidden}
    return live, {n: m for n, m in manifests.items() if m.get("target") in names}


def recover_s3(directory: str) -> int:
    """Finish merges that died after publishing their target: delete their sources, then the manifest.

    Safe beside a live merger of the same manifest (both delete the same hidden sources; the
    manifest goes last, so no source is ever visible beside its target). Must run before a merge
    that may retire such a target: once the target is gone, its manifest would no longer hide the
    sources and their rows would count twice. Returns the number of manifests finished.
    """
    from healthwatch.store import fs as _fs

    fs = _fs.fs_for(directory)
    assert isinstance(fs, S3FS)
    directory = directory.rstrip("/")
    _live, done = _live_names(fs, directory)
    for name, manifest in done.items():
        for src in manifest.get("sources", []):
            fs.delete(f"{directory}/{src}")
        fs.delete(f"{directory}/{name}")
    return len(done)
