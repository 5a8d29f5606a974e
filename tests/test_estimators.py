"""Estimators on the tiny problem (N=2, K=3, fixed decoder): exact is exact, sf is unbiased
within its Monte-Carlo standard error, gumbel's bias vanishes as tau falls; plus contract checks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_mean_matches

from discrete_vae import estimators as E
from discrete_vae.errors import ConfigError
from discrete_vae.latents import CAPABILITIES, Bernoulli, Categorical, Latent


def test_exact_matches_brute_force_gradient(tiny):
    brute = tiny.exact_grad()
    grad = tiny.sample_grads(E.Exact(), 1)[0]
    assert torch.allclose(grad, brute, atol=1e-12, rtol=1e-10)
    # small chunks (several per call, checkpointed) give the same answer
    assert torch.allclose(tiny.sample_grads(E.Exact(chunk_size=2), 3), brute.expand(3, -1, -1), atol=1e-12)


def test_exact_value_is_the_expected_cost(tiny):
    out = E.Exact()(tiny.logits[None], tiny.cost, tiny.latent)
    q = torch.softmax(tiny.logits, -1)
    brute = sum(
        q[0, i] * q[1, j] * tiny.cost(F.one_hot(torch.tensor([i, j]), 3).double()) for i in range(3) for j in range(3)
    )
    assert torch.allclose(out.value, brute[None]) and torch.allclose(out.loss, brute[None])


def test_score_function_is_unbiased(tiny):
    torch.manual_seed(0)
    sf = E.ScoreFunction(momentum=0.9)
    sf.train()
    for _ in range(5):  # a non-zero baseline from past steps
        sf(tiny.logits.expand(64, -1, -1), tiny.cost, tiny.latent)
    assert sf.baseline().abs() > 1.0
    sf.eval()
    baseline = sf.baseline().clone()
    grads = tiny.sample_grads(sf, 400_000)
    assert torch.equal(sf.baseline(), baseline), "eval mode must not move the baseline"
    exact = tiny.exact_grad()
    assert_mean_matches(grads, exact, z=5.0)
    # the bound has power: a target off by 0.05 in one coordinate is rejected
    with pytest.raises(AssertionError):
        assert_mean_matches(grads, exact + torch.tensor([[0.05, 0, 0], [0, 0, 0]], dtype=exact.dtype), z=5.0)


def test_score_function_baseline_is_a_bias_corrected_ema(tiny):
    sf = E.ScoreFunction(momentum=0.5)
    assert sf.baseline() == 0
    out = sf(tiny.logits.expand(10, -1, -1), tiny.cost, tiny.latent)
    assert torch.allclose(sf.baseline(), out.value.mean().float()), "after one step the baseline is that step's mean"
    state = sf.state_dict()
    assert {"ema", "num_updates"} <= set(state), "the baseline is saved in checkpoints"


def test_gumbel_softmax_approaches_the_exact_direction_as_tau_shrinks(tiny):
    torch.manual_seed(0)
    exact = tiny.exact_grad().flatten()
    cosines, biases, ses = [], [], []
    for tau in (2.0, 1.0, 0.5, 0.1):
        grads = tiny.sample_grads(E.GumbelSoftmax(tau=tau), 100_000).flatten(1)
        mean = grads.mean(0)
        cosines.append(F.cosine_similarity(mean, exact, dim=0).item())
        biases.append((mean - exact).norm().item())
        ses.append((grads.var(0).sum() / len(grads)).sqrt().item())
    assert all(a < b for a, b in zip(cosines, cosines[1:])), cosines
    assert cosines[-1] > 0.999, cosines
    assert biases[0] > 20 * ses[0], "at tau=2 the relaxation is clearly biased"


@pytest.mark.parametrize("cls", [E.STGumbelSoftmax, E.StraightThrough, E.GumbelSoftmax])
def test_temperature_is_a_checkpointed_buffer(cls):
    est = cls(tau=0.7)
    assert "tau" in est.state_dict() and est.tau.item() == pytest.approx(0.7)


def test_straight_through_estimators_report_the_cost_at_a_hard_sample(tiny):
    torch.manual_seed(0)
    logits = tiny.logits.expand(1000, -1, -1)
    support = {round(tiny.cost(F.one_hot(torch.tensor([i, j]), 3).double()).item(), 9) for i in range(3) for j in range(3)}
    for est in (E.STGumbelSoftmax(0.5), E.StraightThrough(0.5), E.GumbelRao(0.5, num_mc=3), E.ReinMax(1.3)):
        values = {round(v, 9) for v in est(logits, tiny.cost, tiny.latent).value.tolist()}
        assert values <= support, type(est).__name__


@pytest.mark.parametrize(
    "make",
    [lambda: E.GumbelSoftmax(tau=0), lambda: E.ScoreFunction(momentum=1.0), lambda: E.Exact(max_configs=0)],
)
def test_bad_estimator_settings_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()


def test_exact_refuses_over_budget_at_start_up():
    with pytest.raises(ConfigError) as err:
        E.Exact(max_configs=4096).check(Categorical(20, 10))
    message = str(err.value)
    assert "N=20" in message and "K=10" in message and "4096" in message and "latent.num_latents=2" in message


# -- capabilities: declared by each class, never inferred ------------------------------------------
ESTIMATORS = {
    "sf": E.ScoreFunction(), "rloo": E.RLOO(4), "exact": E.Exact(), "gumbel": E.GumbelSoftmax(),
    "st_gumbel": E.STGumbelSoftmax(), "st": E.StraightThrough(), "gumbel_rao": E.GumbelRao(),
    "reinmax": E.ReinMax(), "gst": E.GappedStraightThrough(), "zgr": E.ZGR(), "indecater": E.IndeCateR(),
    "arm": E.ARM(), "disarm": E.DisARM(), "rebar": E.REBAR(), "relax": E.RELAX(), "muprop": E.MuProp(),
    "nvil": E.NVIL(), "darn": E.DARN(),
}


def test_capabilities_are_declared_as_class_attributes():
    declared = {name: (type(e).deterministic, type(e).has_temperature, type(e).needs) for name, e in ESTIMATORS.items()}
    relax, cond, view = "has_relaxation", "has_conditional_noise", "has_categorical_view"
    assert declared == {
        "sf": (False, False, ()), "rloo": (False, False, ()), "exact": (True, False, ("has_enumerate_support",)),
        "gumbel": (False, True, (relax,)), "st_gumbel": (False, True, (relax,)),
        "st": (False, True, ("has_straight_through",)), "gumbel_rao": (False, True, (relax, cond)),
        "reinmax": (False, True, (view,)), "gst": (False, True, (view,)),
        "zgr": (False, False, (view,)), "indecater": (False, False, (view,)),
        "arm": (False, False, ("has_binary_view",)), "disarm": (False, False, ("has_binary_view",)),
        "rebar": (False, False, (relax, cond)), "relax": (False, False, (relax, cond)),  # tau learned, not annealed
        "muprop": (False, False, ("has_mean",)), "nvil": (False, False, ()), "darn": (False, False, (view,)),
    }
    assert all(isinstance(e.tau, torch.Tensor) for e in ESTIMATORS.values() if e.has_temperature)
    # the two latent types offer everything but, for categories, a binary view
    for latent in (Categorical(2, 3), Bernoulli(3)):
        offered = {c for c in CAPABILITIES if getattr(latent, c)}
        assert offered == set(CAPABILITIES) - ({"has_binary_view"} if isinstance(latent, Categorical) else set())


def test_decoder_evaluations_per_example_are_declared():
    latent = Categorical(20, 10)
    evaluations = {name: e.decoder_evaluations(latent) for name, e in ESTIMATORS.items()}
    assert evaluations == {"sf": 1, "rloo": 4, "exact": 10**20, "gumbel": 1, "st_gumbel": 1, "st": 1,
                           "gumbel_rao": 1, "reinmax": 1, "gst": 1, "zgr": 1, "indecater": 20 * 9 + 1,
                           "arm": 2, "disarm": 2, "rebar": 3, "relax": 3, "muprop": 2, "nvil": 1, "darn": 1}
    # what one call of the cost may hold, per example (the diagnostics' memory bound)
    assert E.Exact(chunk_size=256).decoder_rows(Categorical(2, 10)) == 100
    assert E.Exact(chunk_size=16).decoder_rows(Categorical(2, 10)) == 16
    assert E.IndeCateR(num_samples=2, chunk_size=10).decoder_rows(Categorical(3, 5)) == 10


class Spins(Latent):
    """A latent type that declares no capability: N units in {-1, +1}."""

    name = "spins"
    param_shape = (3,)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_an_estimator_is_matched_by_capability_not_by_name(name):
    """Refused in one line naming the first capability it needs that the type lacks; an estimator that
    needs nothing beyond the contract (sf, rloo) takes the type."""
    estimator = ESTIMATORS[name]
    if not estimator.needs:
        estimator.check(Spins())
        return
    with pytest.raises(ConfigError) as caught:
        estimator.check(Spins())
    message = str(caught.value)
    assert f"needs a latent type with {CAPABILITIES[estimator.needs[0]]} ({estimator.needs[0]})" in message
    assert "Spins" in message and "\n" not in message


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_the_loss_is_worth_the_value(name):
    """Every estimator's surrogate terms are worth zero: its loss equals its value, per example. That
    is what lets one estimator's loss be another's cost (a chain of stochastic layers), and what
    train/loss logs. (The score function's f + stopgrad(f - b) log q was not: its value carried
    (f - b) log q, which a layer above would have read as cost.)"""
    estimator = ESTIMATORS[name]
    latent = Bernoulli(3) if "has_binary_view" in type(estimator).needs else Categorical(2, 3)
    estimator.check(latent)
    torch.manual_seed(0)
    logits = torch.randn(64, *latent.param_shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(int(torch.tensor(latent.param_shape).prod()), dtype=torch.float64)
    cost = lambda z: (z.flatten(-len(latent.param_shape)).to(weight) @ weight - 0.3) ** 2 + 1.0  # noqa: E731
    out = estimator.double().train()(logits, cost, latent)
    torch.testing.assert_close(out.loss.detach(), out.value.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_an_explicit_generator_makes_an_estimate_reproducible_and_leaves_the_global_one_alone(name):
    """In a user's own loop: the same generator state gives the same estimate, another state another one
    (for the estimators with noise), and torch's global generator is neither read nor moved."""
    estimator = ESTIMATORS[name].double().train()
    latent = Bernoulli(3) if "has_binary_view" in estimator.needs else Categorical(2, 3)
    estimator.check(latent)
    weight = torch.randn(6 if isinstance(latent, Categorical) else 3, dtype=torch.float64)
    cost = lambda z: (z.flatten(-len(latent.event_shape)).to(weight) @ weight - 0.3) ** 2  # noqa: E731

    def estimate(seed):  # from the same state (a fresh copy: the score function's baseline moves)
        logits = torch.randn(8, *latent.param_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        logits.requires_grad_()
        before = torch.get_rng_state()
        out = copy.deepcopy(estimator)(logits, cost, latent, generator=torch.Generator().manual_seed(seed))
        (grad,) = torch.autograd.grad(out.loss.sum(), logits)
        assert torch.equal(torch.get_rng_state(), before), "the global generator moved"
        return grad

    torch.testing.assert_close(estimate(1), estimate(1), rtol=0, atol=0)
    if not estimator.deterministic:
        assert not torch.equal(estimate(1), estimate(2))


def test_muprop_is_unbiased_and_its_taylor_control_variate_cuts_the_score_functions_variance(tiny):
    """MuProp's mean is the exact gradient (categories; bits: tests/test_bernoulli.py), and at the same
    samples its control variate leaves less variance than the score function without a baseline."""
    torch.manual_seed(0)
    grads = tiny.sample_grads(E.MuProp(), 200_000)
    assert_mean_matches(grads, tiny.exact_grad(), z=5.0)
    with pytest.raises(AssertionError):  # the bound rejects a wrong answer
        assert_mean_matches(grads, tiny.exact_grad() + 0.05, z=5.0)
    torch.manual_seed(0)
    plain = tiny.sample_grads(E.ScoreFunction().eval(), 200_000)  # baseline 0 before any training step
    assert grads.var(0).sum() < 0.5 * plain.var(0).sum(), (grads.var(0).sum(), plain.var(0).sum())


def test_nvil_is_unbiased_up_to_its_normalisation_and_trains_its_baseline(tiny):
    """For given running statistics c and v, NVIL's estimate is the exact gradient divided by
    max(1, sqrt(v)), whatever its baseline network says; in training mode c and v follow the batches
    and the baseline network gets the gradient that fits it to f - c."""
    nvil = E.NVIL().double()
    nvil.check(tiny.latent)
    nvil.eval()
    nvil.centre.fill_(3.0)
    nvil.variance.fill_(4.0)  # the signal is divided by 2
    torch.manual_seed(0)
    grads = tiny.sample_grads(nvil, 200_000)
    assert_mean_matches(2.0 * grads, tiny.exact_grad(), z=5.0)
    with pytest.raises(AssertionError):
        assert_mean_matches(2.0 * grads, tiny.exact_grad() + 0.05, z=5.0)

    fresh = E.NVIL().double()
    fresh.check(tiny.latent)
    fresh.train()
    logits = tiny.logits.expand(256, -1, -1).clone().requires_grad_()
    out = fresh(logits, tiny.cost, tiny.latent)
    torch.testing.assert_close(out.loss.detach(), out.value.detach())  # the baseline's term is worth zero
    out.loss.sum().backward()
    assert fresh.centre > 0 and fresh.variance > 0  # the cost is positive and varies
    bias = fresh.net[-1].bias.grad
    assert bias is not None and bias.item() < 0  # its output moves up, towards f - c > 0


@pytest.mark.parametrize("point", ["centre", "mean"])
def test_darn_is_exact_in_expectation_for_a_linear_cost_and_biased_beyond_it(tiny, point):
    """DARN drops its Taylor expansion's correction term: its mean is the exact gradient when the cost
    is linear in z (at either expansion point), not for the tiny problem's decoder."""
    weights = torch.randn(tiny.N, tiny.K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits = tiny.logits.clone().requires_grad_()
    (exact_linear,) = torch.autograd.grad((torch.softmax(logits, -1) * weights).sum(), logits)
    rows = tiny.logits.expand(100_000, tiny.N, tiny.K).clone().requires_grad_()
    torch.manual_seed(0)
    out = E.DARN(point)(rows, lambda z: (z * weights).sum((-2, -1)), tiny.latent)
    torch.testing.assert_close(out.loss, out.value)  # worth the cost: the surrogate term is zero
    (grads,) = torch.autograd.grad(out.loss.sum(), rows)
    assert_mean_matches(grads, exact_linear, z=5.0)
    with pytest.raises(AssertionError):  # the bound rejects a wrong answer
        assert_mean_matches(grads, exact_linear + 0.05, z=5.0)
    torch.manual_seed(0)
    with pytest.raises(AssertionError):  # biased for a cost that is not linear
        assert_mean_matches(tiny.sample_grads(E.DARN(point), 100_000), tiny.exact_grad(), z=5.0)


def test_darn_refuses_an_unknown_expansion_point():
    with pytest.raises(ConfigError, match="estimator.point must be one of centre, mean for darn, got 'middle'"):
        E.DARN("middle")


def test_nvil_without_normalisation_is_unbiased_whatever_its_running_variance(tiny):
    nvil = E.NVIL(normalise=False).double()
    nvil.check(tiny.latent)
    nvil.eval()
    nvil.centre.fill_(3.0)
    nvil.variance.fill_(4.0)  # not used: the signal is only centred
    torch.manual_seed(0)
    grads = tiny.sample_grads(nvil, 200_000)
    assert_mean_matches(grads, tiny.exact_grad(), z=5.0)
    with pytest.raises(AssertionError):
        assert_mean_matches(grads, tiny.exact_grad() + 0.05, z=5.0)
    with pytest.raises(ConfigError, match="estimator.normalise must be true or false, got 'yes'"):
        E.NVIL(normalise="yes")
