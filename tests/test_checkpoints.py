"""discrete_vae.checkpoints: what a checkpoint may hold and how an earlier layout still loads, the
wall clock it carries, and the best-checkpoint record across a moved run folder."""

import pickle
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import tiny_module
from discrete_vae import estimators as E
from discrete_vae.build import load_checkpoint
from discrete_vae.checkpoints import BestCheckpoint, WallClock, read_checkpoint, upgrade
from discrete_vae.errors import DataError

RUN_CONFIG = {
    "seed": 3, "test_iwae_samples": 7, "num_images": 8,
    "latent": {"_target_": "discrete_vae.latents.Categorical", "num_latents": 2, "num_categories": 3},
    "model": {"_target_": "discrete_vae.vae.VAE", "_convert_": "all", "input_dim": 784, "hidden_dims": [8],
              "activation": "ReLU", "output_bias_init": "default"},
    "estimator": {"_target_": "discrete_vae.estimators.GumbelSoftmax", "tau": 0.7},
    "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3},
    "data": {"_target_": "discrete_vae.data.BinarizedMNIST"},
}


def saved(tmp_path, checkpoint: dict, name: str = "run.ckpt"):
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def current_checkpoint() -> dict:
    torch.manual_seed(0)
    model = tiny_module(E.GumbelSoftmax(tau=0.7), seed=3, test_iwae_samples=7, run_config=RUN_CONFIG)
    return {"state_dict": model.state_dict(), "config": RUN_CONFIG, "choices": {"estimator": "gumbel"}}


def legacy(checkpoint: dict) -> dict:
    """The same checkpoint in the layout written before discrete_vae.vae and conf/latent existed."""
    cfg = checkpoint["config"]
    model = {**cfg["model"], "_target_": "discrete_vae.model.CategoricalVAE", "seed": cfg["seed"],
             "optimizer": cfg["optimizer"], "test_iwae_samples": cfg["test_iwae_samples"],
             "num_latents": cfg["latent"]["num_latents"], "num_categories": cfg["latent"]["num_categories"]}
    old = {k: v for k, v in cfg.items() if k not in ("latent", "optimizer", "test_iwae_samples", "num_images")}
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    return {**checkpoint, "config": {**old, "model": model}, "state_dict": state}


def test_a_checkpoint_of_the_earlier_layout_loads_into_the_same_model(tmp_path):
    current = current_checkpoint()
    old = legacy(current)
    assert "encoder.net.0.weight" in old["state_dict"] and "latent" not in old["config"]
    model, cfg = load_checkpoint(saved(tmp_path, old))
    assert cfg.latent.num_latents == 2 and cfg.optimizer.lr == 1e-3 and cfg.test_iwae_samples == 7
    assert model.test_iwae_samples == 7 and float(model.estimator.tau) == pytest.approx(0.7)
    for key, value in current["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert upgrade(current_checkpoint())["config"] == RUN_CONFIG  # the current layout: untouched


def test_a_checkpoint_holding_python_objects_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "config": Payload()}, path)  # torch's format, an object inside
    with pytest.raises(DataError, match="holds Python objects, and loading them could run code"):
        read_checkpoint(path)
    path.write_bytes(pickle.dumps({"state_dict": {}, "config": Payload()}))  # a bare pickle
    with pytest.raises(DataError, match="it is not a torch checkpoint"):
        read_checkpoint(path)
    assert not marker.exists()


def test_wall_clock_carries_the_time_of_earlier_processes():
    clock = WallClock()
    assert clock.state_dict() == {"elapsed_s": 0.0}  # nothing run yet
    clock.load_state_dict({"elapsed_s": 100.0})  # a resume: 100 s before the checkpoint
    clock.on_fit_start(None, None)
    assert clock.before == 100.0 and clock.state_dict()["elapsed_s"] >= 100.0
    clock.load_state_dict({"elapsed_s": 5000.0})  # trainer.test restoring the best checkpoint's callbacks
    assert clock.before == 100.0, "the tested checkpoint's time was added to the run's"
    fresh = WallClock()
    fresh.load_state_dict({})  # a checkpoint written before the clock existed
    assert fresh.before == 0.0


def test_best_checkpoint_record_follows_a_moved_folder(tmp_path):
    """The stored paths are moved onto the current folder; files not there are dropped, and the
    best and k-th are those of the files kept. Lightning's class forgets the whole record."""
    old, new = "/elsewhere/run/checkpoints", tmp_path / "checkpoints"
    new.mkdir()
    for name in ("best-step10.ckpt", "best-step20.ckpt"):
        (new / name).touch()  # best-step30 did not come along
    state = {
        "dirpath": old, "best_model_path": f"{old}/best-step30.ckpt", "best_model_score": torch.tensor(1.0),
        "kth_best_model_path": f"{old}/best-step10.ckpt", "kth_value": torch.tensor(3.0),
        "last_model_path": "", "current_score": torch.tensor(1.0), "monitor": "val/neg_elbo",
        "best_k_models": {f"{old}/best-step{s}.ckpt": torch.tensor(v) for s, v in ((10, 3.0), (20, 2.0), (30, 1.0))},
    }
    callback = BestCheckpoint(dirpath=str(new), monitor="val/neg_elbo", mode="min", save_top_k=3)
    twin = ModelCheckpoint(dirpath=str(new), monitor="val/neg_elbo", mode="min", save_top_k=3)
    assert callback.state_key == twin.state_key  # checkpoints of Lightning's class resume into it
    callback.load_state_dict(state)
    assert set(callback.best_k_models) == {str(new / "best-step10.ckpt"), str(new / "best-step20.ckpt")}
    assert callback.best_model_path == str(new / "best-step20.ckpt") and callback.best_model_score == 2.0
    assert callback.kth_best_model_path == str(new / "best-step10.ckpt") and callback.kth_value == 3.0

    (new / "best-step30.ckpt").touch()  # the same folder, every file there: Lightning's restore, all kept
    unmoved = BestCheckpoint(dirpath=str(new), monitor="val/neg_elbo", mode="min", save_top_k=3)
    unmoved.load_state_dict({**state, "dirpath": str(new), "best_k_models": {
        str(new / f"best-step{s}.ckpt"): torch.tensor(v) for s, v in ((10, 3.0), (20, 2.0), (30, 1.0))}})
    assert unmoved.best_model_path == str(new / "best-step30.ckpt") and len(unmoved.best_k_models) == 3


def test_restored_paths_stay_inside_the_checkpoint_folder(tmp_path):
    """Paths that leave the folder (`..`, another absolute path) are dropped from the record, so that
    Lightning never deletes them; the files of the folder are kept."""
    here = tmp_path / "run" / "checkpoints"
    here.mkdir(parents=True)
    (here / "best-step10.ckpt").touch()
    (tmp_path / "victim").touch()
    outside = [f"{here}/../../victim", str(tmp_path / "victim"), "relative/victim", 7]
    state = {"dirpath": str(here), "best_model_path": outside[0], "kth_best_model_path": outside[1],
             "best_model_score": torch.tensor(1.0), "kth_value": torch.tensor(9.0), "last_model_path": outside[0],
             "best_k_models": {**{str(p): torch.tensor(1.0) for p in outside}, str(here / "best-step10.ckpt"): torch.tensor(2.0)}}
    callback = BestCheckpoint(dirpath=str(here), monitor="val/neg_elbo", mode="min", save_top_k=1)
    callback.load_state_dict(state)
    assert callback.best_k_models == {str(here / "best-step10.ckpt"): 2.0}
    assert callback.best_model_path == callback.kth_best_model_path == str(here / "best-step10.ckpt")
    assert callback.last_model_path == ""


def test_a_checkpoint_with_other_stochastic_layers_is_refused_and_an_earlier_one_fits():
    """The fit check names upper_latents and model.upper_hidden_dims too; a checkpoint written before
    those keys existed (no upper_latents in its config) fits a one-layer config."""
    from discrete_vae.checkpoints import check_checkpoint_fits
    from discrete_vae.errors import ConfigError

    bits = {"_target_": "discrete_vae.latents.Bernoulli", "num_latents": 8, "prior": "uniform"}
    base = {"model": {"_target_": "discrete_vae.vae.VAE", "input_dim": 784, "hidden_dims": [16], "activation": "ReLU",
                      "activation_args": {}, "upper_hidden_dims": []},
            "latent": bits, "upper_latents": [bits], "estimator": {"_target_": "discrete_vae.estimators.ARM"}}
    other = {**base, "upper_latents": [{**bits, "num_latents": 4}]}
    with pytest.raises(ConfigError, match="upper_latents=.*'num_latents': 8.*the config says.*'num_latents': 4"):
        check_checkpoint_fits({"config": base}, other, Path("x.ckpt"), {})
    earlier = {"config": {**base, "upper_latents": None, "model": {"input_dim": 784, "hidden_dims": [16], "activation": "ReLU"}}}
    check_checkpoint_fits(earlier, {**base, "upper_latents": []}, Path("x.ckpt"), {})
