"""Benchmark 2: cost of logging the same ~300 values per step with healthwatch and its peers.

Every logger gets, at every step, the same 275 values as 0-d tensors (what a trainer holds):
the train loss, 2 MTP losses, the residual RMS and weight-gradient norm of each of 108 layers,
MaxVio of 54 MoE layers, the total grad norm and the learning rate. Peers need Python floats, so
they pay ``.item()`` per value (a host sync each on a GPU); healthwatch takes the tensors as
they are. Timed "in the loop": from having the values to the logging call's return.

* ``healthwatch``: ``Monitor.step(loss=, mtp_losses=)`` + ``Monitor.log({...272 tensors})``.
* ``healthwatch (hooks)``: the path a trainer uses for per-layer stats: a 108-block stand-in
  model with 54 routers, watched by the Monitor; its hooks put residual norms and expert counts
  in preallocated accumulators during forward (not timed, like the peers' value production);
  timed are ``after_backward()`` (it *computes* the 108 grad norms) and ``step()``. It logs
  436 values per step (adds ``resid_rms_max`` and dead experts).
* TensorBoard ``SummaryWriter.add_scalar`` per value; W&B offline ``run.log(dict)``; MLflow
  file store ``mlflow.log_metrics(dict)``.

Each logger runs in its own process; total CPU counts every thread and helper process
(``wandb-core``) from the logger's creation to its close.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_common import (
    NA,
    Budget,
    CPUMeter,
    Job,
    Section,
    Table,
    child_main,
    descendant_cpu_seconds,
    dir_bytes,
    emit_progress,
    fmt_bytes,
    fmt_count,
    fmt_ratio,
    fmt_time,
    median,
    percentile,
    thread_cpu_seconds,
    verdict,
)

N_LAYERS, N_MOE = 108, 54
TOKENS_PER_STEP = 1 << 20
ONE_SERIES = "loss/mtp_2"
LOGGERS = ("healthwatch", "healthwatch-hooks", "tensorboard", "wandb", "mlflow")
LABELS = {
    "healthwatch": "healthwatch `Monitor.step`+`log` (tensors)",
    "healthwatch-hooks": "healthwatch hooks path (`after_backward`+`step`)",
    "tensorboard": "TensorBoard `add_scalar` + `.item()`",
    "wandb": "W&B offline `run.log` + `.item()`",
    "mlflow": "MLflow file store `log_metrics` + `.item()`",
}


def value_names() -> list[str]:
    """The 275 names logged per step (losses first)."""
    names = ["loss/train", "loss/mtp_1", "loss/mtp_2"]
    names += [f"layer/{i:03d}/resid_rms" for i in range(N_LAYERS)]
    names += [f"layer/{i:03d}/wgrad_norm" for i in range(N_LAYERS)]
    names += [f"layer/{i:03d}/maxvio" for i in range(1, N_LAYERS, N_LAYERS // N_MOE)]
    names += ["grad_norm/total", "lr"]
    return names


class _Values:
    """Per-step values as 0-d tensors (a fresh vector each step, like a trainer's statistics)."""

    def __init__(self, n: int) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self.base = torch.rand(n, generator=g) + 0.5
        self.gen = g

    def at(self, step: int) -> tuple[Any, ...]:
        import torch

        v = self.base * (1.0 + 0.01 * torch.randn(self.base.shape, generator=self.gen)) / (1.0 + step * 1e-4)
        return torch.unbind(v)


# --------------------------------------------------------------------------------------------
# W&B offline file reader (the .wandb transaction log: LevelDB-style log blocks of protobuf records)

_WB_BLOCK = 32 * 1024
_WB_HEADER = struct.Struct("<4sHB")
_WB_REC = struct.Struct("<IHB")


def read_wandb_history(path: Path, key: str | None = None) -> dict[str, list[tuple[int, float]]]:
    """History of an offline W&B run file: ``{key: [(step, value), …]}`` (one key or all)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, _magic, _version = _WB_HEADER.unpack_from(data, 0)
    if ident != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    out: dict[str, list[tuple[int, float]]] = {}
    pos, buf = _WB_HEADER.size, b""
    rec = pb.Record()
    while pos + _WB_REC.size <= len(data):
        left = _WB_BLOCK - pos % _WB_BLOCK
        if left < _WB_REC.size:
            pos += left
            continue
        _crc, length, kind = _WB_REC.unpack_from(data, pos)
        pos += _WB_REC.size
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind not in (1, 4):
            continue
        rec.ParseFromString(buf)
        buf = b""
        if rec.WhichOneof("record_type") != "history":
            continue
        step = rec.history.step.num
        for item in rec.history.item:
            k = item.key or "/".join(item.nested_key)
            if key is not None and k != key:
                continue
            try:
                val = float(json.loads(item.value_json))
            except (ValueError, TypeError):
                continue
            out.setdefault(k, []).append((step, val))
    return out


# --------------------------------------------------------------------------------------------
# loggers


def _loop(steps: int, log_step: Any, values: _Values, label: str) -> list[float]:
    times: list[float] = []
    every = max(1, steps // 50)
    for s in range(steps):
        vals = values.at(s)
        t0 = time.perf_counter()
        log_step(s, vals)
        times.append(time.perf_counter() - t0)
        if s % every == 0 or s == steps - 1:
            emit_progress(s + 1, steps, label)
    return times


def _run_healthwatch(steps: int, workdir: Path) -> dict[str, Any]:
    import healthwatch as hw

    names = value_names()
    rest = names[3:]
    root = workdir / "hw-store"
    values = _Values(len(names))
    meter = CPUMeter().start()
    t0 = time.perf_counter()
    mon = hw.Monitor(store=root, run="peers", precision="bf16")
    init_s = time.perf_counter() - t0

    def log_step(s: int, vals: tuple[Any, ...]) -> None:
        mon.step(s, tokens=(s + 1) * TOKENS_PER_STEP, loss=vals[0], mtp_losses=vals[1:3])
        mon.log(dict(zip(rest, vals[3:])), step=s)

    times = _loop(steps, log_step, values, "healthwatch")
    t0 = time.perf_counter()
    mon.close()
    close_s = time.perf_counter() - t0
    cpu = meter.stop()
    return {"times": times, "init_s": init_s, "close_s": close_s, "cpu": cpu, "bytes": dir_bytes(root),
            "dropped": mon.dropped_rows, **_read_healthwatch(root, "peers", len(names))}


def _read_healthwatch(root: Path, run: str, n_series: int) -> dict[str, Any]:
    import healthwatch as hw

    t0 = time.perf_counter()
    st = hw.open_store(root)
    one = st.sql("SELECT step, value FROM scalars WHERE run = ? AND name = ? ORDER BY step", [run, ONE_SERIES]).pl()
    read_one = time.perf_counter() - t0
    st.close()
    t0 = time.perf_counter()
    st = hw.open_store(root)
    everything = st.sql("SELECT name, step, value FROM scalars WHERE run = ? ORDER BY name, step", [run]).pl()
    read_all = time.perf_counter() - t0
    n_names = everything["name"].n_unique()
    st.close()
    return {"read_one_s": read_one, "read_one_points": one.height, "read_all_s": read_all,
            "read_all_points": everything.height, "read_all_series": n_names, "logged_series": n_series}


class _StandInStack:
    """A 108-block stand-in model with 54 routers, and an adapter describing it to the Monitor."""

    def __init__(self, hidden: int = 16, experts: int = 16, top_k: int = 2) -> None:
        import torch
        from torch import nn

        from healthwatch.hooks.adapters.base import (
            BlockSpec,
            ModelSpec,
            RouterSpec,
            output_item,
            params_by_block,
        )

        class Router(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.proj = nn.Linear(hidden, experts, bias=False)
                self.num_experts = experts

            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                logits = self.proj(x.reshape(-1, hidden))
                w, idx = logits.topk(top_k, dim=-1)
                return logits.softmax(-1), w, idx

        class Block(nn.Module):
            def __init__(self, moe: bool) -> None:
                super().__init__()
                self.lin = nn.Linear(hidden, hidden)
                self.router = Router() if moe else None

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y = self.lin(x)
                if self.router is not None:
                    probs, _w, _i = self.router(x)
                    y = y * probs.max(-1).values.reshape(x.shape[:-1] + (1,))
                return x + 0.1 * torch.tanh(y)

        class Stack(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.blocks = nn.ModuleList(Block(moe=i % 2 == 1) for i in range(N_LAYERS))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                for b in self.blocks:
                    x = b(x)
                return x

        class Adapter:
            name = "bench-stand-in"

            def matches(self, model: nn.Module) -> bool:
                return isinstance(model, Stack)

            def inspect(self, model: nn.Module) -> ModelSpec:
                blocks = [BlockSpec(i, "moe" if b.router is not None else "mamba", b, f"blocks.{i}")
                          for i, b in enumerate(model.blocks)]
                routers = [RouterSpec(i, b.router, experts, output_item(2), "moe", f"blocks.{i}.router")
                           for i, b in enumerate(model.blocks) if b.router is not None]
                params_by_block(model, blocks)
                return ModelSpec(blocks=blocks, routers=routers, special_params={},
                                 all_params=[p for p in model.parameters() if p.requires_grad], adapter=self.name)

        torch.manual_seed(0)
        self.model = Stack()
        self.adapter = Adapter()
        self.x = torch.randn(4, 8, hidden)


def _run_healthwatch_hooks(steps: int, workdir: Path) -> dict[str, Any]:
    import threading

    import torch

    import healthwatch as hw

    root = workdir / "hw-hooks-store"
    stand_in = _StandInStack()
    model = stand_in.model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    mon = hw.Monitor(store=root, run="peers-hooks", precision="bf16", expert_load_every=100)
    mon.watch(model, adapter=stand_in.adapter)
    init_s = time.perf_counter() - t0
    writer = next((t for t in threading.enumerate() if t.name == "healthwatch-writer-peers-hooks"), None)
    w0 = thread_cpu_seconds(writer) if writer else None
    times: list[float] = []
    every = max(1, steps // 50)
    lr = torch.tensor(1e-3)
    for s in range(steps):
        out = model(stand_in.x)
        loss = out.pow(2).mean()
        loss.backward()
        t0 = time.perf_counter()
        mon.after_backward()
        mon.step(s, tokens=(s + 1) * TOKENS_PER_STEP, loss=loss, mtp_losses=[loss * 1.01, loss * 1.02], lr=lr)
        times.append(time.perf_counter() - t0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s % every == 0 or s == steps - 1:
            emit_progress(s + 1, steps, "healthwatch hooks path")
    t0 = time.perf_counter()
    mon.flush(wait=True)
    w1 = thread_cpu_seconds(writer) if writer else None
    mon.close()
    close_s = time.perf_counter() - t0
    writer_cpu = (w1 - w0) if (w0 is not None and w1 is not None) else None
    st = hw.open_store(root)
    try:
        per_step = (st.sql("SELECT count(*) FROM scalars WHERE run = 'peers-hooks'").fetchone()[0]
                    + st.sql("SELECT count(*) FROM layer_stats WHERE run = 'peers-hooks'").fetchone()[0]) / steps
    finally:
        st.close()
    # CPU attributable to healthwatch: its in-loop time plus its writer thread (the stand-in model's
    # forward/backward is not logging work and is left out).
    cpu_total = sum(times) + (writer_cpu or 0.0)
    return {"times": times, "init_s": init_s, "close_s": close_s, "writer_cpu_s": writer_cpu,
            "cpu": {"total_s": cpu_total, "self_s": cpu_total, "children_s": 0.0, "wall_s": math.nan},
            "bytes": dir_bytes(root), "dropped": mon.dropped_rows, "values_per_step": per_step,
            **_read_healthwatch(root, "peers-hooks", 0)}


def _run_tensorboard(steps: int, workdir: Path) -> dict[str, Any]:
    from torch.utils.tensorboard import SummaryWriter

    names = value_names()
    logdir = workdir / "tb"
    values = _Values(len(names))
    meter = CPUMeter().start()
    t0 = time.perf_counter()
    w = SummaryWriter(log_dir=str(logdir))
    init_s = time.perf_counter() - t0

    def log_step(s: int, vals: tuple[Any, ...]) -> None:
        for n, v in zip(names, vals):
            w.add_scalar(n, v.item(), s)

    times = _loop(steps, log_step, values, "tensorboard")
    t0 = time.perf_counter()
    w.close()
    close_s = time.perf_counter() - t0
    cpu = meter.stop()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t0 = time.perf_counter()
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    one = acc.Scalars(ONE_SERIES)
    read_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    points = sum(len(acc.Scalars(t)) for t in tags)
    read_all = time.perf_counter() - t0
    return {"times": times, "init_s": init_s, "close_s": close_s, "cpu": cpu, "bytes": dir_bytes(logdir),
            "read_one_s": read_one, "read_one_points": len(one), "read_all_s": read_all,
            "read_all_points": points, "read_all_series": len(tags)}


def _run_wandb(steps: int, workdir: Path) -> dict[str, Any]:
    import wandb

    names = value_names()
    wdir = workdir / "wandb"
    wdir.mkdir(parents=True, exist_ok=True)
    values = _Values(len(names))
    meter = CPUMeter().start()
    t0 = time.perf_counter()
    run = wandb.init(mode="offline", dir=str(wdir), project="hwbench", name="peers",
                     settings=wandb.Settings(console="off", silent=True))
    init_s = time.perf_counter() - t0

    def log_step(s: int, vals: tuple[Any, ...]) -> None:
        run.log({n: v.item() for n, v in zip(names, vals)}, step=s)

    times = _loop(steps, log_step, values, "wandb offline")
    t0 = time.perf_counter()
    run.finish()
    close_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    teardown = getattr(wandb, "teardown", None)
    if teardown is not None:
        teardown()
    teardown_s = time.perf_counter() - t0
    _wait_helpers_exit(timeout_s=60.0)  # wandb-core finishes writing after teardown returns
    cpu = meter.stop()
    files = sorted(wdir.rglob("*.wandb"))
    out: dict[str, Any] = {"times": times, "init_s": init_s, "close_s": close_s, "teardown_s": teardown_s,
                           "cpu": cpu, "bytes": dir_bytes(wdir)}
    if files:
        try:
            t0 = time.perf_counter()
            one = read_wandb_history(files[-1], ONE_SERIES).get(ONE_SERIES, [])
            read_one = time.perf_counter() - t0
            t0 = time.perf_counter()
            every = {k: v for k, v in read_wandb_history(files[-1]).items() if not k.startswith("_")}
            read_all = time.perf_counter() - t0
            out.update(read_one_s=read_one, read_one_points=len(one), read_all_s=read_all,
                       read_all_points=sum(len(v) for v in every.values()), read_all_series=len(every))
        except Exception as exc:  # noqa: BLE001 - the offline format is internal to W&B
            out["read_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _wait_helpers_exit(timeout_s: float) -> None:
    """Wait until no live (non-zombie) descendant process is left, so its CPU time is final."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = [pid for pid in descendant_cpu_seconds() if not _is_zombie(pid)]
        if not live:
            return
        time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return raw[raw.rindex(")") + 2 :].split()[0] in ("Z", "X")


def _run_mlflow(steps: int, workdir: Path) -> dict[str, Any]:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow
    from mlflow.tracking import MlflowClient

    names = value_names()
    uri = (workdir / "mlruns").as_uri()
    values = _Values(len(names))
    meter = CPUMeter().start()
    t0 = time.perf_counter()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("hwbench")
    active = mlflow.start_run(run_name="peers")
    run_id = active.info.run_id
    init_s = time.perf_counter() - t0

    def log_step(s: int, vals: tuple[Any, ...]) -> None:
        mlflow.log_metrics({n: v.item() for n, v in zip(names, vals)}, step=s)

    times = _loop(steps, log_step, values, "mlflow")
    t0 = time.perf_counter()
    mlflow.end_run()
    close_s = time.perf_counter() - t0
    cpu = meter.stop()
    t0 = time.perf_counter()
    one = MlflowClient(tracking_uri=uri).get_metric_history(run_id, ONE_SERIES)
    read_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    client = MlflowClient(tracking_uri=uri)
    keys = list(client.get_run(run_id).data.metrics)
    points = sum(len(client.get_metric_history(run_id, k)) for k in keys)
    read_all = time.perf_counter() - t0
    return {"times": times, "init_s": init_s, "close_s": close_s, "cpu": cpu,
            "bytes": dir_bytes(workdir / "mlruns"), "read_one_s": read_one, "read_one_points": len(one),
            "read_all_s": read_all, "read_all_points": points, "read_all_series": len(keys)}


RUNNERS = {
    "healthwatch": _run_healthwatch,
    "healthwatch-hooks": _run_healthwatch_hooks,
    "tensorboard": _run_tensorboard,
    "wandb": _run_wandb,
    "mlflow": _run_mlflow,
}
REQUIRES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def run_logger(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: log ``steps`` steps with one logger; a missing optional peer is skipped."""
    import importlib.util

    import torch

    torch.set_num_threads(1)  # the values are tiny; one thread avoids pool wake-ups for every logger
    logger = params["logger"]
    mod = REQUIRES.get(logger)
    if mod is not None and importlib.util.find_spec(mod) is None:
        return {"skipped": f"`{mod}` is not installed (pip install {mod})"}
    workdir = Path(params["workdir"]) / f"peers-{logger}"
    workdir.mkdir(parents=True, exist_ok=True)
    out = RUNNERS[logger](int(params["steps"]), workdir)
    out["steps"] = int(params["steps"])
    out["n_values"] = len(value_names())
    return out


TASKS = {"logger": run_logger}


def jobs(quick: bool, workdir: Path, steps: int | None = None, loggers: list[str] | None = None) -> list[Job]:
    """One child task per logger."""
    n = steps if steps is not None else (100 if quick else 2000)
    return [
        Job(f"peers:{name}", "benchmarks.bench_peers", "logger", {"logger": name, "steps": n, "workdir": str(workdir)},
            f"logging cost: {name} ({n} steps)", timeout_s=900 if quick else 3600)
        for name in (loggers or list(LOGGERS))
    ]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def section(results: dict[str, dict[str, Any]]) -> Section:
    """Budget rows and tables from the per-logger results."""
    sec = Section("peers", "2. Logging cost against peers")
    got = {k.split(":", 1)[1]: v for k, v in results.items() if k.startswith("peers:")}
    steps = next((v.get("steps") for v in got.values() if "steps" in v), None)
    n_values = next((v.get("n_values") for v in got.values() if "n_values" in v), len(value_names()))
    sec.intro = (
        f"{n_values} values per step ({N_LAYERS} layers: residual RMS and wgrad norm; MaxVio of {N_MOE} MoE "
        f"layers; train loss, 2 MTP losses, total grad norm, lr) as 0-d tensors, {steps} steps. "
        "Peers pay `.item()` per value (a host sync each on a GPU); healthwatch takes tensors. "
        "In-loop cost = time from having the values to the logging call's return; total CPU = every thread "
        "and helper process from the logger's creation to its close (for the hooks path: in-loop time + the "
        "writer thread's CPU, since the stand-in model's own compute is not logging work)."
    )
    rows = []
    ok = {k: v for k, v in got.items() if "times" in v}
    for name in LOGGERS:
        r = got.get(name)
        if r is None:
            continue
        if "times" not in r:
            why = r.get("skipped") or r.get("error", "did not run")
            rows.append([LABELS[name], "skipped" if "skipped" in r else "error", "", "", "", "", "", "", "", why])
            continue
        t = r["times"]
        read_one = r.get("read_one_s")
        read_all = r.get("read_all_s")
        rows.append([
            LABELS[name], fmt_time(median(t)), fmt_time(percentile(t, 99)), fmt_time(_mean(t)),
            fmt_time(r["close_s"]), f"{r['cpu']['total_s']:.2f} s", fmt_bytes(r["bytes"]),
            fmt_time(read_one) + (f" ({fmt_count(r.get('read_one_points'))} pts)" if read_one is not None else ""),
            fmt_time(read_all) + (f" ({fmt_count(r.get('read_all_points'))} pts)" if read_all is not None else ""),
            r.get("read_error", "") or (f"{r['values_per_step']:.0f} values/step; writer thread "
                                        f"{fmt_time(r.get('writer_cpu_s'))}" if name == "healthwatch-hooks" else ""),
        ])
    sec.tables.append(Table(
        "Per logger",
        ["logger", "in-loop median", "in-loop p99", "in-loop mean", "flush/close", "total CPU", "on disk",
         "read one series", "read all series", "note"],
        rows,
        "Read times open the files fresh (healthwatch: open the store + one SQL query; TensorBoard: "
        "`EventAccumulator.Reload()`, which parses the whole event file even for one tag; W&B: parse the "
        "offline `.wandb` transaction log; MLflow: `get_metric_history` per key).",
    ))
    hw = ok.get("healthwatch")
    hooks = ok.get("healthwatch-hooks")
    extra = []
    for name, r in ok.items():
        if name.startswith("healthwatch"):
            continue
        extra.append([LABELS[name], fmt_time(r["init_s"]), fmt_time(r.get("teardown_s"))])
    if extra:
        sec.tables.append(Table("Peer start-up", ["logger", "init", "teardown"], extra))

    def ratio(peer: str, mine: dict[str, Any] | None) -> float | None:
        p = ok.get(peer)
        if p is None or mine is None:
            return None
        return _mean(p["times"]) / _mean(mine["times"])

    for peer, need in (("tensorboard", 100), ("wandb", 10)):
        r_main = ratio(peer, hw)
        r_hooks = ratio(peer, hooks)
        if r_main is None:
            sec.budgets.append(Budget(f"in-loop cost vs {peer}", f"≥ {need}× cheaper", "peer not run", NA))
            continue
        sec.budgets.append(Budget(
            f"in-loop cost per step (mean) vs {LABELS[peer]}", f"≥ {need}× cheaper",
            f"{fmt_ratio(r_main)} (`log` path); {fmt_ratio(r_hooks)} (hooks path)", verdict(r_main >= need),
            f"{fmt_time(_mean(ok[peer]['times']))} vs {fmt_time(_mean(hw['times']))}" if hw else "",
        ))
    if hw is not None:
        peers_cpu = {p: ok[p]["cpu"]["total_s"] for p in ("tensorboard", "wandb") if p in ok}
        mine = hw["cpu"]["total_s"]
        sec.budgets.append(Budget(
            "total CPU, less than TensorBoard and W&B", "< each",
            f"{mine:.2f} s vs " + (", ".join(f"{p} {c:.2f} s" for p, c in peers_cpu.items()) or "no peers"),
            verdict(all(mine < c for c in peers_cpu.values()) if peers_cpu else None),
        ))
    for name, r in got.items():
        if "error" in r:
            sec.errors.append(f"{name}: {r['error']}")
    return sec


if __name__ == "__main__":
    raise SystemExit(child_main(TASKS))
