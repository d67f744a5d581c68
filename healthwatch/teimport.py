"""Import Transformer Engine precision-debug logs (``nvdlfw_inspect``) as per-layer quantisation health.

``healthwatch import te-debug LOGDIR --run R`` reads the statistics logs that Transformer
Engine's debug features (``LogNvfp4TensorStats``, ``LogFp8TensorStats``, ``LogTensorStats``)
write through ``nvdlfw_inspect`` and stores them as layer metrics of run ``R``: beside the run's
own rows when ``R`` already exists in the store (the usual case: a run watched live by a
Monitor, with TE's precision debug switched on), else as a new run.

Lines are read wherever they appear in a line (log prefixes are ignored)::

    {layer}_{gemm}_{tensor}_{stat} iteration=N value=V

``layer`` is the module name (``decoder.layers.3.self_attention.linear_qkv``), ``gemm`` one of
``fprop``/``dgrad``/``wgrad`` (optional), ``tensor`` one of ``activation``/``weight``/``gradient``/
``output``/``wgrad``/``dgrad``, ``stat`` e.g. ``underflow_pct`` (also ``underflows%``), ``mse``,
``amax``. The block index is the first ``layers.<i>`` (or ``.<i>.``) in the module name.

Mapping (per block and iteration, the maximum over the block's GEMM modules: the worst one).
TE's numbers keep a ``te_`` prefix: TE computes them its own way (e.g. after its Hadamard transforms,
per GEMM), and the default rule pack applies TE's own auto-switch thresholds to them.

===========================  =====================================================
TE statistic                 healthwatch layer metric
===========================  =====================================================
``underflow_pct``            ``te_underflow`` (a fraction: value / 100), and
                             ``te_underflow/<operand>`` (``act``, ``weight``, ``grad``)
``mse``                      ``te_mse`` and ``te_mse/<operand>`` (TE's mean squared
                             error, *not* healthwatch's relative ``fp4_rel_mse``)
``amax``                     ``te_amax`` and ``te_amax/<operand>``
anything else (``min``,      ``te_<stat>/<operand>``
``l2_norm``, …)
===========================  =====================================================

Tokens come from the run's own rows at the same step when the run exists, else the step.
Importing the same log directory into the same run twice is refused (an ``import`` event records it).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from healthwatch.schema import SCHEMA_VERSION, validate_run_name
from healthwatch.store import Store, StoreWriter, default_store_path, host_name, init_store

_LINE = re.compile(r"(?P<name>[A-Za-z0-9_.%/:\-]+)\s+iteration\s*=\s*(?P<it>\d+)\s+value\s*=\s*(?P<val>\S+)")
_STATS = ("underflow_pct", "underflows%", "underflows_pct", "overflows%", "overflow_pct", "mse", "cur_amax",
          "dynamic_range", "amax", "min", "max", "mean", "std", "l1_norm", "l2_norm", "scale_inv_min",
          "scale_inv_max", "variance")
_TENSORS = {"activation": "act", "weight": "weight", "gradient": "grad", "output": "output", "wgrad": "wgrad",
            "dgrad": "dgrad"}
_GEMMS = ("fprop", "dgrad", "wgrad")
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|blocks|h)\.(\d+)(?:\.|_|$)|\.(\d+)\.")


def parse_name(name: str) -> tuple[str, str | None, str | None, str] | None:
    """``(module, gemm, operand, stat)`` of a statistic name, or None when it is not one."""
    stat = next((s for s in sorted(_STATS, key=len, reverse=True) if name.endswith("_" + s)), None)
    if stat is None:
        return None
    rest = name[: -len(stat) - 1]
    operand = None
    for tensor, short in _TENSORS.items():
        if rest.endswith("_" + tensor):
            operand, rest = short, rest[: -len(tensor) - 1]
            break
    gemm = None
    for g in _GEMMS:
        if rest.endswith("_" + g):
            gemm, rest = g, rest[: -len(g) - 1]
            break
    return rest, gemm, operand, stat


def _metric(stat: str) -> tuple[str, float]:
    """healthwatch metric base name of a TE statistic and the factor on its value."""
    if stat in ("underflow_pct", "underflows%", "underflows_pct"):
        return "te_underflow", 0.01
    if stat in ("amax", "cur_amax"):
        return "te_amax", 1.0
    if stat == "mse":
        return "te_mse", 1.0
    return "te_" + re.sub(r"[^A-Za-z0-9_]", "_", stat.replace("%", "_pct")), 1.0


def _layer_type(module: str) -> str:
    m = module.lower()
    if "expert" in m or "moe" in m:
        return "moe"
    if "mixer" in m or "mamba" in m:
        return "mamba"
    if "attention" in m or "attn" in m or "qkv" in m:
        return "attention"
    return "mlp"


def read_te_logs(logdir: str | os.PathLike[str]) -> tuple[dict[tuple[int, int, str], float], dict[int, str], int]:
    """Parse every file under ``logdir``: ``({(step, layer, metric): value}, {layer: type}, lines read)``.

    Per block and step the maximum over the block's modules is kept (the worst GEMM).
    """
    src = Path(logdir)
    if not src.exists():
        raise FileNotFoundError(f"Transformer Engine debug log directory {src} does not exist")
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    values: dict[tuple[int, int, str], float] = {}
    types: dict[int, str] = {}
    lines = 0
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
        for line in text.splitlines():
            m = _LINE.search(line)
            if not m:
                continue
            parsed = parse_name(m["name"])
            if parsed is None:
                continue
            module, _gemm, operand, stat = parsed
            lm = _LAYER.search(module)
            if lm is None:
                continue
            try:
                value = float(m["val"])
            except ValueError:
                continue
            layer = int(lm.group(1) or lm.group(2))
            step = int(m["it"])
            base, factor = _metric(stat)
            v = value * factor
            for metric in (base, f"{base}/{operand}" if operand else None):
                if metric is None:
                    continue
                key = (step, layer, metric)
                old = values.get(key)
                # The worst module of the block; NaN is kept (a NaN statistic is news).
                if old is None or math.isnan(v) or (not math.isnan(old) and v > old):
                    values[key] = v
            types.setdefault(layer, _layer_type(module))
            lines += 1
    if not values:
        raise ValueError(f"no Transformer Engine statistics lines ('<name>_<stat> iteration=N value=V') under {src}")
    return values, types, lines


def import_te_debug(logdir: str | os.PathLike[str], run: str, store: str | os.PathLike[str] | None = None) -> int:
    """Import TE precision-debug logs under ``logdir`` into run ``run`` of ``store``; returns rows written.

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
        ValueError: bad run name, no statistics lines, or this log directory was imported into ``run`` before.
    """
    run = validate_run_name(run)
    values, types, _lines = read_te_logs(logdir)
    src = str(Path(logdir).resolve())
    root = Path(default_store_path(store))
    init_store(root)
    attempt, tokens_at, exists = 1, {}, False
    st = Store(root)
    try:
        row = st.sql("SELECT max(attempt) FROM attempts WHERE run = ?", [run]).fetchone()
        if row and row[0] is not None:
            exists, attempt = True, int(row[0])
            done = st.sql("SELECT count(*) FROM events WHERE run = ? AND kind = 'import' AND message = ?",
                          [run, f"te-debug {src}"]).fetchone()
            if done and done[0]:
                raise ValueError(f"{src} was already imported into run {run!r}")
            tokens_at = dict(st.sql("SELECT step, max(tokens) FROM scalars_effective WHERE run = ? GROUP BY step",
                                    [run]).fetchall())
    finally:
        st.close()
    writer = StoreWriter(root, run, attempt=attempt)
    now = time.time()
    keys = sorted(values)
    if not exists:
        config = {"source": "te-debug", "logdir": src}
        writer.write("runs", {"parent": [None], "branch_step": [None], "branch_tokens": [None],
                              "precision": ["unknown"], "config": [json.dumps(config)], "created": [now],
                              "schema_version": [SCHEMA_VERSION]})
        writer.write("attempts", {"attempt": [1], "start_step": [keys[0][0]], "started_at": [now],
                                  "host": [host_name()], "reason": ["import"], "schema_version": [SCHEMA_VERSION]})
    cols: dict[str, list[Any]] = defaultdict(list)
    for step, layer, metric in keys:
        cols["attempt"].append(attempt)
        cols["step"].append(step)
        cols["tokens"].append(int(tokens_at.get(step, step)))
        cols["layer"].append(layer)
        cols["layer_type"].append(types[layer])
        cols["metric"].append(metric)
        cols["value"].append(values[(step, layer, metric)])
    writer.write("layer_stats", dict(cols))
    last = keys[-1][0]
    writer.write("events", {"attempt": [attempt], "step": [last], "tokens": [int(tokens_at.get(last, last))],
                            "kind": ["import"], "message": [f"te-debug {src}"], "wall_time": [now]})
    writer.compact_own("layer_stats")
    return len(keys)
