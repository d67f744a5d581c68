"""One-line trainer integrations, end to end on CPU with a tiny Nemotron-H (hybrid Mamba/MoE):
Hugging Face ``Trainer`` with ``HFCallback`` and PyTorch Lightning with ``LightningCallback``.
Expected values come from the frameworks' own logs (HF's ``log_history``) or from the test's own
computation on the batches, never from the store under test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interop_helpers import needs

import healthwatch as hw
from healthwatch.store import open_store

VOCAB, SEQ, BATCH = 256, 16, 2
MOE_LAYERS = [1, 3, 5]  # "ME*E-E"


MTP_SEEN: list[float] = []  # the test's own record of the fake MTP head's CE per training microbatch


def _nemotron_h(mtp: bool = False) -> torch.nn.Module:
    tf = needs("transformers")
    cfg = tf.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=64, hybrid_override_pattern="ME*E-E", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16,
        ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16, expand=2, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=64,
        n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    if not mtp:
        return tf.NemotronHForCausalLM(cfg)

    class WithMTP(tf.NemotronHForCausalLM):
        """Returns a second-token-ahead CE as an 'MTP head' loss, the way MTP models expose theirs."""

        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            out = super().forward(*args, **kwargs)
            labels = kwargs.get("labels")
            if labels is not None:
                logits = out.logits[:, :-2].reshape(-1, out.logits.shape[-1]).float()
                ce = torch.nn.functional.cross_entropy(logits, labels[:, 2:].reshape(-1))
                if self.training:
                    MTP_SEEN.append(float(ce.detach()))
                out["mtp_losses"] = [ce]
            return out

    return WithMTP(cfg)


def _data(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (SEQ,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def test_import_healthwatch_loads_no_framework() -> None:
    code = ("import sys, healthwatch as hw; hw.integrations; "
            "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning', 'wandb', 'tensorboard') if m in sys.modules]; "
            "assert not bad, bad; print(sorted(hw.integrations.__all__))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "HFCallback" in res.stdout


@pytest.mark.slow
def test_hf_trainer_one_line(tmp_path: Path) -> None:
    tf = needs("transformers")
    store = tmp_path / "store"
    steps, accum = 4, 2
    MTP_SEEN.clear()
    args = tf.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accum, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
        max_grad_norm=1e9, seed=0, disable_tqdm=True,
    )
    trainer = tf.Trainer(model=_nemotron_h(mtp=True), args=args, train_dataset=_data(steps * accum * BATCH),
                         callbacks=[hw.integrations.HFCallback(store=store, run="hf-sft", precision="bf16")])
    trainer.train()
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert sorted(logged) == list(range(1, steps + 1))

    st = open_store(store)
    rows = st.sql("SELECT step, tokens, name, value FROM scalars_effective WHERE run = 'hf-sft'").fetchall()
    by = {(s, n): (t, v) for s, t, n, v in rows}
    for step in range(1, steps + 1):
        # HF's own log of the step's loss (rounded to 4 digits in its log) and its grad norm.
        assert by[(step, "loss/train")][1] == pytest.approx(logged[step]["loss"], abs=1e-4)
        assert by[(step, "grad_norm/total")][1] == pytest.approx(logged[step]["grad_norm"], rel=1e-4)
        assert by[(step, "lr")][1] == pytest.approx(logged[step]["learning_rate"], rel=1e-6)
        assert by[(step, "loss/train")][0] == step * accum * BATCH * SEQ  # tokens: cumulative input ids
        # The MTP head's loss: the mean of the step's microbatch CEs the model returned.
        mine = MTP_SEEN[(step - 1) * accum:step * accum]
        assert by[(step, "loss/mtp_1")][1] == pytest.approx(sum(mine) / accum, rel=1e-6)
    assert len(MTP_SEEN) == steps * accum
    layers = st.sql("SELECT metric, step, layer FROM layer_stats_effective WHERE run = 'hf-sft'").fetchall()
    maxvio = {(s, la) for m, s, la in layers if m == "maxvio"}
    assert maxvio == {(s, la) for s in range(1, steps + 1) for la in MOE_LAYERS}
    assert {la for m, _, la in layers if m == "wgrad_norm"} == set(range(6))
    info = st.sql("SELECT precision, config FROM runs WHERE run = 'hf-sft'").fetchone()
    assert info[0] == "bf16" and '"gradient_accumulation_steps": 2' in info[1]
    st.close()


@pytest.mark.slow
def test_lightning_one_line(tmp_path: Path) -> None:
    L = needs("lightning")  # noqa: N806 - the framework's conventional alias
    store = tmp_path / "store"
    steps, accum = 3, 2
    seen: list[tuple[int, float, float]] = []  # (global step, mean loss of the step's microbatches, grad norm)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _nemotron_h()
            self._losses: list[float] = []

        def training_step(self, batch: dict[str, torch.Tensor], _idx: int) -> torch.Tensor:
            loss = self.model(**batch).loss
            self._losses.append(float(loss.detach()))  # the test's own record (a sync is fine here)
            return loss

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters() if p.grad is not None]))
            seen.append((self.trainer.global_step + 1, sum(self._losses) / len(self._losses), float(norm)))
            self._losses = []

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(_data(steps * accum * BATCH), batch_size=BATCH)
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accum, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[hw.integrations.LightningCallback(store=store, run="pl")])
    trainer.fit(Module(), data)
    assert [s for s, _, _ in seen] == [1, 2, 3]

    st = open_store(store)
    by = {(s, n): (t, v) for s, t, n, v in st.sql(
        "SELECT step, tokens, name, value FROM scalars_effective WHERE run = 'pl'").fetchall()}
    for step, loss, gnorm in seen:
        # Lightning divides each microbatch loss by accumulate_grad_batches for backward; the
        # recorded train loss is the step's mean microbatch loss (unscaled), as computed here.
        assert by[(step, "loss/train")][1] == pytest.approx(loss, rel=1e-5)
        # The gradients the optimizer sees hold the 1/accum scaling; so does the Monitor's norm.
        assert by[(step, "grad_norm/total")][1] == pytest.approx(gnorm, rel=1e-4)
        assert by[(step, "loss/train")][0] == step * accum * BATCH * SEQ
    maxvio = {(s, la) for s, la in st.sql(
        "SELECT step, layer FROM layer_stats_effective WHERE run = 'pl' AND metric = 'maxvio'").fetchall()}
    assert maxvio == {(s, la) for s in range(1, steps + 1) for la in MOE_LAYERS}
    st.close()
