"""Trainer processes for the kill -9 trials: ``python kill9_worker.py STORE RUN LOGDIR``.

The worker imports torch and healthwatch once, then forks one real training process per trial
(so 20+ trials do not pay 20+ interpreter and torch start-ups). Commands on stdin:

``start K START STEPS SEED HOLD``  fork trial K: train steps START.. with a real ``Monitor`` on the
                              toy model; answers ``pid K <pid>``, then ``exit K <code>`` once the
                              process is gone (``-9`` when killed by SIGKILL). With HOLD=1 the
                              process does not close the Monitor after its steps: it waits to be
                              killed (its writer thread still running), so a kill can never come
                              too late however slowly the test's poller is scheduled.
``quit``                      exit.

Each trial appends to ``LOGDIR/trial-K.log`` (``O_APPEND`` writes go to the kernel at once, so
they survive kill -9):

``A <attempt> <start>``  the Monitor opened this attempt (fsynced)
``S <step>``             about to hand step <step> to the Monitor
``W <step>``             the Monitor's writer thread finished writing a flush whose last step is
                         <step> (every table of it is published: a completed flush)
``C <step>``             checkpoint: ``Monitor.state_dict()`` returned, so every step up to
                         <step> is written to the store (fsynced)
``H``                    HOLD: every step was handed over; waiting for the kill
``D``                    ``Monitor.close()`` returned (fsynced)
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from reliability_helpers import toy_model, train  # noqa: E402

import healthwatch as hw  # noqa: E402

FLUSH_EVERY_STEPS = 5
CHECKPOINT_EVERY = 10
EXPERT_LOAD_EVERY = 10


def trial(store: str, run: str, logdir: Path, k: int, start: int, steps: int, seed: int, hold: bool) -> None:
    """One training process: a Monitor on ``run``, steps ``start..start+steps-1``, checkpoints."""
    fd = os.open(logdir / f"trial-{k:03d}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line: str, sync: bool = False) -> None:
        os.write(fd, (line + "\n").encode())
        if sync:
            os.fsync(fd)

    model = toy_model(seed)
    mon = hw.Monitor(store=store, run=run, flush_every_steps=FLUSH_EVERY_STEPS, flush_every_s=0.2,
                     expert_load_every=EXPERT_LOAD_EVERY, config={"trial": k})
    mon.watch(model)
    real_write = mon.writer.write

    def write_and_note(item: object) -> None:  # the writer thread: note each completed flush
        real_write(item)
        steps = getattr(item, "steps", None)
        if steps:
            note(f"W {steps[-1].step}")

    mon.writer.write = write_and_note  # type: ignore[method-assign]
    note(f"A {mon.attempt} {start}", sync=True)
    for step in range(start, start + steps):
        note(f"S {step}")
        train(mon, model, [step], extra=lambda s: {"kill9/step": float(s)})
        if (step + 1) % CHECKPOINT_EVERY == 0:
            mon.state_dict()  # a checkpoint: flushes and waits until the writer has written
            note(f"C {step}", sync=True)
    if hold:
        note("H")
        while True:  # only SIGKILL ends this process (the writer thread keeps flushing meanwhile)
            signal.pause()
    mon.close()
    note("D", sync=True)


def main() -> None:
    """Serve ``start``/``quit`` commands from stdin (see the module docstring)."""
    store, run, logdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)  # no OpenMP pool in the parent: forking stays safe
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            return
        k, start, steps, seed, hold = map(int, cmd[1:6])
        pid = os.fork()
        if pid == 0:  # the training process
            code = 0
            try:
                trial(store, run, logdir, k, start, steps, seed, bool(hold))
            except BaseException:  # noqa: BLE001 - report and exit non-zero, never return into the loop
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {k} {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"exit {k} {code}", flush=True)


if __name__ == "__main__":
    main()
