"""Import Megatron-style TensorBoard event files as a healthwatch run.

``healthwatch import tensorboard LOGDIR --run NAME`` reads every event file under ``LOGDIR``
(recursively) and writes one run (one attempt, reason ``import``) so that old runs can be looked
at, compared and backtested like live ones.

Tag mapping (matching ignores case, and ``-``/``_``/space differences):

=======================================  ==========================================
TensorBoard tag                          healthwatch
=======================================  ==========================================
``lm loss``, ``loss``, ``train/loss``    scalar ``loss/train``
``mtp_1 loss``, ``mtp/loss_2``, …        scalar ``loss/mtp_1``, ``loss/mtp_2``, …
``lm loss validation``                   scalar ``loss/val``
``grad-norm``                            scalar ``grad_norm/total``
``learning-rate``                        scalar ``lr``
``layer_3/maxvio``, ``moe/layer_3_maxvio``,
``maxvio/layer_3``                       layer 3, metric ``maxvio`` (also ``dead_experts``,
                                         ``resid_rms`` ← ``resid_norm``, ``resid_rms_max``,
                                         ``wgrad_norm`` ← ``grad_norm``/``grad-norm``)
``consumed-tokens``, ``tokens``          the ``tokens`` column (not a scalar)
``… vs samples``                         skipped (the same series on a samples axis)
anything else                            scalar with a sanitised name (``loss-scale``,
                                         ``moe/load_balancing_loss_layer_0``, …)
=======================================  ==========================================

Tokens: from a tokens tag when there is one; else ``samples × seq_length`` when the logdir has
Megatron's ``… vs samples`` tags and the sequence length is known (the ``seq_length`` text tag
Megatron writes with ``--log-args-to-tensorboard``, or ``seq_length=``); else the step.

Layer types: a layer with MaxVio / dead-expert tags is ``moe``; other layers take their type from
``layer_pattern`` (Megatron's ``hybrid_override_pattern`` letters ``M * E -``, also read from the
logdir's text tags) or default to ``attention`` (a GPT block is attention + MLP).
"""

from __future__ import annotations

import bisect
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from healthwatch.schema import validate_run_name
from healthwatch.store import StoreWriter, attempt_row, default_store_path, init_store, run_row
from healthwatch.store.segments import list_segments, table_dir

#: Rows per segment written; large imports become several segments, merged at the end.
CHUNK_ROWS = 250_000

_SEP = re.compile(r"[\s_\-]+")
_BAD = re.compile(r"[^A-Za-z0-9_.:/+-]+")


def _key(tag: str) -> str:
    """Normalised tag for matching: lower case, runs of space/``-``/``_`` → ``_``."""
    return _SEP.sub("_", tag.strip().lower())


#: Normalised tag → healthwatch scalar name.
SCALAR_TAGS: dict[str, str] = {
    "lm_loss": "loss/train",
    "loss": "loss/train",
    "train/loss": "loss/train",
    "train/lm_loss": "loss/train",
    "train_loss": "loss/train",
    "training_loss": "loss/train",
    "lm_loss_validation": "loss/val",
    "validation/lm_loss": "loss/val",
    "val/loss": "loss/val",
    "lm_loss_validation_ppl": "ppl/val",
    "grad_norm": "grad_norm/total",
    "train/grad_norm": "grad_norm/total",
    "learning_rate": "lr",
    "lr": "lr",
    "train/lr": "lr",
    "train/learning_rate": "lr",
}

#: Normalised tags whose value is the cumulative token count.
TOKEN_TAGS = {"consumed_tokens", "tokens", "consumed_train_tokens", "train/tokens", "train/consumed_tokens",
              "num_tokens", "tokens_seen"}

_MTP = re.compile(r"^(?:train/)?mtp(?:/loss)?_?(\d+)(?:_loss)?$|^(?:train/)?mtp_?loss_?(\d+)$")

#: Layer-metric synonyms (normalised) → healthwatch layer metric.
LAYER_METRICS: dict[str, str] = {
    "maxvio": "maxvio",
    "max_vio": "maxvio",
    "moe_maxvio": "maxvio",
    "dead_experts": "dead_experts",
    "num_dead_experts": "dead_experts",
    "resid_rms": "resid_rms",
    "resid_norm": "resid_rms",
    "residual_norm": "resid_rms",
    "residual_rms": "resid_rms",
    "resid_rms_max": "resid_rms_max",
    "resid_norm_max": "resid_rms_max",
    "residual_norm_max": "resid_rms_max",
    "wgrad_norm": "wgrad_norm",
    "grad_norm": "wgrad_norm",
    "weight_grad_norm": "wgrad_norm",
}

# ``layer_3``, ``layer3``, ``layers/3``, ``layer-3`` as one path/word component of the tag.
_LAYER = re.compile(r"(?:^|(?<=[/_.]))layers?[_/.]?(\d+)(?=$|[/_.])")

_PATTERN_TYPES = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp", "G": "attention"}


def sanitize(tag: str) -> str:
    """A valid healthwatch metric name for an arbitrary TensorBoard tag (spaces → ``_``, ≤ 200 chars)."""
    name = _BAD.sub("_", tag.strip()).strip("_") or "tag"
    while ".." in name:
        name = name.replace("..", ".")
    return name[:200]


def classify_tag(tag: str) -> tuple[str, Any]:
    """What a tag is: ``("skip", None)``, ``("tokens", None)``, ``("scalar", name)`` or
    ``("layer", (layer, metric))``."""
    key = _key(tag)
    if key.endswith("_vs_samples") or key.endswith("vs_samples"):
        return "skip", None
    if key in TOKEN_TAGS:
        return "tokens", None
    if key in SCALAR_TAGS:
        return "scalar", SCALAR_TAGS[key]
    m = _MTP.match(key)
    if m:
        return "scalar", f"loss/mtp_{int(m.group(1) or m.group(2))}"
    lm = _LAYER.search(key)
    if lm:
        rest = (key[: lm.start()] + "/" + key[lm.end():]).strip("/_.")
        rest = re.sub(r"[/.]+", "/", rest).strip("/")
        parts = [p.strip("_") for p in rest.split("/")]
        parts = [p for p in parts if p and p not in ("moe", "layers", "layer")]
        metric = LAYER_METRICS.get("_".join(parts))
        if metric is not None:
            return "layer", (int(lm.group(1)), metric)
    return "scalar", sanitize(tag)


@dataclass
class _Series:
    """Values of one tag: step → (wall_time, value); later wall times win (restarts re-log steps)."""

    points: dict[int, tuple[float, float]] = field(default_factory=dict)

    def add(self, step: int, wall: float, value: float) -> None:
        old = self.points.get(step)
        if old is None or wall >= old[0]:
            self.points[step] = (wall, value)


def _event_dirs(logdir: Path) -> list[Path]:
    dirs = sorted({p.parent for p in logdir.rglob("*tfevents*") if p.is_file()})
    return dirs


def _read_dir(directory: Path, scalars: dict[str, _Series], texts: dict[str, str]) -> None:
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    acc = ea.EventAccumulator(
        str(directory),
        size_guidance={ea.SCALARS: 0, ea.TENSORS: 0, ea.HISTOGRAMS: 1, ea.IMAGES: 1, ea.AUDIO: 1,
                       ea.COMPRESSED_HISTOGRAMS: 1},
    )
    acc.Reload()
    tags = acc.Tags()
    for tag in tags.get(ea.SCALARS, []):
        series = scalars.setdefault(tag, _Series())
        for ev in acc.Scalars(tag):
            series.add(int(ev.step), float(ev.wall_time), float(ev.value))
    for tag in tags.get(ea.TENSORS, []):
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        events = acc.Tensors(tag)
        if plugin == "text":
            if events:
                value = tensor_util.make_ndarray(events[-1].tensor_proto).reshape(-1)
                if value.size:
                    raw = value[0]
                    texts[tag] = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        elif plugin in ("scalars", ""):
            # TF2 ``tf.summary.scalar`` writes scalars as 0-d tensors.
            series = scalars.setdefault(tag, _Series())
            for ev in events:
                arr = tensor_util.make_ndarray(ev.tensor_proto)
                if arr.size == 1:
                    series.add(int(ev.step), float(ev.wall_time), float(arr.reshape(-1)[0]))


def _text_arg(texts: dict[str, str], *names: str) -> str | None:
    # torch's SummaryWriter.add_text stores tag "<name>/text_summary".
    lowered = {_key(k).removesuffix("/text_summary").rsplit("/", 1)[-1]: v for k, v in texts.items()}
    for n in names:
        if n in lowered:
            v = lowered[n].strip()
            # add_text renders through markdown; Megatron's values are plain.
            return v.strip("`'\" ")
    return None


def _tokens_by_step(scalars: dict[str, _Series], seq_length: int | None) -> dict[int, int] | None:
    for tag, series in scalars.items():
        if _key(tag) in TOKEN_TAGS and series.points:
            return {s: int(round(v)) for s, (_w, v) in series.points.items()}
    if not seq_length:
        return None
    # Megatron logs "X" at the iteration and "X vs samples" at the consumed samples, in the same
    # order: pairing the i-th points gives samples per iteration.
    for tag, series in scalars.items():
        vs = scalars.get(f"{tag} vs samples")
        if vs is None or not series.points:
            continue
        steps = sorted(series.points, key=lambda s: series.points[s][0])
        samples = sorted(vs.points, key=lambda s: vs.points[s][0])
        if len(steps) == len(samples):
            return {st: sa * seq_length for st, sa in zip(steps, samples)}
    return None


def _layer_type_for(layer: int, metrics: set[str], pattern: str | None) -> str:
    if metrics & {"maxvio", "dead_experts"}:
        return "moe"
    if pattern and 0 <= layer < len(pattern):
        return _PATTERN_TYPES.get(pattern[layer], "attention")
    return "attention"


def _run_exists(root: Path, run: str) -> bool:
    for table in ("runs", "scalars", "layer_stats"):
        d = table_dir(root, table, run)
        if d.is_dir() and list_segments(d):
            return True
    return False


def _chunks(columns: dict[str, list[Any]], size: int) -> Iterable[dict[str, list[Any]]]:
    n = len(next(iter(columns.values())))
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in columns.items()}


def import_tensorboard(
    logdir: str | os.PathLike[str],
    run: str,
    store: str | os.PathLike[str] | None = None,
    *,
    precision: str = "unknown",
    seq_length: int | None = None,
    layer_pattern: str | None = None,
    layer_base: int = 0,
) -> int:
    """Import every TensorBoard event file under ``logdir`` as run ``run`` of ``store``.

    Args:
        logdir: a TensorBoard log directory (searched recursively for ``*tfevents*`` files).
        run: the new run's name; it must not exist in the store yet.
        store: store directory (default ``$HEALTHWATCH_STORE`` or ``./healthwatch-store``).
        precision: recorded on the run.
        seq_length: tokens per sample, to derive tokens from ``… vs samples`` tags (read from
            Megatron's ``seq_length`` text tag when not given).
        layer_pattern: per-layer type letters (``M`` mamba, ``*`` attention, ``E`` moe, ``-`` mlp);
            read from a ``hybrid_override_pattern`` text tag when not given.
        layer_base: the index the tags give the first layer (1 for Megatron's 1-based
            ``layer_number``); stored layers are 0-based.

    Returns:
        The number of scalar and layer rows written.

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
        ValueError: bad run name, no event files or no scalars in them, or the run already exists.
    """
    run = validate_run_name(run)
    src = Path(logdir)
    if not src.exists():
        raise FileNotFoundError(f"TensorBoard log directory {src} does not exist")
    if src.is_file():
        dirs = [src.parent]
    else:
        dirs = _event_dirs(src)
    if not dirs:
        raise ValueError(f"no TensorBoard event files (*tfevents*) under {src}")
    root = Path(default_store_path(store))
    if _run_exists(root, run):
        raise ValueError(f"run {run!r} already exists in store {root}: import under another --run name")

    scalars: dict[str, _Series] = {}
    texts: dict[str, str] = {}
    for d in dirs:
        try:
            _read_dir(d, scalars, texts)
        except Exception as exc:  # noqa: BLE001 - a corrupt file is reported with its directory
            raise ValueError(f"cannot read TensorBoard events in {d}: {exc}") from exc
    if not any(s.points for s in scalars.values()):
        raise ValueError(f"no scalar values in the TensorBoard event files under {src}")

    if seq_length is None:
        arg = _text_arg(texts, "seq_length", "seq_len", "encoder_seq_length")
        seq_length = int(arg) if arg and arg.isdigit() else None
    if layer_pattern is None:
        layer_pattern = _text_arg(texts, "hybrid_override_pattern")
    tokens_of = _tokens_by_step(scalars, seq_length)

    known = sorted(tokens_of) if tokens_of else []

    def tokens(step: int) -> int:
        if tokens_of is None:
            return step
        if step in tokens_of:
            return tokens_of[step]
        # A step logged by some tags only (e.g. validation): the nearest earlier known count.
        i = bisect.bisect_right(known, step)
        return tokens_of[known[i - 1]] if i else step

    sc: dict[str, list[Any]] = defaultdict(list)
    layer_points: list[tuple[int, int, str, float]] = []
    names_seen: dict[str, str] = {}
    for tag in sorted(scalars):
        kind, what = classify_tag(tag)
        if kind in ("skip", "tokens"):
            continue
        points = scalars[tag].points
        if kind == "layer":
            layer, metric = what
            for step, (_wall, value) in points.items():
                layer_points.append((step, layer - layer_base, metric, value))
            continue
        name = what
        if names_seen.setdefault(name, tag) != tag:
            # Two tags mapped to one name (e.g. "lm loss" and "loss"): keep the first, the other by its own name.
            name = sanitize(tag)
        for step, (wall, value) in sorted(points.items()):
            sc["step"].append(step)
            sc["name"].append(name)
            sc["value"].append(value)
            sc["wall_time"].append(wall)

    metrics_by_layer: dict[int, set[str]] = defaultdict(set)
    for _s, layer, metric, _v in layer_points:
        metrics_by_layer[layer].add(metric)
    if any(layer < 0 for layer in metrics_by_layer):
        raise ValueError(f"layer_base={layer_base} makes some layer indices negative")
    types = {layer: _layer_type_for(layer, ms, layer_pattern) for layer, ms in metrics_by_layer.items()}

    init_store(root)
    writer = StoreWriter(root, run, attempt=1)
    steps = sc["step"] + [p[0] for p in layer_points]
    first_step = min(steps) if steps else 0
    now = time.time()
    config = {"source": "tensorboard", "logdir": str(src.resolve()), "tags": len(scalars),
              "args": {k: v for k, v in list(texts.items())[:500]}}
    writer.write("runs", run_row(precision=precision, config=config, created=now))
    writer.write("attempts", attempt_row(attempt=1, start_step=first_step, started_at=now, reason="import"))
    rows = 0
    if sc["step"]:
        cols = {"attempt": [1] * len(sc["step"]), "step": sc["step"],
                "tokens": [tokens(s) for s in sc["step"]], "name": sc["name"],
                "value": sc["value"],
                "wall_time": sc["wall_time"]}
        for chunk in _chunks(cols, CHUNK_ROWS):
            writer.write("scalars", chunk)
        rows += len(sc["step"])
    if layer_points:
        layer_points.sort()
        cols = {"attempt": [1] * len(layer_points), "step": [p[0] for p in layer_points],
                "tokens": [tokens(p[0]) for p in layer_points], "layer": [p[1] for p in layer_points],
                "layer_type": [types[p[1]] for p in layer_points], "metric": [p[2] for p in layer_points],
                "value": [p[3] for p in layer_points]}
        for chunk in _chunks(cols, CHUNK_ROWS):
            writer.write("layer_stats", chunk)
        rows += len(layer_points)
    for table in ("scalars", "layer_stats"):
        writer.compact_own(table)
    writer.close()  # an import is a finished attempt: its last rollup buckets are complete
    return rows
