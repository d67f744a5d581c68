"""healthwatch: training-health observability for hybrid Mamba-Transformer MoE pretraining.

>>> import healthwatch as hw
>>> mon = hw.Monitor(store="hw-store", run="ultra-nvfp4", precision="nvfp4")  # doctest: +SKIP
>>> store = hw.open_store("hw-store")                                         # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from healthwatch.schema import SCHEMA_VERSION, NewerSchemaError, SchemaError
from healthwatch.store import Store, StoreWriter, compact_store, open_store

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "Monitor",
    "NewerSchemaError",
    "SchemaError",
    "Store",
    "StoreWriter",
    "__version__",
    "compact_store",
    "open_store",
]

if TYPE_CHECKING:
    from healthwatch.hooks.monitor import Monitor


def __getattr__(name: str) -> Any:
    # Monitor pulls in torch; importing it lazily keeps `healthwatch runs` and the app light.
    if name == "Monitor":
        from healthwatch.hooks.monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'healthwatch' has no attribute {name!r}")
