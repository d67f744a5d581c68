"""Alertmanager sink: alert transitions go to Alertmanager's v2 API (``POST /api/v2/alerts``).

Teams keep their routing, grouping, silences and inhibition. Each firing transition becomes an
alert with labels ``alertname``, ``run``, ``layer`` (per-layer rules), ``severity``, ``group`` and
the rule's own labels; annotations ``summary``/``description`` (plus step, tokens, value), and
``generatorURL`` pointing at the app's Run page at that step. A resolution re-posts the same
labels with ``endsAt`` set. Pending and inactive transitions are not sent: Alertmanager only
knows firing alerts.

Like Prometheus, the sink re-posts alerts still firing every ``resend_interval`` seconds so that
Alertmanager (whose ``resolve_timeout`` would otherwise end them) keeps them open.

Delivery retries with exponential backoff; retries and failures are counted. When Alertmanager
stays unreachable, :meth:`AlertmanagerSink.send` raises :class:`AlertmanagerUnreachable` naming
the URL (the evaluator logs it and goes on); the transitions are already in the store's
``alerts`` table, and the undelivered ones are kept (bounded) and sent with the next delivery.

In ``healthwatch alerts watch`` the sink is chosen by a ``--notify`` URL with scheme
``alertmanager://host:port`` (``alertmanager+https://…`` for TLS), optionally with
``?app_url=http://app-host:8501`` for the Run-page links.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from healthwatch.alerts.transition import Transition

log = logging.getLogger("healthwatch.alerts")

#: Schemes of ``--notify`` URLs that mean "this Alertmanager".
SCHEMES = ("alertmanager", "alertmanager+http", "alertmanager+https")


class AlertmanagerUnreachable(RuntimeError):
    """Alertmanager did not accept alerts after every retry."""


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.UTC).isoformat().replace("+00:00", "Z")


def parse_alertmanager_url(url: str) -> tuple[str, str | None]:
    """``alertmanager://host:port[/prefix]?app_url=…`` -> (``http://host:port[/prefix]``, app URL or None)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"not an Alertmanager URL (scheme must be one of {', '.join(SCHEMES)}): {url}")
    if not parts.netloc:
        raise ValueError(f"Alertmanager URL without host:port: {url}")
    scheme = "https" if parts.scheme.endswith("https") else "http"
    app_url = parse_qs(parts.query).get("app_url", [None])[0]
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}", app_url


class AlertmanagerSink:
    """Posts firing and resolved transitions to an Alertmanager (v2 API).

    Args:
        url: Alertmanager base URL (``http://127.0.0.1:9093``) or an ``alertmanager://`` URL.
        app_url: base URL of the healthwatch app, for ``generatorURL`` links to the Run page.
        timeout: seconds per HTTP request.
        retries: attempts per delivery beyond the first.
        backoff: first retry delay in seconds (doubles each retry, capped at 30 s).
        resend_interval: re-post alerts still firing this often (seconds; 0 disables).
        max_pending: bound on undelivered alerts kept for the next delivery.
    """

    name = "alertmanager"

    def __init__(self, url: str, app_url: str | None = None, timeout: float = 5.0, retries: int = 4,
                 backoff: float = 0.5, resend_interval: float = 60.0, max_pending: int = 10_000) -> None:
        if urlsplit(url).scheme in SCHEMES:
            url, from_url = parse_alertmanager_url(url)
            app_url = app_url or from_url
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise ValueError(f"Alertmanager URL must be http(s)://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.app_url = app_url.rstrip("/") if app_url else None
        self.timeout, self.retries, self.backoff = timeout, max(0, int(retries)), backoff
        self.resend_interval = resend_interval
        self.max_pending = max_pending
        #: Counters: alerts delivered, HTTP retries, deliveries that failed after every retry.
        self.sent = 0
        self.retried = 0
        self.failed = 0
        self._firing: dict[str, dict[str, Any]] = {}
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- payload -------------------------------------------------------------------------------
    def link(self, t: Transition) -> str | None:
        """The app's Run page at the transition's step, or None without ``app_url``."""
        if not self.app_url:
            return None
        return f"{self.app_url}/run?run={quote(t.run)}&step={int(t.step)}"

    def payload(self, t: Transition) -> dict[str, Any]:
        """The v2 ``PostableAlert`` of a firing or resolved transition."""
        labels = {k: str(v) for k, v in t.labels.items() if v is not None}
        labels.update({"alertname": t.alert, "run": t.run, "severity": t.severity})
        if t.group:
            labels["group"] = t.group
        if t.layer is not None:
            labels["layer"] = str(t.layer)
        annotations = {k: str(v) for k, v in t.annotations.items()}
        annotations["summary"] = t.summary
        annotations["step"] = str(int(t.step))
        if t.tokens is not None:
            annotations["tokens"] = str(int(t.tokens))
        if t.value is not None:
            annotations["value"] = repr(t.value) if not math.isfinite(t.value) else f"{t.value:.6g}"
        link = self.link(t)
        if link:
            annotations["link"] = link
        now = time.time()
        body: dict[str, Any] = {"labels": labels, "annotations": annotations}
        if link:
            body["generatorURL"] = link
        when = t.wall_time or now
        if t.state == "firing":
            body["startsAt"] = _iso(when)
        else:  # resolved: the same labels with an end time ends the alert in Alertmanager
            prior = self._firing.get(t.fingerprint)
            body["startsAt"] = prior["startsAt"] if prior else _iso(min(when, now))
            body["endsAt"] = _iso(min(when, now))
        return body

    # -- delivery ------------------------------------------------------------------------------
    def send(self, transitions: Sequence[Transition]) -> None:
        """Post the firing and resolved transitions (and earlier undelivered ones); raise when unreachable."""
        batch = []
        with self._lock:
            for t in transitions:
                if t.state not in ("firing", "resolved"):
                    continue
                body = self.payload(t)
                if t.state == "firing":
                    self._firing[t.fingerprint] = body
                else:
                    self._firing.pop(t.fingerprint, None)
                batch.append(body)
            if not batch and not self._pending:
                return
            batch = self._pending + batch
            self._pending = []
        try:
            self._post(batch)
        except AlertmanagerUnreachable:
            with self._lock:
                self._pending = (batch + self._pending)[-self.max_pending:]
            raise
        if self.resend_interval > 0 and self._firing and self._thread is None:
            self._thread = threading.Thread(target=self._resend_loop, name="healthwatch-alertmanager", daemon=True)
            self._thread.start()

    def _post(self, alerts: list[dict[str, Any]]) -> None:
        data = json.dumps(alerts).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                time.sleep(min(30.0, self.backoff * 2 ** (attempt - 1)))
            req = urllib.request.Request(f"{self.url}/api/v2/alerts", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    resp.read()
                self.sent += len(alerts)
                return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
                if 400 <= exc.code < 500 and exc.code != 429:
                    break  # a rejected payload will not be accepted by retrying
            except (urllib.error.URLError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
        self.failed += 1
        raise AlertmanagerUnreachable(
            f"Alertmanager at {self.url} did not accept {len(alerts)} alert(s) after {attempt + 1} tries ({last}); "
            "the transitions are kept in the store's alerts table and will be re-sent with the next delivery"
        )

    def _resend_loop(self) -> None:
        while not self._stop.wait(self.resend_interval):
            with self._lock:
                alive = list(self._firing.values())
            if not alive:
                continue
            try:
                self._post(alive)
            except AlertmanagerUnreachable as exc:
                log.error("%s", exc)

    def close(self) -> None:
        """Stop re-posting firing alerts."""
        self._stop.set()
