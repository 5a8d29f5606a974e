"""Extending the framework: a new latent type is one class and one YAML file, and so is a new
estimator, with nothing in the package to edit. Here both live in a folder of the test's own
(a module on PYTHONPATH, YAML files on Hydra's search path), as a user's would."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, run_script
from discrete_vae.build import build_model, load_checkpoint
from discrete_vae.errors import ConfigError, DataError
from discrete_vae.evaluation import evaluate

PARTS = '''
"""A user's latent type and estimator."""
import math

import torch
import torch.nn.functional as F

from discrete_vae import sampling
from discrete_vae.estimators import ANY_LATENT, Estimator, EstimatorOutput
from discrete_vae.latents import Latent


class Bits(Latent):
    """N independent bits under a uniform prior; the encoder gives one logit per bit."""

    name = "bits"

    def __init__(self, num_bits: int = 4):
        super().__init__()
        self.num_bits = num_bits

    @property
    def param_shape(self):
        return (self.num_bits,)

    def sample(self, logits, sample_shape=(), generator=None):
        shape = torch.Size(sample_shape) + logits.shape
        u = sampling.uniform(shape, device=logits.device, dtype=logits.dtype, generator=generator)
        return (u < torch.sigmoid(logits)).to(logits.dtype)

    def log_prob(self, logits, z):
        logits, z = torch.broadcast_tensors(logits, z)
        return -F.binary_cross_entropy_with_logits(logits, z, reduction="none").sum(-1)

    def kl(self, logits):
        p = torch.sigmoid(logits)
        return (p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits)).sum(-1) + self.num_bits * math.log(2)

    def prior_log_prob(self, z):
        return z.new_full(z.shape[:-1], -self.num_bits * math.log(2))

    def prior_sample(self, num, generator=None, device=None):
        return (sampling.uniform((num, self.num_bits), device=device, generator=generator) < 0.5).float()

    @property
    def num_configs(self):
        return 2**self.num_bits

    def enumerate(self, start=0, end=None, *, device=None, dtype=torch.float32):
        end = self.num_configs if end is None else min(end, self.num_configs)
        index = torch.arange(start, end, device=device)
        return ((index[:, None] >> torch.arange(self.num_bits - 1, -1, -1, device=device)) & 1).to(dtype)


class PlainReinforce(Estimator):
    """f(z) grad log q(z|x), no baseline (Williams 1992): the simplest unbiased estimator."""

    latent_types = ANY_LATENT

    def forward(self, logits, cost, latent):
        z = latent.sample(logits)
        f = cost(z)
        return EstimatorOutput(f + f.detach() * latent.log_prob(logits, z), f)
'''


@pytest.fixture(scope="module")
def user_parts(tmp_path_factory):
    """The folder with the user's module (user_parts.py) and conf/ (latent/bits.yaml, estimator/plain_reinforce.yaml)."""
    root = tmp_path_factory.mktemp("user")
    (root / "user_parts.py").write_text(textwrap.dedent(PARTS))
    (root / "conf" / "latent").mkdir(parents=True)
    (root / "conf" / "estimator").mkdir()
    (root / "conf" / "latent" / "bits.yaml").write_text("_target_: user_parts.Bits\nnum_bits: 4\n")
    (root / "conf" / "estimator" / "plain_reinforce.yaml").write_text("_target_: user_parts.PlainReinforce\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def compose_user(root, overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"hydra.searchpath=[file://{root / 'conf'}]", *overrides])


def test_the_new_parts_plug_in_and_the_estimators_say_what_they_support(user_parts):
    torch.manual_seed(0)
    model = build_model(compose_user(user_parts, ["latent=bits", "estimator=exact", "model.hidden_dims=[16]"]))
    x = (torch.rand(5, 784) < 0.2).float()
    out = model.vae.objective(x, model.estimator)
    # exact enumeration of the 16 configurations through the type's own enumerate and log_prob
    logits = model.vae.encode(x)
    configs = model.vae.latent.enumerate()  # (16, 4)
    q = model.vae.latent.log_prob(logits, configs[:, None]).exp()  # (16, B)
    assert torch.allclose(q.sum(0), torch.ones(5), atol=1e-6)
    expected = (q * model.vae.cost(configs[:, None], x)).sum(0) + model.vae.kl(logits)
    assert torch.allclose(out.loss, expected.mean(), rtol=1e-5)
    with pytest.raises(ConfigError, match="supports categorical and bernoulli latents, not bits"):
        build_model(compose_user(user_parts, ["latent=bits", "estimator=zgr"]))


def test_a_run_with_them_trains_checkpoints_and_evaluates(user_parts, data_root, tmp_path):
    run = tmp_path / "run"
    args = [f"hydra.searchpath=[file://{user_parts / 'conf'}]", "latent=bits", "estimator=plain_reinforce",
            "trainer.max_steps=6", "trainer.limit_val_batches=2", "trainer.limit_test_batches=1",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"]
    run_script("train.py", *args, env={"DISCRETE_VAE_DATA": str(data_root), "PYTHONPATH": str(user_parts)})
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "finished" and record["estimator"] == "plain_reinforce" and record["steps"] == 6
    with pytest.raises(DataError, match="latent._target_='user_parts.Bits' is not a Latent of discrete_vae"):
        load_checkpoint(run / "checkpoints" / "last.ckpt")  # a package of the user's: named, or refused
    module, cfg = load_checkpoint(run / "checkpoints" / "last.ckpt", trusted_modules=["user_parts"])
    assert cfg.latent._target_ == "user_parts.Bits" and type(module.estimator).__name__ == "PlainReinforce"
    x = (torch.rand(20, 784, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    result = evaluate(module.vae, [x], num_samples=50, seed=0)
    # with 16 configurations the exact -log p(x) exists, and the bounds lie above it
    assert result["nll_exact"] is not None and result["nll_iwae"] >= result["nll_exact"] - 0.5
    assert result["neg_elbo"] >= result["nll_exact"]
