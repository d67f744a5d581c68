"""Store root URIs: a local path, ``file://`` or ``s3://bucket/prefix``; parsing and splitting."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from healthwatch.objectstore.errors import StoreURIError


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
