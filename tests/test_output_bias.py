"""The decoder's output bias at the logit of the training mean pixel, and what it prevents:
the collapse of the relaxed estimators to a single code on a small latent space (N=2, K=10)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import REPO, tiny_module
from discrete_vae.build import build_module
from discrete_vae.errors import ConfigError
from discrete_vae.estimators import StraightThrough
from discrete_vae.latents import Categorical
from discrete_vae.module import VAEModule
from discrete_vae.training import quiet_third_party
from discrete_vae.vae import VAE

# A seed with which gumbel, st_gumbel, st and gumbel_rao all ended with one code after 300
# steps with PyTorch's initialisation (exact did too, after 100 steps); measured when the
# data-mean initialisation was added.
COLLAPSE_SEED = 2
STEPS = {"exact": 100, "indecater": 100, "sf": 600}  # exact: 100 decoder passes a step, indecater 19; sf: learns slowly (noisy)
DEFAULT_STEPS = 300


def small_exact(estimator: str, data_root, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            "experiment=small_exact", f"estimator={estimator}", f"seed={COLLAPSE_SEED}",
            f"data.root={data_root}", *overrides,
        ])


def train_briefly(cfg, steps: int):
    """`steps` optimizer steps of the configured model and schedule, without validation or files."""
    quiet_third_party()
    L.seed_everything(cfg.seed, verbose=False)
    datamodule, model = instantiate(cfg.data), build_module(cfg)
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
        callbacks=[instantiate(cfg.callbacks.temperature)],
    )
    trainer.fit(model, datamodule=datamodule)
    return model, datamodule


@torch.no_grad()
def codes_and_neg_elbo(module: VAEModule, datamodule) -> tuple[int, float, float]:
    """Distinct codes (argmax of q) over the validation images, their negative ELBO, and the
    negative ELBO of the single-code model (decoder = the training mean image, KL = N log K)."""
    model, val = module.model, datamodule.load_splits()["val"].float()
    codes = len(torch.unique(model.encoder(val).argmax(-1), dim=0))
    neg_elbo = model.neg_elbo(val, generator=torch.Generator().manual_seed(0)).mean().item()
    mean = datamodule.load_splits()["train"].float().mean(0).expand_as(val)
    N, K = model.latent.param_shape
    single_code = F.binary_cross_entropy(mean, val, reduction="none").sum(-1).mean().item() + N * math.log(K)
    return codes, neg_elbo, single_code


def test_output_bias_is_the_logit_of_the_training_mean(data_root):
    cfg = small_exact("st", data_root)
    model, datamodule = train_briefly(cfg, steps=0)  # fit with no step: setup alone
    mean = datamodule.load_splits()["train"].float().mean(0)
    bias = model.model.decoder.net[-1].bias.detach()
    assert torch.allclose(torch.sigmoid(bias), mean.clamp(1e-3, 1 - 1e-3), atol=1e-6)
    assert bias.min().item() == pytest.approx(math.log(1e-3 / (1 - 1e-3)), rel=1e-5)  # the always-0 corner pixels
    assert not model.model.output_bias_pending

    before = bias.detach().clone()  # a second fit of the same model leaves the weights alone
    model.setup("fit")
    assert torch.equal(model.model.decoder.net[-1].bias, before)


def test_default_keeps_pytorch_initialisation(data_root):
    cfg = small_exact("st", data_root, "model.output_bias_init=default")
    L.seed_everything(cfg.seed, verbose=False)  # as train_briefly, before it builds the model
    fresh = build_module(cfg).model.decoder.net[-1].bias.detach().clone()
    model, _ = train_briefly(cfg, steps=0)
    assert torch.equal(model.model.decoder.net[-1].bias.detach(), fresh)


def test_a_bad_setting_and_a_datamodule_without_images_are_clear_errors():
    with pytest.raises(ConfigError, match="output_bias_init='mean'.*data_mean, default"):
        VAE(Categorical(2, 3), output_bias_init="mean")

    model = tiny_module(StraightThrough(), input_dim=4, hidden_dims=[5], output_bias_init="data_mean")
    loader = [torch.ones(2, 4)]
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    with pytest.raises(ConfigError, match="set model.output_bias_init=default"):
        trainer.fit(model, train_dataloaders=loader)


def test_a_loaded_checkpoint_keeps_its_bias(tmp_path):
    model = tiny_module(StraightThrough(), input_dim=4, hidden_dims=[5], output_bias_init="data_mean")
    assert model.model.output_bias_pending
    model.on_load_checkpoint({})
    assert not model.model.output_bias_pending


@pytest.mark.parametrize("estimator", [
    "exact", "sf", "rloo", "gumbel", "st", "st_gumbel", "gumbel_rao", "reinmax", "gst", "zgr", "indecater",
])
def test_every_estimator_trains_on_small_exact_without_collapse(estimator, data_root):
    model, datamodule = train_briefly(small_exact(estimator, data_root),
                                      STEPS.get(estimator, DEFAULT_STEPS))
    codes, neg_elbo, single_code = codes_and_neg_elbo(model, datamodule)
    assert codes >= 5, f"{estimator}: only {codes} codes in use on the validation images"
    assert neg_elbo < single_code - 10, f"{estimator}: val neg ELBO {neg_elbo:.1f}, one code gives {single_code:.1f}"


def test_without_it_the_same_seed_collapses(data_root):
    """The control: PyTorch's initialisation, same seed and steps, st_gumbel ends with one code."""
    cfg = small_exact("st_gumbel", data_root, "model.output_bias_init=default")
    model, datamodule = train_briefly(cfg, DEFAULT_STEPS)
    codes, neg_elbo, single_code = codes_and_neg_elbo(model, datamodule)
    assert codes == 1
    assert neg_elbo == pytest.approx(single_code, abs=1.0)
