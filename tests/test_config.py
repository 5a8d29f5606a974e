"""Every estimator YAML composes with the training config and instantiates into a working model."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from discrete_vae.errors import ConfigError
from discrete_vae.estimators import Estimator
from discrete_vae.build import build_module

CONF = Path(__file__).resolve().parents[1] / "conf"
ESTIMATORS = sorted(p.stem for p in (CONF / "estimator").glob("*.yaml"))


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_the_registry_holds_the_documented_estimators():
    assert set(ESTIMATORS) >= {"sf", "gumbel", "st_gumbel", "st", "exact", "rloo", "gumbel_rao", "reinmax",
                               "gst", "zgr", "indecater", "arm", "disarm"}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_config_composes_and_instantiates(name):
    small = ["latent.num_latents=2", "latent.num_categories=10"] if name == "exact" else []
    cfg = compose_train([f"estimator={name}", *small])
    estimator = instantiate(cfg.estimator)
    if "has_binary_view" in estimator.needs:
        cfg = compose_train([f"estimator={name}", "latent=bernoulli"])  # a latent type that offers what it needs
    assert isinstance(estimator, Estimator)
    model = build_module(cfg)
    x = (torch.rand(3, 784) < 0.2).float()
    out = model.model.objective(x, model.estimator)
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.model.encoder.parameters())
    if estimator.has_temperature:
        assert estimator.tau.item() == pytest.approx(cfg.estimator.tau)


def test_exact_with_the_default_model_fails_at_construction():
    with pytest.raises(ConfigError, match="max_configs"):
        build_module(compose_train(["estimator=exact"]))


def test_defaults_match_jang_2017():
    cfg = compose_train([])
    assert (cfg.latent.num_latents, cfg.latent.num_categories, list(cfg.model.hidden_dims)) == (20, 10, [512, 256])
    assert cfg.optimizer.lr == 1e-3 and cfg.data.batch_size == 100
    t = cfg.callbacks.temperature
    assert (t.tau_0, t.tau_min, t.rate, t.interval) == (None, 0.5, 1e-4, 1000)  # starts at estimator.tau
    assert cfg.estimator.tau == 1.0


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_preset_builds_a_model_that_trains(name):
    """Each paper's preset composes, passes the start-up checks and gives a finite, differentiable loss."""
    cfg = compose_train([f"experiment={name}", "estimator=st"])
    model = build_module(cfg)
    x = (torch.rand(3, cfg.model.input_dim) < 0.2).float()
    out = model.model.objective(x, model.estimators)
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    out.loss.backward()


def test_jang2017_bernoulli_is_the_papers_784_200_784():
    """Jang et al. 2017, Figure 4(a): 200 Bernoulli latents, linear maps both ways, a learned prior."""
    cfg = compose_train(["experiment=jang2017_bernoulli"])
    linears = [m for m in build_module(cfg).model.modules() if isinstance(m, torch.nn.Linear)]
    assert sorted((m.in_features, m.out_features) for m in linears) == [(200, 784), (784, 200)]
    assert cfg.latent.prior == "learned" and cfg.data.batch_size == 100


def test_common_trainer_settings_need_no_plus():
    settings = {"strategy": "ddp", "precision": "bf16-mixed", "num_nodes": 2, "accumulate_grad_batches": 4,
                "gradient_clip_algorithm": "value", "max_time": "00:01:00:00", "profiler": "simple"}
    cfg = compose_train([f"trainer.{k}={v}" for k, v in settings.items()])
    assert {k: cfg.trainer[k] for k in settings} == settings


def test_sweep_folders_put_what_differs_first():
    from discrete_vae.cli import normalize_overrides, run_name

    name = run_name(["++trainer.max_steps=20", "seed=1", "estimator=sf", "data.root=/x"], exclude=["data.root"])
    assert name == "sf,seed=1,trainer.max_steps=20"
    assert normalize_overrides(["logger=null", "+logger=none", "ckpt_path=a=b,c"], path_keys=["ckpt_path"]) == [
        "~logger", "~logger", "ckpt_path='a=b,c'"]


def test_every_data_config_composes_into_its_datamodule(tmp_path):
    from discrete_vae import data as D

    expected = {"binarized_mnist": D.BinarizedMNIST, "mnist": D.DynamicMNIST, "fashion_mnist": D.DynamicFashionMNIST}
    assert {p.stem for p in (CONF / "data").glob("*.yaml")} == set(expected)
    for name, cls in expected.items():
        module = instantiate(compose_train([f"data={name}", f"data.root={tmp_path}"]).data)
        assert type(module) is cls and module.root == tmp_path
