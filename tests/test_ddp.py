"""Data-parallel training on the CPU: 2 processes (gloo) through scripts/train.py. Each rank trains
on its own share of every epoch (disjoint, together the whole split), so an epoch has half the
steps; the validation metric is reduced across ranks and equals the single-process value on the
same weights; one metrics.json, hparams and event files from rank zero only."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import lightning as L
import pytest
from hydra.utils import instantiate

from discrete_vae.build import load_checkpoint

from conftest import REPO, run_script


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("ddp")
    run = tmp / "run"
    env = {"DISCRETE_VAE_DATA": str(data_root), "PROBE_DIR": str(tmp)}
    args = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_epochs=1",
            "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "num_threads=1",
            "+callbacks.rows={_target_:probes.RecordRows}", f"hydra.run.dir={run}"]
    run_script("train.py", *args, env=env, timeout=600)
    return run, tmp


def test_ranks_train_on_disjoint_shares_that_cover_the_epoch(ddp_run, data_root):
    run, tmp = ddp_run
    seen = [json.loads((tmp / f"rows_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 25_000, "each rank trains on half of the 50,000 images"
    splits = instantiate(load_checkpoint(run / "checkpoints" / "last.ckpt")[1].data, root=str(data_root)).load_splits()
    everything = Counter(hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in splits["train"])
    assert Counter(seen[0]) + Counter(seen[1]) == everything, "together the ranks saw every image once"
    record = json.loads((run / "metrics.json").read_text())
    assert record["steps"] == 250, "an epoch has half as many steps per rank"


def test_validation_is_reduced_to_the_single_process_value(ddp_run, data_root):
    run, _ = ddp_run
    record = json.loads((run / "metrics.json").read_text())
    model, cfg = load_checkpoint(run / "checkpoints" / "best-step250.ckpt")  # the weights validated last
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    single = trainer.validate(model, datamodule=instantiate(cfg.data, root=str(data_root)), verbose=False)[0]["val/neg_elbo"]
    assert record["metrics"]["val/neg_elbo"] == pytest.approx(single, rel=1e-6)


def test_files_are_written_by_rank_zero_only(ddp_run):
    run, _ = ddp_run
    assert [p.name for p in run.glob("metrics*.json")] == ["metrics.json"]
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"
    assert len(list(run.glob("hparams.yaml"))) == 1
    assert {p.parent for p in run.rglob("events.out.tfevents.*")} == {run}, "event files from rank zero, in the run folder"
    assert not (REPO / ".pl_hydra_rank_1").exists() and not list(REPO.glob("outputs/*/*/train_ddp_process_1.log"))
