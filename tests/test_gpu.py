"""The GPU path (issue #8, part 3). Every test here is marked `gpu`: it runs where torch sees a
CUDA device and is skipped, with the reason printed (pytest -ra), everywhere else. Run the suite
on a GPU machine to exercise it; nothing else in the suite needs one."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from conftest import tiny_module
from discrete_vae import sampling
from discrete_vae.estimators import STGumbelSoftmax
from test_long_runs import SHORT, kill_at, scalars, train, weights

pytestmark = pytest.mark.gpu
ON_GPU = ["trainer.accelerator=gpu", "trainer.devices=1"]


def test_gumbel_max_on_the_gpu_draws_the_softmax_distribution():
    generator = torch.Generator("cuda").manual_seed(0)
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0, -3.0], device="cuda")
    n = 200_000
    counts = sampling.gumbel_max(logits, (n,), generator=generator).sum(0).cpu()
    p = torch.softmax(logits, -1).cpu()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 18.47, f"chi2={chi2:.2f} (4 degrees of freedom, 99.9% quantile 18.47), counts={counts}"


class SyncIsAnError(L.Callback):
    """From before the model's own on_train_batch_start (the seeding) to after the optimizer step:
    any host synchronisation raises (torch.cuda.set_sync_debug_mode("error"))."""

    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("default")
        self.steps += 1


def test_the_training_step_makes_no_host_synchronisation():
    model = tiny_module(STGumbelSoftmax(), num_latents=4, num_categories=5, input_dim=16, hidden_dims=[32])
    data = (torch.rand(6, 10, 16) < 0.5).float().cuda()  # 6 batches of 10, already on the device
    probe = SyncIsAnError()
    # no step logs (log_every_n_steps > steps): a logging step hands tensors to the logger, which
    # reads them on the host by design, every log_every_n_steps
    trainer = L.Trainer(max_steps=6, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1000,
                        callbacks=[probe])  # fmt: skip
    try:
        trainer.fit(model, train_dataloaders=list(data))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert probe.steps == 6 and trainer.global_step == 6


def test_a_run_trains_tests_and_evaluates_on_the_gpu(data_root, tmp_path):
    run = tmp_path / "run"
    train([*SHORT, *ON_GPU, f"hydra.run.dir={run}"], data_root, tmp_path)
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "finished" and record["steps"] == 30
    assert record["machine"]["gpu"], record["machine"]
    assert all(v == v and abs(v) < 1e4 for v in record["metrics"].values()), record["metrics"]
    ckpt = run / "checkpoints" / "last.ckpt"
    evaluate = [f"ckpt_path={ckpt}", "num_samples=20", "device=cuda", "batch_size=100", "limit_batches=2"]
    train(evaluate, data_root, tmp_path, script="scripts/evaluate.py")
    evaluation = json.loads((run / "checkpoints" / "last_eval_test.json").read_text())
    assert evaluation["device"].startswith("cuda") and evaluation["metrics"]["nll_iwae"] > 0


def test_a_killed_gpu_run_resumes_exactly(data_root, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train([*SHORT, *ON_GPU, f"hydra.run.dir={straight}"], data_root, tmp_path)
    proc = train([*SHORT, *ON_GPU, kill_at(6), f"hydra.run.dir={broken}"], data_root, tmp_path, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    train([*SHORT, *ON_GPU, f"hydra.run.dir={broken}"], data_root, tmp_path)
    a, b = weights(straight), weights(broken)
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after resuming on the GPU"
    assert scalars(straight, "val/neg_elbo") == scalars(broken, "val/neg_elbo")
