"""Extending the framework from outside the package: a new latent type is one class and one YAML file,
and so is a new estimator, with nothing in the package to edit. Both live in a folder of the test's
own (a module on PYTHONPATH, YAML files on Hydra's search path), as a user's would.

The latent type is neither categorical nor Bernoulli: N ordinal variables of K levels as thermometer
codes, whose sample (N, K - 1) has another shape than its parameters (N, K). It declares what it
offers; every estimator whose needs it meets trains with it, in the lower and the upper layer of a
two-layer chain, and the others are refused by the capability they miss. The files are those of
docs/extending.md's example, read from the page, so the page cannot drift from what works."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, run_script, train_in
from discrete_vae.build import build_module, load_checkpoint
from discrete_vae.checks import estimator_names
from discrete_vae.errors import ConfigError, DataError

EXTENDING = (REPO / "docs" / "extending.md").read_text()


def doc_block(title: str) -> str:
    """The code block that follows `title` (a file's name in backquotes) in docs/extending.md."""
    match = re.search(rf"`{re.escape(title)}`:\n\n```\w*\n(.*?)```", EXTENDING, flags=re.S)
    assert match, f"docs/extending.md has no block for {title}"
    return match.group(1)


@pytest.fixture(scope="module")
def user_parts(tmp_path_factory):
    """my_parts/ as docs/extending.md lays it out: my_parts.py, conf/latent/ordinal.yaml,
    conf/estimator/plain_reinforce.yaml, each file's text taken from the page."""
    root = tmp_path_factory.mktemp("user") / "my_parts"
    for name in ("my_parts.py", "conf/latent/ordinal.yaml", "conf/estimator/plain_reinforce.yaml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(doc_block(f"my_parts/{name}"))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("my_parts", None)


def compose_user(root, overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"hydra.searchpath=[file://{root / 'conf'}]", *overrides])


ORDINAL = "{_target_:my_parts.Ordinal,num_latents:2,num_levels:3}"
SMALL = ["model.hidden_dims=[16]", "model.upper_hidden_dims=[]"]
LAYOUTS = {  # the user's type below a layer of bits (which offers every capability), and above one
    "lower": ["latent=ordinal", "latent.num_latents=2", "latent.num_levels=3",
              "upper_latents=[{_target_:discrete_vae.latents.Bernoulli,num_latents:3}]"],
    "upper": ["latent=bernoulli", "latent.num_latents=3", f"upper_latents=[{ORDINAL}]"],
}
# what the Ordinal type lacks: noise given the sample (gumbel_rao, rebar, relax), a binary view (arm, disarm)
# and a mean (muprop)
REFUSED = {"gumbel_rao": "has_conditional_noise", "rebar": "has_conditional_noise", "relax": "has_conditional_noise",
           "arm": "has_binary_view", "disarm": "has_binary_view", "muprop": "has_mean"}


def test_the_ordinal_type_is_a_distribution_with_its_own_event_shape(user_parts):
    from my_parts import Ordinal

    latent = Ordinal(num_latents=2, num_levels=3)
    assert latent.param_shape == (2, 3) and latent.event_shape == (2, 2) and latent.decoder_dim == 4
    configs = latent.enumerate()  # (9, 2, 2): every pair of levels, as codes
    assert configs.shape == (9, 2, 2) and {tuple(c.tolist()) for c in configs[:, 0]} == {(0, 0), (1, 0), (1, 1)}
    logits = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    q = latent.log_prob(logits, configs[:, None]).exp()  # (9, 5)
    torch.testing.assert_close(q.sum(0), torch.ones(5))
    draws = latent.sample(logits, (20_000,), generator=torch.Generator().manual_seed(1))  # (S, 5, 2, 2)
    freq = (draws[:, :, None] == configs[None, None]).all(-1).all(-1).float().mean(0)  # (5, 9)
    assert (freq - q.T).abs().max() < 5 * (0.25 / 20_000) ** 0.5  # 5 standard errors at most


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", estimator_names() + ["plain_reinforce"])
def test_each_estimator_trains_with_it_or_is_refused_by_capability(name, layout, user_parts):
    """A few optimizer steps on a two-layer chain with the user's type in the `layout` layer: every
    layer's encoder gets a finite, non-zero gradient and moves; or, for an estimator whose needs the
    type does not meet, one line names the missing capability."""
    cfg = compose_user(user_parts, [*SMALL, *LAYOUTS[layout], f"estimator={name}"])
    if name in REFUSED:
        with pytest.raises(ConfigError, match=rf"needs a latent type with .*\({REFUSED[name]}\); Ordinal"):
            build_module(cfg)
        return
    torch.manual_seed(0)
    module = build_module(cfg)
    chain = module.model
    encoders = [chain.encoder, *(layer.encoder for layer in chain.upper)]
    before = [torch.cat([p.detach().flatten().clone() for p in e.parameters()]) for e in encoders]
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    x = (torch.rand(8, 784, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    for _ in range(3):
        optimizer.zero_grad()
        loss = chain.objective(x, module.estimators).loss
        assert torch.isfinite(loss)
        loss.backward()
        for level, encoder in enumerate(encoders):
            grads = torch.cat([p.grad.flatten() for p in encoder.parameters()])
            assert torch.isfinite(grads).all() and grads.abs().sum() > 0, f"layer {level + 1}'s encoder got no gradient"
        optimizer.step()
    for level, (encoder, old) in enumerate(zip(encoders, before)):
        assert not torch.equal(torch.cat([p.detach().flatten() for p in encoder.parameters()]), old), level


def test_a_run_with_it_trains_and_its_checkpoint_is_evaluated_and_studied(user_parts, data_root, tmp_path,
                                                                        monkeypatch):
    """A run with the YAML files on Hydra's search path (train.py's own code, in this process), then
    evaluate.py and gradient_study.py as a user runs them: the module on PYTHONPATH and named in
    trusted_modules for the checkpoint."""
    run, env = tmp_path / "run", {"DISCRETE_VAE_DATA": str(data_root), "PYTHONPATH": str(user_parts)}
    search = f"hydra.searchpath=[file://{user_parts / 'conf'}]"
    record = train_in(run, monkeypatch, search, *LAYOUTS["lower"], *SMALL, "estimator=st_gumbel")
    assert record["status"] == "finished" and record["steps"] == 6
    last = run / "checkpoints" / "last.ckpt"
    with pytest.raises(DataError, match="latent._target_='my_parts.Ordinal' is not a Latent of discrete_vae"):
        load_checkpoint(last)  # a package of the user's: named, or refused

    out = tmp_path / "eval.json"
    run_script("evaluate.py", f"ckpt_path={last}", "trusted_modules=[my_parts]", "num_samples=20", "limit_batches=1",
               "batch_size=50", f"output={out}", env=env)
    result = json.loads(out.read_text())["metrics"]
    # 9 x 8 configurations of the two layers: the exact -log p(x) exists, and the bounds lie above it
    assert result["nll_exact"] is not None and result["nll_iwae"] >= result["nll_exact"] - 0.5
    assert result["neg_elbo"] >= result["nll_exact"]

    study = tmp_path / "study"
    proc = run_script("gradient_study.py", f"ckpt_path={last}", "trusted_modules=[my_parts]",
                      "estimators=[st_gumbel,sf,arm]", "num_estimates=20", "batch_size=10", "timing_repeats=0",
                      f"hydra.run.dir={study}", env=env)
    table = (study / "gradient_study.md").read_text()
    assert "st_gumbel" in table and "sf" in table and "skipped arm" in table and "has_binary_view" in table, table
    assert "exact gradient" in proc.stdout + table
