"""healthwatch: training-health observability for hybrid Mamba-Transformer MoE pretraining.

>>> import healthwatch as hw
>>> mon = hw.Monitor(store="hw-store", run="ultra-nvfp4", precision="nvfp4")  # doctest: +SKIP
>>> store = hw.open_store("hw-store")                                         # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from healthwatch import plugins
from healthwatch.schema import SCHEMA_VERSION, NewerSchemaError, SchemaError
from healthwatch.store import Store, StoreWriter, compact_store, open_store

# The wiring between subsystems, as names resolved on first use (nothing is imported here):
# ``Monitor(alerts=...)`` builds its after-flush evaluator with the alert engine's factory, and
# ``auto_adapter`` tries the demo model's adapter. The Monitor itself imports neither.
plugins.register(plugins.AFTER_FLUSH, "rules", "healthwatch.alerts:monitor_evaluator")
plugins.register(plugins.ADAPTERS, "reference", "healthwatch.demo.adapter:ReferenceAdapter")

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "Monitor",
    "MonitorConfig",
    "NewerSchemaError",
    "SchemaError",
    "Store",
    "StoreWriter",
    "__version__",
    "compact_store",
    "open_store",
]

if TYPE_CHECKING:
    from healthwatch.hooks.config import MonitorConfig
    from healthwatch.hooks.monitor import Monitor


def __getattr__(name: str) -> Any:
    # Monitor pulls in torch; importing it lazily keeps `healthwatch runs` and the app light.
    if name == "Monitor":
        from healthwatch.hooks.monitor import Monitor

        return Monitor
    if name == "MonitorConfig":
        from healthwatch.hooks.config import MonitorConfig

        return MonitorConfig
    if name == "integrations":
        # Trainer callbacks (HF, Lightning); each framework loads only when its callback is used.
        import healthwatch.hooks.integrations as integrations

        return integrations
    raise AttributeError(f"module 'healthwatch' has no attribute {name!r}")
