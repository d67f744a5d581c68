"""Where notifications go: console (rich), a JSON-lines file, apprise URLs, or a Python callback.

A sink is any object with ``send(transitions)``; the evaluator calls it with the transitions it
owns, filtered by each rule's ``notify`` states. Sinks never raise into the evaluator (it logs
and goes on), and URLs are only ever logged with their secrets masked (:func:`redact_url`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console

from healthwatch.alerts.transition import Transition

log = logging.getLogger("healthwatch.alerts")


class Sink(Protocol):
    """Anything that can receive transitions."""

    def send(self, transitions: Sequence[Transition]) -> None:
        """Deliver ``transitions`` (called from the evaluator's thread)."""


def _mask_path(path: str) -> str:
    """``path`` with every segment that looks like a token (8+ letters/digits/``_-``) masked."""
    return "/".join(re.sub(r"^[A-Za-z0-9_\-]{8,}$", "****", seg) for seg in path.split("/"))


_TOKENISH = re.compile(r"^[A-Za-z0-9_\-.~%+=]{8,}$")
#: Loggers that print notification URLs while sending (apprise at DEBUG, urllib3's request lines).
_NOISY_LOGGERS = ("apprise", "urllib3.connectionpool")


class _SecretFilter(logging.Filter):
    """Masks registered secrets in records of the loggers apprise and urllib3 write to."""

    def __init__(self) -> None:
        super().__init__("healthwatch-secrets")
        self.secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secrets: Iterable[str]) -> None:
        with self._lock:
            self.secrets.update(x for x in secrets if x)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is not ours to fix
            return True
        masked = msg
        for secret in sorted(self.secrets, key=len, reverse=True):
            if secret in masked:
                masked = masked.replace(secret, "****")
        if masked != msg:
            record.msg, record.args = masked, ()
        return True


_FILTER = _SecretFilter()
for _name in _NOISY_LOGGERS:
    logging.getLogger(_name).addFilter(_FILTER)


def _secrets_of(url: str) -> list[str]:
    """The parts of ``url`` that may be credentials: the password, token-like host/path parts and
    query values (8+ characters), in both their raw and percent-decoded forms."""
    from urllib.parse import unquote

    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found: list[str] = []
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            found.append(user.split(":", 1)[1])
        netloc = host
    host = netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc
    if "." not in host and host != "localhost" and _TOKENISH.match(host):
        found.append(host)  # slack://T0000/B0000/XXXX: the "host" is a token
    found += [seg for seg in parts.path.split("/") if _TOKENISH.match(seg)]
    found += [kv.split("=", 1)[1] for kv in parts.query.split("&") if "=" in kv and len(kv.split("=", 1)[1]) >= 8]
    return [y for x in found for y in {x, unquote(x)} if len(y) >= 4]


def redact_url(url: str) -> str:
    """``url`` with passwords, tokens and query values masked, safe for logs.

    Uses apprise's own privacy rendering when it understands the URL (it knows which path parts
    of e.g. a Slack URL are tokens); otherwise masks the password, every path segment that looks
    like a token (8+ characters of letters/digits) and every query value. The URL's secrets are
    also registered with a logging filter so that apprise's and urllib3's own debug lines (which
    print the URL it sends to) show them masked.
    """
    _FILTER.add(_secrets_of(url))
    try:
        import apprise

        obj = apprise.Apprise.instantiate(url, suppress_exceptions=True)
        if obj:
            private = urlsplit(str(obj.url(privacy=True)))
            # apprise keeps the path of generic webhooks (json://host/<token>/…) as it is: mask
            # token-like segments there too.
            return urlunsplit(private._replace(path=_mask_path(private.path)))
    except Exception:  # noqa: BLE001 - fall back to the generic masking
        pass
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        name = user.split(":", 1)[0]
        netloc = f"{name}:****@{host}" if ":" in user else f"****@{host}"
    path = _mask_path(parts.path)
    query = "&".join(f"{kv.split('=', 1)[0]}=****" if "=" in kv else kv for kv in parts.query.split("&") if kv)
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def _title(t: Transition) -> str:
    return f"[{t.severity.upper()}] {t.alert} {t.state} on {t.run}"


def _body(t: Transition) -> str:
    lines = [t.summary]
    if t.annotations.get("description"):
        lines.append(t.annotations["description"])
    val = "no value recorded" if t.value is None else f"value {t.value:.6g}"
    where = f", layer {t.layer}" if t.layer is not None else ""
    tokens = "tokens unknown" if t.tokens is None else f"tokens {t.tokens:,}"
    lines.append(f"step {t.step:,}, {tokens}{where}, {val}")
    if t.detail:
        lines.append(t.detail)
    extra = {k: v for k, v in t.labels.items() if k not in ("alertname", "run", "severity", "group", "layer")}
    if extra:
        lines.append("labels: " + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    for key, text in sorted(t.annotations.items()):
        if key not in ("summary", "description"):
            lines.append(f"{key}: {text}")
    return "\n".join(lines)


class ConsoleSink:
    """Prints each transition as one coloured line (rich)."""

    name = "console"
    _STYLE = {"firing": "bold red", "pending": "yellow", "resolved": "green", "inactive": "dim"}

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    def send(self, transitions: Sequence[Transition]) -> None:
        """Print the transitions."""
        for t in transitions:
            style = self._STYLE.get(t.state, "")
            sev = {"critical": "bold red", "warning": "yellow"}.get(t.severity, "cyan")
            self.console.print(
                f"[{style}]{t.state:>8}[/] [{sev}]{t.severity}[/] [bold]{t.alert}[/] {t.run} "
                f"step {t.step:,}: {t.summary}", highlight=False,
            )


class JsonlSink:
    """Appends one JSON object per transition to a file (``Transition.to_json``)."""

    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def send(self, transitions: Sequence[Transition]) -> None:
        """Append the transitions."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(t.to_json(), sort_keys=True) + "\n" for t in transitions)
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()


class AppriseSink:
    """Sends each transition to apprise URLs (``slack://…``, ``mailto://…``, ``json://host/path`` …).

    One notification per transition: its title is ``[SEVERITY] Alert state on run``, the body the
    summary, step/tokens/layer/value and the annotations. Firing critical alerts go out as apprise
    ``failure``, firing others as ``warning``, resolutions as ``success``.
    """

    name = "apprise"

    def __init__(self, urls: Iterable[str], timeout: float = 10.0) -> None:
        import apprise

        self.urls = list(urls)
        for url in self.urls:
            _FILTER.add(_secrets_of(url))
        self._apprise = apprise.Apprise()
        self._notify_type = apprise.NotifyType
        bad = []
        for url in self.urls:
            obj = apprise.Apprise.instantiate(url, suppress_exceptions=True)
            if not obj:
                bad.append(redact_url(url))
                continue
            # Bound how long a slow receiver can hold up the evaluator (connect, read).
            for attr, val in (("socket_connect_timeout", timeout), ("socket_read_timeout", timeout)):
                if hasattr(obj, attr):
                    setattr(obj, attr, val)
            self._apprise.add(obj)
        if bad:
            raise ValueError(f"apprise does not understand these notification URLs: {', '.join(bad)}")

    def _type(self, t: Transition) -> Any:
        nt = self._notify_type
        if t.state == "resolved":
            return nt.SUCCESS
        if t.state == "firing":
            return nt.FAILURE if t.severity == "critical" else nt.WARNING
        return nt.INFO

    def send(self, transitions: Sequence[Transition]) -> None:
        """Notify every URL of each transition; failures are logged with redacted URLs."""
        for t in transitions:
            ok = self._apprise.notify(title=_title(t), body=_body(t), notify_type=self._type(t))
            if not ok:
                log.error("notification of %s %s to %s failed", t.alert, t.state,
                          ", ".join(redact_url(u) for u in self.urls))


class CallbackSink:
    """Calls ``fn(transition)`` for each transition (a trainer's ``on_alert``)."""

    name = "callback"

    def __init__(self, fn: Callable[[Transition], Any]) -> None:
        self.fn = fn

    def send(self, transitions: Sequence[Transition]) -> None:
        """Call the function once per transition (an exception stops only that call)."""
        for t in transitions:
            try:
                self.fn(t)
            except Exception as exc:  # noqa: BLE001 - a callback bug must not break alerting
                log.error("alert callback raised: %s", exc)


def make_sinks(notify: Iterable[str] = (), jsonl: str | os.PathLike[str] | None = None, console: bool = True,
               rich_console: Console | None = None) -> list[Any]:
    """Sinks for the CLI: the console, an optional JSON-lines file, and apprise for ``notify`` URLs.

    ``alertmanager://host:port[?app_url=…]`` URLs go to an Alertmanager (v2 API) instead of apprise.
    """
    from healthwatch.alerts.alertmanager import SCHEMES, AlertmanagerSink

    sinks: list[Any] = []
    if console:
        sinks.append(ConsoleSink(rich_console))
    if jsonl:
        sinks.append(JsonlSink(jsonl))
    am = [u for u in notify if u and urlsplit(u).scheme in SCHEMES]
    sinks.extend(AlertmanagerSink(u) for u in am)
    urls = [u for u in notify if u and u not in am]
    if urls:
        sinks.append(AppriseSink(urls))
    return sinks
