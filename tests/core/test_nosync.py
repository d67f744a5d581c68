"""The hot path makes no host syncs: no .item()/.tolist()/.cpu() (nor float()/bool() on tensors)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import healthwatch as hw

sys.path.insert(0, str(Path(__file__).parent))
from toymodel import ToyLM  # noqa: E402


class SyncCounter:
    """Counts calls of tensor methods that copy device data to the host."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__")

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._orig: dict[str, object] = {}

    def __enter__(self) -> SyncCounter:
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)
            self._orig[name] = orig

            def wrapper(t, *a, __n=name, __o=orig, **k):
                self.calls.append(__n)
                return __o(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)


def test_no_host_reads_on_non_flush_steps(store_dir):
    torch.manual_seed(0)
    model = ToyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = hw.Monitor(store=store_dir, run="nosync", flush_every_steps=1000, flush_every_s=1e9)
    mon.watch(model)
    batches = [torch.randint(0, 32, (1, 8)) for _ in range(6)]
    losses = []
    for i, ids in enumerate(batches):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, 32), ids.view(-1))
        loss.backward()
        opt.step()
        losses.append(loss)
        # Count only the Monitor's own calls, around each of its entry points.
        with SyncCounter() as counter:
            mon.after_backward()
        opt.zero_grad()
        assert counter.calls == [], counter.calls
        with SyncCounter() as counter:
            mon.step(i, tokens=8 * (i + 1), loss=loss, mtp_losses=[loss * 2], lr=torch.tensor(0.01))
            mon.log({"opt/update_rms": loss.detach() * 0.1}, step=i)
        assert counter.calls == [], counter.calls
    mon.close()
    st = hw.open_store(store_dir)
    stored = [v for (v,) in st.sql("SELECT value FROM scalars WHERE name='loss/train' ORDER BY step").fetchall()]
    assert stored == [float(x) for x in losses]
