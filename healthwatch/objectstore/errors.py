"""Errors of object storage: one clear message per way a server or its settings can refuse us."""

from __future__ import annotations


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
