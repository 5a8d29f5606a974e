"""End to end through scripts/train.py on the real binarized MNIST: every estimator trains a few
steps, writes the TensorBoard tags, hparams and a checkpoint; a multirun names runs by overrides;
config mistakes get clear messages, not tracebacks."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import REPO, error_of, run_script, train_in
from discrete_vae.errors import ConfigError
from discrete_vae.training import check_temperature_settings

ESTIMATORS = sorted(p.stem for p in (REPO / "conf" / "estimator").glob("*.yaml"))
TINY = [
    "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
]


def run_train(args, data_root, check=True):
    return run_script("train.py", *args, env={"DISCRETE_VAE_DATA": str(data_root)}, check=check)


# validation and test on 2 x 200 and 200 images, the test bound with 5 samples: what the tests read, at a
# tenth of the default cost (15 runs)
SMALL_EVALUATION = ["data.eval_batch_size=200", "test_iwae_samples=5"]
SMALL_NAME = "data.eval_batch_size=200,test_iwae_samples=5"  # as they appear in a run folder's name (sorted)
ON_BITS = ["arm", "disarm", "exact", "relax"]  # on 8 Bernoulli latents: made for them, enumerating 2^8, or both types
CATEGORICAL = [name for name in ESTIMATORS if name not in ON_BITS]


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory) -> dict:
    """Every estimator trained a few steps through scripts/train.py, two multiruns in all: those that
    fit the default 20x10 categorical model, and on 8 Bernoulli latents those made for binary
    latents and exact (2^8 configurations).  # name -> run folder"""
    sweep, binary = tmp_path_factory.mktemp("every_estimator"), tmp_path_factory.mktemp("binary")
    small = [*TINY, *SMALL_EVALUATION]
    run_train(["-m", f"estimator={','.join(CATEGORICAL)}", "seed=2", *small, f"hydra.sweep.dir={sweep}"], data_root)
    run_train(["-m", f"estimator={','.join(ON_BITS)}", "seed=2", "latent=bernoulli", "latent.num_latents=8", *small,
               f"hydra.sweep.dir={binary}"], data_root)
    return {name: sweep / f"{name},seed=2,{SMALL_NAME},trainer.max_epochs=1" if name in CATEGORICAL
            else binary / (f"{name},seed=2,data.eval_batch_size=200,latent=bernoulli,latent.num_latents=8,"
                           f"test_iwae_samples=5,trainer.max_epochs=1")
            for name in ESTIMATORS}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_estimator_trains_and_logs(name, trained):
    run_dir = trained[name]

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    expected = {"train/loss", "train/neg_elbo", "train/recon", "train/kl", "val/neg_elbo", "test/neg_elbo", "test/nll_iwae"}
    assert expected <= scalars, scalars
    has_tau = name in {"gumbel", "st_gumbel", "st", "st_annealed", "gumbel_rao", "reinmax", "gst"}
    assert ("train/temperature" in scalars) == has_tau
    assert {"val/reconstructions", "val/samples"} <= images
    assert len(events.Scalars("train/loss")) == 4
    val = events.Scalars("val/neg_elbo")[-1].value
    assert 50 < val < 600, "a negative ELBO in nats per binarized MNIST image"

    hparams = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert "val/neg_elbo" in {m.name.tag for m in experiment.metric_infos}
    session = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["choice/estimator"].string_value == name
    assert session.hparams["latent/num_latents"].number_value == (8 if name in ON_BITS else 20)

    checkpoints = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and any(c.startswith("best") for c in checkpoints)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["config"]["seed"] == 2 and any(k.startswith("model.encoder.") for k in state["state_dict"])
    assert ("estimator.tau" in state["state_dict"]) == has_tau
    if name in ("rebar", "relax"):  # learned by the variance gradient, checkpointed with their Adam state
        assert "estimator.log_tau" in state["state_dict"] and "estimator.scale" in state["state_dict"]
        adam = state["optimizer_states"][0]
        assert len(adam["state"]) == len(adam["param_groups"][0]["params"]), "every parameter got a gradient"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["estimator"] == name and metrics["steps"] == 4
    options = metrics["estimator_config"]  # the resolved options: a default changed later leaves no doubt
    assert options["_target_"].startswith("discrete_vae.estimators.")
    assert options == OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "estimator" / f"{name}.yaml"))
    assert metrics["metrics"]["val/neg_elbo"] == pytest.approx(val, rel=1e-5)
    assert metrics["machine"]["cpu"] and metrics["machine"]["threads"] >= 1 and metrics["machine"]["torch"]
    assert metrics["commit"] is None or len(metrics["commit"]) >= 7  # None outside a git checkout


def test_multirun_names_runs_by_their_overrides(trained):
    sweep = trained["gumbel"].parent
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    # the estimator first, then the seed; budgets like limit_*_batches are excluded, max_epochs is kept
    assert runs == sorted(f"{name},seed=2,{SMALL_NAME},trainer.max_epochs=1" for name in CATEGORICAL)
    for run in runs:
        assert list((sweep / run).glob("events.out.tfevents.*")), run
        assert (sweep / run / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((sweep / run / "metrics.json").read_text())["seed"] == 2


def test_a_refused_job_does_not_stop_the_sweep(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "estimator=exact,st", *TINY, f"hydra.sweep.dir={sweep}"], data_root, check=False)
    assert proc.returncode != 0, "the sweep reports the failed job"
    assert "Error executing job with overrides" in proc.stderr and "max_configs=4096" in proc.stderr
    failed = json.loads((sweep / "exact,trainer.max_epochs=1" / "metrics.json").read_text())
    assert failed["status"] == "failed" and "max_configs" in failed["error"]
    finished = json.loads((sweep / "st,trainer.max_epochs=1" / "metrics.json").read_text())
    assert finished["status"] == "finished" and finished["steps"] == 4


def test_exact_over_budget_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    message = error_of(lambda: train_in(tmp_path / "run", monkeypatch, "estimator=exact", *TINY, quick=False))
    assert "1e+20 configurations of N=20 categorical latents of K=10" in message
    assert "max_configs=4096" in message and "latent.num_latents=2" in message


def test_missing_data_is_a_clear_message(tmp_path, monkeypatch):
    message = error_of(lambda: train_in(tmp_path / "run", monkeypatch, "data.download=false", *TINY,
                                        f"data.root={tmp_path}", quick=False))
    assert "binarized_mnist_train.amat" in message and "data.download=false" in message


def test_unknown_estimator_lists_the_available_ones(data_root, tmp_path):
    proc = run_train(["estimator=nope", f"hydra.run.dir={tmp_path}"], data_root, check=False)
    assert proc.returncode != 0
    assert "estimator=nope is not an option; choose from" in proc.stderr
    for name in ESTIMATORS:
        assert name in proc.stderr


def test_help_shows_the_groups(data_root):
    proc = run_train(["--help"], data_root)
    for group in ("data", "latent", "model", "estimator", "trainer", "callbacks", "logger"):
        assert f"{group}:" in proc.stdout, proc.stdout
    assert "st_gumbel" in proc.stdout


def test_the_temperature_set_is_the_temperature_used(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train_in(run_dir, monkeypatch, "estimator=gumbel", "estimator.tau=5", *TINY, "test_iwae_samples=0", quick=False)
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("train/temperature")] == [5.0] * 4
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["state_dict"]["estimator.tau"].item() == 5.0

    message = error_of(lambda: train_in(tmp_path / "low", monkeypatch, "estimator=gumbel", "estimator.tau=0.2", *TINY,
                                        quick=False))
    assert "estimator.tau=0.2 is below the temperature's floor 0.5" in message

    with pytest.raises(ConfigError, match="two different starts of the temperature schedule"):
        check_temperature_settings(["estimator=gumbel", "estimator.tau=5", "callbacks.temperature.tau_0=2"])
    check_temperature_settings(["estimator.tau=5", "callbacks.temperature.tau_0=5"])  # the same start: fine


def test_the_image_grid_lays_images_out_in_rows_with_borders():
    from discrete_vae.module import image_grid

    images = torch.arange(1.0, 4.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)  # three 2x2 images of 1, 2, 3
    grid = image_grid(images, nrow=2, pad=1)
    assert grid.shape == (1, 7, 7)  # 2 rows and 2 columns of (2 + 1) pixels, and the last border
    assert grid[0, 1:3, 1:3].eq(1).all() and grid[0, 1:3, 4:6].eq(2).all() and grid[0, 4:6, 1:3].eq(3).all()
    assert grid[0, 4:6, 4:6].eq(0).all() and grid[0, 0].eq(0).all() and grid[0, :, 3].eq(0).all()


@pytest.mark.parametrize("max_steps, global_step, done, total", [
    (300, 0, 0, 300),      # max_steps ends the first epoch early
    (1200, 1000, 0, 200),  # and the third
    (1200, 1100, 100, 200),  # resumed in the middle of it: the batches done count
    (1200, 1250, 250, 0),  # past the budget (a checkpoint from a longer run): nothing left
    (-1, 0, 0, 500),       # no step budget: the whole epoch
    (5000, 0, 0, 500),
])
def test_the_progress_bar_total_knows_max_steps(max_steps, global_step, done, total, monkeypatch):
    from types import SimpleNamespace

    from discrete_vae.callbacks import ProgressBar

    bar = ProgressBar()
    trainer = SimpleNamespace(max_steps=max_steps, global_step=global_step, num_training_batches=500,
                              max_epochs=None, accumulate_grad_batches=1)
    monkeypatch.setattr(ProgressBar, "trainer", property(lambda self: trainer))
    assert bar.total_train_batches == total
