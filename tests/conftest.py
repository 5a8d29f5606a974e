"""Shared fixtures: the real data location, and the tiny estimator problem (N=2, K=3); the `gpu` marker's skip."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from discrete_vae.cli import normalize_overrides
from discrete_vae.errors import UserError
from discrete_vae.latents import Categorical
from discrete_vae.module import VAEModule
from discrete_vae.vae import VAE

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where torch sees a CUDA device, and are skipped (visibly, -ra) elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device, and torch sees none here: run pytest on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared_data_root() -> Path:
    """$DISCRETE_VAE_DATA if set, else ../shared/data beside the repository."""
    root = os.environ.get("DISCRETE_VAE_DATA")
    return Path(root).resolve() if root else (REPO.parent / "shared" / "data").resolve()


def run_script(script: str, *args, env: dict | None = None, cwd: Path = REPO, check: bool = True,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """`python scripts/<script> args...` as a user runs it, output captured: the data from
    `shared_data_root()`, this checkout's package and this folder (probes.py's callbacks) first on
    PYTHONPATH, Python's warnings off; `env` adds or replaces variables (a PYTHONPATH of its own
    comes after those two). With `check`, a non-zero exit fails the test with its stderr."""
    env = dict(env or {})
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), *filter(None, [env.pop("PYTHONPATH", None)])])
    env = {**os.environ, "DISCRETE_VAE_DATA": str(shared_data_root()), "PYTHONWARNINGS": "ignore", **env,
           "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_in(folder: Path, monkeypatch, *overrides: str, quick: bool = True):
    """What scripts/train.py does under Hydra, in this process: discrete_vae.training.train with
    `folder` as the run folder and working directory, 6 steps of the QUICK settings (with
    `quick`) unless the overrides say otherwise, under a 60 s alarm (a refusal that hangs fails
    the test instead of the suite). A UserError comes out as itself: what the script prints as
    its one line."""
    from discrete_vae.training import train

    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        defaults = [f"data.root={shared_data_root()}", *(["trainer.max_steps=6", *QUICK] if quick else [])]
        cfg = compose("train", overrides=normalize_overrides([*defaults, *overrides]),  # the last of a key wins
                      return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(folder)
    HydraConfig.instance().set_config(cfg)  # as hydra.main sets it: the run folder's paths resolve
    with open_dict(cfg):
        del cfg["hydra"]
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("training hung"))
    signal.alarm(60)
    try:
        return train(cfg)
    finally:
        signal.alarm(0)
        HydraConfig.instance().cfg = None  # no other test sees this run's Hydra config


def error_of(fn) -> str:
    """The one-line message of the UserError `fn` raises."""
    with pytest.raises(UserError) as caught:
        fn()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def load_script(name: str):
    """scripts/<name>.py as a module, to call its functions in this process (scripts are no package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# a short run's settings: one batch a validation and test, no TensorBoard, last.ckpt every 2 steps
QUICK = ["trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "test_iwae_samples=0", "logger=null",
         "trainer.enable_progress_bar=false", "callbacks.latest.every_n_train_steps=2"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_root) -> Path:
    """A finished 4-step run of scripts/train.py, shared by the tests that craft or open its files
    (copy what you change: it is never to be written to)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    run_script("train.py", "trainer.max_steps=4", *QUICK, f"hydra.run.dir={run}")
    return run


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = shared_data_root()
    if not (root / "binarized_mnist").is_dir():
        pytest.fail(f"the binarized MNIST is not at {root}/binarized_mnist: set DISCRETE_VAE_DATA")
    return root


class TinyProblem:
    """E_q[f(z)] with N=2 latents of K=3 categories, a fixed random linear decoder to D=6
    Bernoulli pixels and a fixed binary x: small enough to enumerate by hand."""

    N, K, D = 2, 3, 6

    def __init__(self, seed: int = 0):
        self.latent = Categorical(self.N, self.K)
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(self.N, self.K, generator=g, dtype=torch.float64)  # (N, K)
        self.weight = torch.randn(self.N * self.K, self.D, generator=g, dtype=torch.float64) * 1.5
        self.bias = torch.randn(self.D, generator=g, dtype=torch.float64)
        self.x = (torch.rand(self.D, generator=g) < 0.5).to(torch.float64)

    def cost(self, z: torch.Tensor) -> torch.Tensor:
        """f(z) = -log p(x|z).  # (..., N, K) -> (...)"""
        logits_x = z.flatten(-2) @ self.weight + self.bias
        x = self.x.expand_as(logits_x)
        return F.binary_cross_entropy_with_logits(logits_x, x, reduction="none").sum(-1)

    def exact_grad(self) -> torch.Tensor:
        """d/dlogits of sum_z q(z) f(z) by brute force over the K^N configurations, with loops.  # (N, K)"""
        logits = self.logits.clone().requires_grad_()
        log_q = torch.log_softmax(logits, -1)
        total = 0.0
        for i in range(self.K):
            for j in range(self.K):
                z = torch.zeros(self.N, self.K, dtype=torch.float64)
                z[0, i] = z[1, j] = 1.0
                total = total + torch.exp(log_q[0, i] + log_q[1, j]) * self.cost(z)
        (grad,) = torch.autograd.grad(total, logits)
        return grad

    def sample_grads(self, estimator, num: int) -> torch.Tensor:
        """`num` independent gradient estimates w.r.t. the logits, in one batched call.  # (num, N, K)

        The logits are replicated into a batch of `num` rows; each row's surrogate depends on
        its own row only, so the gradient of the summed surrogate holds one estimate per row.
        """
        logits = self.logits.expand(num, self.N, self.K).clone().requires_grad_()
        out = estimator(logits, self.cost, self.latent)
        (grad,) = torch.autograd.grad(out.loss.sum(), logits)
        return grad


@pytest.fixture
def tiny() -> TinyProblem:
    return TinyProblem()


def assert_mean_matches(samples: torch.Tensor, target: torch.Tensor, z: float = 5.0, atol: float = 1e-9) -> None:
    """Per coordinate, |mean(samples) - target| <= z * (Monte-Carlo standard error) + atol."""
    mean = samples.mean(0)
    se = samples.std(0) / samples.shape[0] ** 0.5
    excess = (mean - target).abs() - (z * se + atol)
    assert (excess <= 0).all(), f"mean {mean} vs target {target}, standard error {se}"


def tiny_vae(num_latents: int = 2, num_categories: int = 3, input_dim: int = 784, hidden_dims=(8,), **kwargs) -> VAE:
    """A small categorical VAE (PyTorch's initialisation unless output_bias_init is given)."""
    kwargs.setdefault("output_bias_init", "default")
    return VAE(Categorical(num_latents, num_categories), input_dim=input_dim, hidden_dims=hidden_dims, **kwargs)


def tiny_module(estimator, num_latents: int = 2, num_categories: int = 3, input_dim: int = 784, hidden_dims=(8,),
                output_bias_init: str = "default", **kwargs) -> VAEModule:
    """The LightningModule around `tiny_vae`, training with `estimator`."""
    vae = tiny_vae(num_latents, num_categories, input_dim, hidden_dims, output_bias_init=output_bias_init)
    return VAEModule(vae, estimator, **kwargs)
