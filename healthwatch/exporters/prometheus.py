"""Prometheus exposition of a healthwatch store (``healthwatch metrics``).

A background thread re-reads the store every ``interval`` seconds through
:class:`~healthwatch.exporters.source.StoreSource` (the effective path, never the training
thread); the text of each snapshot is rendered once, and a scrape of ``/metrics`` sends those
bytes, so its cost does not grow with the store.

Series per run (independent of the number of experts; never per expert, never per layer):

* ``healthwatch_scalar{run,name}``: the latest value of each scalar (``loss/train``,
  ``loss/mtp_1``, ``grad_norm/total``, …): one series per scalar name;
* ``healthwatch_layer_max{run,metric}``, ``healthwatch_layer_median{run,metric}``,
  ``healthwatch_layer_argmax{run,metric}`` (the layer index holding the max) and
  ``healthwatch_layer_step{run,metric}``: four series per layer metric (``maxvio``,
  ``dead_experts``, ``resid_rms``, ``resid_rms_max``, ``wgrad_norm``);
* ``healthwatch_last_step``, ``healthwatch_last_tokens``,
  ``healthwatch_last_step_timestamp_seconds`` and ``healthwatch_run_info{parent,precision}``;
* ``healthwatch_alert_state{run,alertname,group,severity,layer}``: 0 inactive/resolved,
  1 pending, 2 firing, one series per alert instance ever recorded (at most rules x (layers + 1)).

So a run costs ``S + 4 M + 4 + A`` series: with ~300 scalars, 5 layer metrics and no alerts,
about 324, whatever the expert count or depth.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from healthwatch.exporters.source import Snapshot, StoreSource

log = logging.getLogger("healthwatch.exporters")

#: Numeric value of each alert state in ``healthwatch_alert_state``.
ALERT_STATE_VALUE = {"inactive": 0.0, "resolved": 0.0, "pending": 1.0, "firing": 2.0}

#: Every metric name the exporter can emit (the Grafana dashboard test checks its queries against these).
METRIC_NAMES = (
    "healthwatch_scalar",
    "healthwatch_layer_max",
    "healthwatch_layer_median",
    "healthwatch_layer_argmax",
    "healthwatch_layer_step",
    "healthwatch_last_step",
    "healthwatch_last_tokens",
    "healthwatch_last_step_timestamp_seconds",
    "healthwatch_run_info",
    "healthwatch_alert_state",
    "healthwatch_exporter_refreshes_total",
    "healthwatch_exporter_refresh_errors_total",
    "healthwatch_exporter_refresh_duration_seconds",
    "healthwatch_exporter_last_refresh_timestamp_seconds",
)


class StoreCollector(Collector):
    """A prometheus-client collector serving the latest :class:`Snapshot` of a store.

    Call :meth:`refresh` (or :meth:`start` for a background thread) to re-read the store.
    """

    def __init__(self, source: StoreSource) -> None:
        self.source = source
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()
        self.refreshes = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_duration = 0.0
        self.last_refresh: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._text: tuple[tuple[int, int], bytes] | None = None  # ((refreshes, errors), rendered text)

    def exposition(self) -> bytes:
        """The text exposition of the current snapshot, rendered once per refresh (a scrape copies bytes)."""
        key = (self.refreshes, self.errors)
        cached = self._text
        if cached is not None and cached[0] == key:
            return cached[1]
        body = generate_latest(make_registry(self))
        self._text = (key, body)
        return body

    def refresh(self) -> Snapshot:
        """Read the store now and make the result what scrapes see; returns it."""
        t0 = time.perf_counter()
        try:
            snap = self.source.snapshot()
        except Exception as exc:
            # Keep serving the last good snapshot; the error counter tells Prometheus.
            self.errors += 1
            self.last_error = str(exc)
            raise
        with self._lock:
            self._snapshot = snap
            self.refreshes += 1
            self.last_duration = time.perf_counter() - t0
            self.last_refresh = time.time()
        return snap

    def start(self, interval: float) -> None:
        """Refresh every ``interval`` seconds in a daemon thread (first refresh done before returning)."""
        try:
            self.refresh()
        except Exception as exc:  # noqa: BLE001 - the thread retries; the error is counted
            log.error("reading the store failed: %s", exc)
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="healthwatch-metrics", daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - a transient read error must not kill the exporter
                log.error("reading the store failed: %s", exc)

    def stop(self) -> None:
        """Stop the refresh thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def collect(self) -> Iterator[Metric]:
        """Metric families of the current snapshot (called by prometheus-client at each scrape)."""
        with self._lock:
            snap = self._snapshot
            stats = (self.refreshes, self.errors, self.last_duration, self.last_refresh)
        yield from _families(snap)
        refreshes, errors, duration, last = stats
        c = CounterMetricFamily("healthwatch_exporter_refreshes", "Reads of the store by the exporter.")
        c.add_metric([], refreshes)
        yield c
        c = CounterMetricFamily("healthwatch_exporter_refresh_errors", "Failed reads of the store.")
        c.add_metric([], errors)
        yield c
        g = GaugeMetricFamily("healthwatch_exporter_refresh_duration_seconds", "Duration of the last store read.")
        g.add_metric([], duration)
        yield g
        if last is not None:
            g = GaugeMetricFamily("healthwatch_exporter_last_refresh_timestamp_seconds",
                                  "Unix time of the last successful store read.")
            g.add_metric([], last)
            yield g


def _families(snap: Snapshot | None) -> Iterator[Metric]:
    if snap is None:
        return
    scalar = GaugeMetricFamily("healthwatch_scalar", "Latest value of a healthwatch scalar (effective path).",
                               labels=["run", "name"])
    lmax = GaugeMetricFamily("healthwatch_layer_max", "Max over layers of a layer metric at its latest step.",
                             labels=["run", "metric"])
    lmed = GaugeMetricFamily("healthwatch_layer_median", "Median over layers of a layer metric at its latest step.",
                             labels=["run", "metric"])
    larg = GaugeMetricFamily("healthwatch_layer_argmax", "Layer index holding the max of a layer metric.",
                             labels=["run", "metric"])
    lstep = GaugeMetricFamily("healthwatch_layer_step", "Step of the latest values of a layer metric.",
                              labels=["run", "metric"])
    step = GaugeMetricFamily("healthwatch_last_step", "Newest training step logged (effective path).", labels=["run"])
    tokens = GaugeMetricFamily("healthwatch_last_tokens", "Cumulative tokens at the newest step.", labels=["run"])
    stamp = GaugeMetricFamily("healthwatch_last_step_timestamp_seconds",
                              "Unix time the newest scalar row was logged (stall detection).", labels=["run"])
    info = GaugeMetricFamily("healthwatch_run_info", "Lineage of a run (always 1).",
                             labels=["run", "parent", "precision"])
    for rs in snap.runs.values():
        info.add_metric([rs.run, rs.parent or "", rs.precision or ""], 1.0)
        for name, value in sorted(rs.scalars.items()):
            scalar.add_metric([rs.run, name], value)
        for metric, agg in sorted(rs.layers.items()):
            lmax.add_metric([rs.run, metric], agg.max)
            lmed.add_metric([rs.run, metric], agg.median)
            larg.add_metric([rs.run, metric], float(agg.argmax_layer))
            lstep.add_metric([rs.run, metric], float(agg.step))
        if rs.last_step is not None:
            step.add_metric([rs.run], float(rs.last_step))
            tokens.add_metric([rs.run], float(rs.last_tokens or 0))
        if rs.last_write is not None:
            stamp.add_metric([rs.run], rs.last_write)
    alert = GaugeMetricFamily("healthwatch_alert_state",
                              "State of a healthwatch alert instance: 0 inactive/resolved, 1 pending, 2 firing.",
                              labels=["run", "alertname", "group", "severity", "layer"])
    for a in snap.alerts:
        alert.add_metric([a.run, a.alert, a.group, a.severity, "" if a.layer is None else str(a.layer)],
                         ALERT_STATE_VALUE.get(a.state, 0.0))
    yield from (scalar, lmax, lmed, larg, lstep, step, tokens, stamp, info, alert)


def make_registry(collector: StoreCollector) -> CollectorRegistry:
    """A registry holding only ``collector`` (no process metrics of the exporter itself)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(collector: StoreCollector) -> bytes:
    """The text exposition of ``collector`` as a scrape would return it."""
    return generate_latest(make_registry(collector))


class MetricsServer:
    """``/metrics`` over HTTP for a store: a :class:`StoreCollector` refreshed in the background.

    Binds ``host`` (default 127.0.0.1); ``port=0`` picks a free port (see :attr:`port`). A port
    in use raises ``OSError`` naming it.
    """

    def __init__(self, store: Any = None, host: str = "127.0.0.1", port: int = 9464, interval: float = 5.0,
                 runs: Sequence[str] | None = None) -> None:
        self.source = StoreSource(store, runs=runs)
        self.collector = StoreCollector(self.source)
        self.host, self.interval = host, interval
        self._requested_port = port
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        """Read the store once, then serve; returns self."""
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from prometheus_client import CONTENT_TYPE_LATEST

        collector = self.collector

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                body = collector.exposition()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes every few seconds: no access log
                pass

        try:
            self._server = ThreadingHTTPServer((self.host, self._requested_port), Handler)
        except OSError as exc:
            raise OSError(f"cannot serve /metrics on {self.host}:{self._requested_port}: {exc.strerror or exc}") from exc
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.collector.start(self.interval)
        self._thread = threading.Thread(target=self._server.serve_forever, name="healthwatch-metrics-http", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        """The ``/metrics`` URL."""
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and refreshing; close the store."""
        self.collector.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.source.close()

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
