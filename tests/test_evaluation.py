"""Likelihood bounds (discrete_vae/evaluation.py) and scripts/evaluate.py.

A small model (N=2 latents of K=10 categories, K^N = 100) is trained in-process for a
few hundred steps, so that the exact -log p(x) exists and the bounds can be checked
against it and against brute-force sums written with loops. Training makes q(z|x)
one-hot in float32 (entropy 0), where importance sampling cannot gain anything, so the
fixture then tempers the encoder (its last layer times 0.03): q spreads over many
configurations, and neg_elbo, nll_iwae and nll_exact differ by several nats.
Monte-Carlo comparisons allow Z standard errors of the per-image differences.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, load_script, run_script, shared_data_root, tiny_vae
from discrete_vae import sampling
from discrete_vae.data import load_binarized_mnist
from discrete_vae.errors import ConfigError
from discrete_vae.estimators import STGumbelSoftmax
from discrete_vae.evaluation import evaluate, exact_nll, iwae_bound, sample_bounds
from discrete_vae.vae import VAE

Z = 4.0  # standard errors allowed in Monte-Carlo comparisons


def _se(d: torch.Tensor) -> float:
    return (d.std() / math.sqrt(d.numel())).item()


@pytest.fixture(scope="module")
def images(data_root):
    """Validation images to train on, test images to evaluate."""
    return {
        "train": load_binarized_mnist(data_root, "valid", download=False).float(),
        "test": load_binarized_mnist(data_root, "test", download=False)[:200].float(),
    }


@pytest.fixture(scope="module")
def small_model(images) -> VAE:
    """N=2, K=10, one hidden layer of 64, 300 Adam steps of ST Gumbel-Softmax (a few seconds),
    then the encoder tempered: logits times 0.03, so that q(z|x) is far from one-hot."""
    torch.manual_seed(0)
    model, estimator = tiny_vae(2, 10, hidden_dims=(64,)), STGumbelSoftmax()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = images["train"]
    for step in range(300):
        x = data[(step * 100) % len(data) :][:100]
        optimizer.zero_grad()
        model.objective(x, estimator).loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.encoder.net[-1].weight.mul_(0.03)
        model.encoder.net[-1].bias.mul_(0.03)
    return model.eval()


def brute_force_nll(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """-log sum_z p(z) p(x|z) with explicit loops over the K^N configurations.  # (B,)"""
    N, K = model.latent.param_shape
    terms = []
    with torch.no_grad():
        for i in range(K):
            for j in range(K):
                z = torch.zeros(1, N, K)
                z[0, 0, i] = z[0, 1, j] = 1.0
                logits_x = model.decoder(z.flatten(-2))  # (1, D)
                log_px = -F.binary_cross_entropy_with_logits(logits_x.expand_as(x), x, reduction="none").sum(-1)
                terms.append(log_px - N * math.log(K))
    return -torch.logsumexp(torch.stack(terms), dim=0)


def test_exact_nll_matches_brute_force_and_chunking(small_model, images):
    x = images["test"][:50]
    reference = brute_force_nll(small_model, x)
    assert torch.allclose(exact_nll(small_model, x), reference, rtol=1e-5, atol=1e-3)
    # 7 configuration rows per chunk (50 images, max_rows=350) gives the same numbers
    assert torch.allclose(exact_nll(small_model, x, max_rows=350), reference, rtol=1e-5, atol=1e-3)


def test_neg_elbo_matches_the_exact_elbo(small_model, images):
    """Averaged over draws and images, the sampled neg_elbo is the exact E_q[-log p(x|z)] + KL
    within MC error (per image q is often nearly deterministic, so compare the average)."""
    x = images["test"][:100]
    with torch.no_grad():  # E_q[cost] by enumeration, as estimators.Exact computes it
        logits = small_model.encoder(x)  # (B, N, K)
        configs = sampling.enumerate_one_hot(2, 10)  # (100, N, K)
        log_q = torch.einsum("cnk,bnk->cb", configs, torch.log_softmax(logits, -1))  # (C, B)
        log_q_kl = torch.log_softmax(logits, -1)  # the KL to the uniform prior, written out
        kl = (log_q_kl.exp() * log_q_kl).sum((-2, -1)) + 2 * math.log(10)
        exact = (log_q.exp() * small_model.cost(configs[:, None], x)).sum(0) + kl
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_bounds(small_model, x, 1, g).neg_elbo for _ in range(200)])  # (200, B)
    se = (draws.var(0).sum() / 200).sqrt() / x.shape[0]  # of the mean over draws and images
    assert (draws.mean() - exact.mean()).abs() <= Z * se + 1e-3


def test_bounds_are_ordered(small_model, images):
    """neg_elbo >= nll_iwae >= nll_exact (in expectation; allowed Z standard errors)."""
    x = images["test"]
    g = torch.Generator().manual_seed(2)
    bounds = sample_bounds(small_model, x, 100, g)
    exact = exact_nll(small_model, x)
    d1 = bounds.neg_elbo - bounds.nll_iwae
    d2 = bounds.nll_iwae - exact
    assert d1.mean() >= -Z * _se(d1)
    assert d2.mean() >= -Z * _se(d2)
    # and the ordering is not a tie: importance weighting gains on average on this model
    assert bounds.neg_elbo.mean() > bounds.nll_iwae.mean() + 1.0 > exact.mean() + 1.0


def test_iwae_approaches_exact_nll_as_m_grows(small_model, images):
    """The gap E[nll_iwae_m] - nll_exact is non-negative and shrinks with m (Burda et al. 2016, Thm 1)."""
    x = images["test"]
    exact = exact_nll(small_model, x)
    g = torch.Generator().manual_seed(3)
    gaps, ses = [], []
    for m in (1, 10, 100, 1000):
        d = iwae_bound(small_model, x, m, g) - exact  # (B,)
        gaps.append(d.mean().item())
        ses.append(_se(d))
    for (g_small, se_small), (g_large, se_large) in zip(zip(gaps, ses), zip(gaps[1:], ses[1:])):
        assert g_large <= g_small + Z * math.hypot(se_small, se_large)
    assert gaps[0] > 2.0  # m = 1 is a loose bound (about 9 nats here) ...
    assert -Z * ses[-1] <= gaps[-1] < 0.02 * gaps[0]  # ... m = 1000 is within 2% of its gap


def test_chunking_does_not_change_the_samples(small_model, images):
    """Chunks draw from one generator stream: the same numbers for any max_rows (CPU generator)."""
    x = images["test"][:20]
    whole = sample_bounds(small_model, x, 30, torch.Generator().manual_seed(4), max_rows=10_000)
    chunked = sample_bounds(small_model, x, 30, torch.Generator().manual_seed(4), max_rows=20 * 7)
    assert torch.allclose(whole.nll_iwae, chunked.nll_iwae, rtol=1e-5, atol=1e-4)
    assert torch.allclose(whole.neg_elbo, chunked.neg_elbo, rtol=1e-5, atol=1e-4)


def test_evaluate_is_reproducible_and_leaves_the_global_rng(small_model, images):
    batches = [images["test"][:100], images["test"][100:]]
    state = torch.get_rng_state()
    first = evaluate(small_model, batches, num_samples=20, seed=5)
    again = evaluate(small_model, batches, num_samples=20, seed=5)
    other = evaluate(small_model, batches, num_samples=20, seed=6)
    assert torch.equal(state, torch.get_rng_state())
    assert first == again
    assert first["nll_iwae"] != other["nll_iwae"]
    assert first["num_images"] == 200 and first["nll_exact"] is not None
    assert first["nll_exact"] == pytest.approx(exact_nll(small_model, images["test"]).mean().item(), rel=1e-5)


def test_over_budget_nll_exact_is_absent():
    model = tiny_vae(20, 10, hidden_dims=(16,)).eval()
    x = (torch.rand(4, 784, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    result = evaluate(model, [x], num_samples=3, seed=0)
    assert result["nll_exact"] is None and math.isfinite(result["nll_iwae"])
    with pytest.raises(ConfigError, match="max_configs"):
        exact_nll(model, x)
    with pytest.raises(ConfigError, match="positive integer"):
        sample_bounds(model, x, 0)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_evaluate_script_end_to_end(tmp_path, data_root):
    """train.py experiment=small_exact (a few batches), then evaluate.py twice with one seed.
    The run folder is named like a sweep's (`=` and `,`), which evaluate.py must accept unquoted."""
    run_dir = tmp_path / "estimator=st_gumbel,seed=1"
    trained = run_script(
        "train.py", "experiment=small_exact", "estimator=st_gumbel", f"data.root={data_root}",
        "data.download=false", "trainer.max_epochs=1", "trainer.limit_train_batches=10", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "test_iwae_samples=10", "trainer.enable_progress_bar=false",
        f"hydra.run.dir='{run_dir}'", cwd=tmp_path, env=ONE_THREAD, timeout=600,
    )  # fmt: skip
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "finished" and "experiment=small_exact" in record["overrides"]
    # the run ends with what a person reads: its folder, rounded bounds, the TensorBoard command
    assert f"finished: {run_dir} (10 steps, " in trained.stdout and f"tensorboard --logdir {run_dir}" in trained.stdout
    assert f"test/neg_elbo {record['metrics']['test/neg_elbo']:.2f}  " in trained.stdout
    assert set(record["metrics"]) >= {"val/neg_elbo", "test/neg_elbo", "test/nll_iwae"}
    assert record["metrics"]["test/nll_iwae"] <= record["metrics"]["test/neg_elbo"] + 1.0

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    args = [f"ckpt_path={ckpt}", "num_samples=50", "batch_size=200",
            "limit_batches=1", "seed=7"]  # fmt: skip
    first = run_script("evaluate.py", *args, cwd=tmp_path, env=ONE_THREAD)
    assert "nll_exact" in first.stdout and "nll_iwae" in first.stdout
    written = run_dir / "checkpoints" / "last_eval_test.json"
    result = json.loads(written.read_text())
    assert result["num_images"] == 200 and result["num_samples"] == 50 and result["device"] == "cpu"
    m = result["metrics"]
    assert m["nll_exact"] is not None and m["neg_elbo"] >= m["nll_iwae"] - 0.5 >= m["nll_exact"] - 1.0

    run_script("evaluate.py", *args, f"output={tmp_path / 'again.json'}", cwd=tmp_path, env=ONE_THREAD)
    assert json.loads((tmp_path / "again.json").read_text())["metrics"] == m
    assert not (tmp_path / "outputs").exists()  # evaluate.py writes nothing but the JSON


def test_a_subset_is_drawn_at_random_with_the_seed_and_progress_is_shown(trained_run, tmp_path, capsys):
    """limit_batches takes images from the whole split (MNIST's first test images have more ink than
    the average), the same ones for the same seed; each batch reports progress and time left."""
    from hydra import compose, initialize_config_dir

    evaluate = load_script("evaluate")
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    results = {}
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("evaluate", overrides=[f"ckpt_path={ckpt}", "num_samples=2", "batch_size=50",
                                                 "limit_batches=2", f"seed={seed}", f"output={tmp_path / name}.json",
                                                 f"data_root={shared_data_root()}"])
        results[name] = evaluate.run(cfg)
    assert results["a"]["num_images"] == 100 and "drawn at random with seed 3" in results["a"]["subset"]
    assert results["a"]["metrics"] == results["b"]["metrics"] != results["c"]["metrics"]
    err = capsys.readouterr().err
    assert "  50 / 100 images, " in err and "s left" in err and "  100 / 100 images, " in err
