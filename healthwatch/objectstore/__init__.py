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

Modules (one job each; each imports only those above it in this list):

* :mod:`~healthwatch.objectstore.errors`: one exception per way object storage refuses us;
* :mod:`~healthwatch.objectstore.uri`: root URIs (local path, ``file://``, ``s3://bucket/prefix``);
* :mod:`~healthwatch.objectstore.s3fs`: :class:`S3FS`, the create-only S3 file system, its settings;
* :mod:`~healthwatch.objectstore.writing`: segment keys and writers without a Monitor;
* :mod:`~healthwatch.objectstore.reading`: pyarrow datasets for DuckDB, :class:`SegmentCache`;
* :mod:`~healthwatch.objectstore.leases`: merge leases (lock objects under conditional PUTs);
* :mod:`~healthwatch.objectstore.merging`: merges under the store's manifest protocol and leases.

Settings read from the environment are module constants of the module that uses them (e.g.
``reading.IN_MEMORY_BYTES``): patch them there, not on this package.
"""

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
from healthwatch.objectstore.leases import (
    COMPACT_LEASE,
    LEASE_S,
    LEASE_SLACK_S,
    LeaseLost,
    MergeSkipped,
    S3Lease,
    owner_lease_name,
    owner_leases,
    segment_owner,
)
from healthwatch.objectstore.merging import (
    merge_s3,
    recover_s3,
)
from healthwatch.objectstore.reading import (
    CACHE_BYTES,
    CACHE_DIR,
    IN_MEMORY_BYTES,
    SMALL_TABLES,
    RangeFile,
    SegmentCache,
    forget_retired,
    live_listing,
    live_segments,
    s3_dataset,
    s3_table_source,
    table_base,
)
from healthwatch.objectstore.s3fs import (
    DEFAULT_REGION,
    ENV_ENDPOINT,
    PROBE_DIR,
    S3FS,
    RequestStats,
    S3Settings,
    endpoint_from_env,
)
from healthwatch.objectstore.uri import (
    StoreURI,
    is_object_store,
    parse_store_uri,
    split_s3,
)
from healthwatch.objectstore.writing import (
    BackgroundUploader,
    S3SegmentWriter,
    new_writer_id,
    segment_key,
    table_bytes,
)

__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "ConditionalWriteUnsupportedError",
    "CredentialsError",
    "EndpointUnreachableError",
    "KeyCollisionError",
    "ObjectStoreError",
    "StoreURIError",
    "StoreURI",
    "is_object_store",
    "parse_store_uri",
    "split_s3",
    "DEFAULT_REGION",
    "ENV_ENDPOINT",
    "PROBE_DIR",
    "RequestStats",
    "S3FS",
    "S3Settings",
    "endpoint_from_env",
    "BackgroundUploader",
    "S3SegmentWriter",
    "new_writer_id",
    "segment_key",
    "table_bytes",
    "CACHE_BYTES",
    "CACHE_DIR",
    "IN_MEMORY_BYTES",
    "SMALL_TABLES",
    "RangeFile",
    "SegmentCache",
    "forget_retired",
    "live_listing",
    "live_segments",
    "s3_dataset",
    "s3_table_source",
    "table_base",
    "COMPACT_LEASE",
    "LEASE_S",
    "LEASE_SLACK_S",
    "LeaseLost",
    "MergeSkipped",
    "S3Lease",
    "owner_lease_name",
    "owner_leases",
    "segment_owner",
    "merge_s3",
    "recover_s3",
]
