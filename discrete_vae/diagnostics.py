"""Gradient diagnostics: how far, and how noisily, an estimator's gradient lies from the true one.

For one model, one batch x and one estimator, `gradient_diagnostics` draws M independent
estimates of the gradient of the training objective with respect to the ENCODER parameters
(where the estimators differ: through the discrete sample; the decoder's gradient is an
ordinary Monte-Carlo gradient at the sampled z) and compares them with a reference gradient. The objective is the one
training minimises, `VAE.objective(x, estimator).loss`: the batch mean of the estimator's
surrogate plus the analytic KL. The KL part is deterministic, so it cancels in the variance but it is
part of the mean, the bias and the cosine, for the estimates and the reference alike.

Statistics (g_1..g_M the flattened estimates, r the reference, P parameters):
- variance   tr Cov(g) = 1/(M-1) sum_m ||g_m - mean||^2   (unbiased, summed over parameters)
- mse        1/M sum_m ||g_m - r||^2
- bias       ||mean - r||, with standard error sqrt(tr Cov(g) / M + se_r^2), the RMS norm of
             the Monte-Carlo error in mean - r (an unbiased estimator shows bias ~ this SE)
- cosine     cos(mean, r);   snr  ||mean|| / sqrt(tr Cov(g))
- seconds_per_estimate: the wall time of ONE estimate as training computes it (batch x, the
  estimator's forward and the backward to the encoder), the minimum over a few repetitions
  (the one least disturbed by other work on the machine).

For a chain of stochastic layers (discrete_vae.chain), the estimates are of the gradient of the
lowest layer's encoder, q(z1|x)'s, which passes through every layer above; each layer has its
estimator (one given estimator is copied to the layers above).

The reference r is the exact gradient (estimators.Exact, enumeration of all the latent type's
configurations, of every layer) when they fit `max_configs`; otherwise the average of R RLOO estimates
(Kool et al. 2019, unbiased), whose standard error se_r = sqrt(tr Cov(RLOO) / R) is stated.

Efficiency: the encoder runs once; the estimator runs on the logits replicated m times along
the batch (every estimator treats batch rows independently, so the rows of replicate i give
estimate i), and the m cotangents are pulled back through the encoder in one batched
vector-Jacobian product (`torch.autograd.grad(..., is_grads_batched=True)`). A `deterministic`
estimator (declared by its class) is drawn once. Estimates are streamed into float64 sums,
never stored all at once. Only `torch.autograd.grad` is used: no `.grad` is left on any
parameter. The estimator is put in eval mode while drawing (the score function's EMA baseline
only moves in training mode) and its mode is restored.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from discrete_vae.errors import ConfigError, count
from discrete_vae.estimators import RLOO, Estimator, Exact
from discrete_vae.vae import VAE

MAX_ROWS = 8192  # decoder rows (replicates x batch x samples) per batched call
MAX_GRAD_FLOATS = 1 << 23  # floats of per-estimate encoder gradients held per batched call


@dataclass(frozen=True)
class Reference:
    """The gradient the estimates are compared with."""

    grad: Tensor = field(repr=False)  # (P,) float64
    kind: str  # "exact" or "rloo"
    num_estimates: int  # R RLOO estimates averaged (1 for exact)
    num_samples: int  # S samples per RLOO estimate (0 for exact)
    se: float  # RMS norm of its own Monte-Carlo error, sqrt(tr Cov / R); 0 for exact

    def describe(self) -> str:
        if self.kind == "exact":
            return "exact gradient (enumeration of every latent configuration)"
        return f"mean of {self.num_estimates} RLOO estimates (S={self.num_samples}), SE {self.se:.3g}"


@dataclass(frozen=True)
class GradientReport:
    """Statistics of M gradient estimates of the encoder parameters (see the module docstring)."""

    estimator: str
    num_estimates: int  # M
    mean: Tensor = field(repr=False)  # (P,) float64, the mean estimate
    variance: float  # tr Cov, unbiased
    mse: float
    bias: float  # ||mean - reference||
    bias_se: float
    cosine: float
    snr: float
    seconds_per_estimate: float
    reference: Reference = field(repr=False)

    def row(self) -> dict[str, float | str | int]:
        """The scalar fields, for tables and loggers."""
        return {
            "estimator": self.estimator,
            "num_estimates": self.num_estimates,
            "variance": self.variance,
            "mse": self.mse,
            "bias": self.bias,
            "bias_se": self.bias_se,
            "cosine": self.cosine,
            "snr": self.snr,
            "seconds_per_estimate": self.seconds_per_estimate,
            "reference_se": self.reference.se,
        }


Estimators = Estimator | Sequence[Estimator]  # one, or one per stochastic layer


def encoder_parameters(model: VAE) -> list[Tensor]:
    """The parameters measured: the encoder of the lowest stochastic layer (of a chain: q(z1|x)'s,
    whose gradient passes through every layer above)."""
    return [p for p in model.encoder.parameters() if p.requires_grad]


def per_layer(model: VAE, estimator: Estimators) -> list[Estimator]:
    """One estimator per stochastic layer: a sequence as given (the caller's, already checked), or one
    estimator with a copy for each layer above, made and checked once (`StochasticChain.layer_estimators`)."""
    return model.layer_estimators(estimator) if isinstance(estimator, Estimator) else list(estimator)


@contextlib.contextmanager
def eval_mode(estimator: Estimators) -> Iterator[None]:
    """The estimators (and their submodules) in eval mode inside, each module's mode restored after."""
    estimators = [estimator] if isinstance(estimator, Estimator) else list(estimator)
    modes = [(m, m.training) for each in estimators for m in each.modules()]
    for each in estimators:
        each.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def auto_chunk(model: VAE, x: Tensor, estimator: Estimators) -> int:
    """Estimates per batched call, bounded by decoder rows and by gradient memory."""
    estimators = per_layer(model, estimator)
    samples = math.prod(model.layer_counts(estimators))  # decoder rows per example
    num_params = sum(p.numel() for p in encoder_parameters(model))
    return max(1, min(MAX_ROWS // (len(x) * samples), MAX_GRAD_FLOATS // num_params))


def iter_gradients(
    model: VAE, x: Tensor, estimator: Estimators, num: int, chunk_size: int | None = None
) -> Iterator[Tensor]:
    """`num` independent estimates of d/d(encoder params) of `model.objective(x, estimator).loss`,
    yielded in chunks of flat vectors.  # x (B, D) -> chunks (m, P)

    The caller chooses the estimator's mode (see `eval_mode`); draws use the global RNG.
    """
    params = encoder_parameters(model)
    estimator = per_layer(model, estimator)
    chunk = chunk_size or auto_chunk(model, x, estimator)
    with torch.enable_grad():
        logits = model.encode(x)  # (B, *param_shape), graph to the encoder parameters
        done = 0
        while done < num:
            m = min(chunk, num - done)
            rep = logits.detach().repeat(m, *[1] * (logits.dim() - 1)).requires_grad_()  # (m*B, *param_shape)
            # m times the batch-mean loss of the whole (m*B)-row batch: replicate i's gradient
            # with respect to its own rows is estimate i of d loss / d logits.
            loss = m * model.objective(x.repeat(m, 1), estimator, logits=rep).loss
            (g_logits,) = torch.autograd.grad(loss, rep)
            g_logits = g_logits.view(m, *logits.shape)  # (m, B, *param_shape)
            grads = torch.autograd.grad(
                logits, params, grad_outputs=g_logits, is_grads_batched=True, retain_graph=done + m < num
            )
            yield torch.cat([g.flatten(1) for g in grads], dim=1)  # (m, P)
            done += m


class Moments:
    """Streaming float64 sums of d_m = g_m - shift: enough for the mean, tr Cov and the MSE to `shift`."""

    def __init__(self, shift: Tensor | None = None):
        self.shift, self.count, self.sum, self.sum_sq = shift, 0, None, 0.0
        self.constant = True  # one distinct row so far: the variance is exactly 0

    def add(self, chunk: Tensor, times: int = 1) -> None:  # (m, P); each row counted `times` times
        chunk = chunk.double()
        if self.shift is None:  # any fixed shift works; one near the mean avoids cancellation
            self.shift = chunk.mean(0)
        d = chunk - self.shift  # (m, P)
        self.constant = self.count == 0 and len(chunk) == 1
        self.sum = times * d.sum(0) if self.sum is None else self.sum + times * d.sum(0)
        self.sum_sq += times * float((d * d).sum())
        self.count += times * len(chunk)

    def mean(self) -> Tensor:
        return self.shift + self.sum / self.count  # (P,)

    def variance(self) -> float:
        """tr Cov = (sum ||d||^2 - ||sum d||^2 / M) / (M - 1)."""
        if self.constant:
            return 0.0
        value = (self.sum_sq - float(self.sum.square().sum()) / self.count) / (self.count - 1)
        return max(value, 0.0)

    def mean_square(self) -> float:
        """1/M sum ||g_m - shift||^2."""
        return self.sum_sq / self.count


def draw(model: VAE, x: Tensor, estimator: Estimators, num: int, shift: Tensor | None = None,
         chunk_size: int | None = None) -> Moments:
    """Moments of `num` estimates, drawn with the estimators in eval mode."""
    moments = Moments(shift)
    estimator = per_layer(model, estimator)
    with eval_mode(estimator):
        if all(each.deterministic for each in estimator):
            (g,) = iter_gradients(model, x, estimator, 1, 1)
            moments.add(g, times=num)
        else:
            for chunk in iter_gradients(model, x, estimator, num, chunk_size):
                moments.add(chunk)
    return moments


def reference_gradient(
    model: VAE,
    x: Tensor,
    max_configs: int = 4096,
    num_estimates: int = 1000,
    num_samples: int = 10,
    chunk_size: int | None = None,
) -> Reference:
    """The exact gradient if the latent configurations number at most max_configs, else the mean of
    `num_estimates` RLOO(num_samples) estimates (Kool et al. 2019) with its standard error."""
    try:
        if model.num_configs > max_configs:  # every layer's configurations together
            raise ConfigError(f"{count(model.num_configs)} configurations")
        exact = per_layer(model, Exact(max_configs=max_configs))
    except ConfigError:
        if num_estimates < 2:
            raise ConfigError(f"the RLOO reference needs num_estimates >= 2, got {num_estimates}") from None
        moments = draw(model, x, RLOO(num_samples), num_estimates, chunk_size=chunk_size)
        se = math.sqrt(moments.variance() / num_estimates)
        return Reference(moments.mean(), "rloo", num_estimates, num_samples, se)
    (g,) = iter_gradients(model, x, exact, 1, 1)
    return Reference(g[0].double(), "exact", 1, 0, 0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_estimate(model: VAE, x: Tensor, estimator: Estimators, repeats: int = 5) -> float:
    """Minimum wall time in seconds of one estimate as training computes it, after one warm-up."""
    params = encoder_parameters(model)
    estimator = per_layer(model, estimator)
    times = []
    with eval_mode(estimator), torch.enable_grad():
        for i in range(repeats + 1):
            _sync(x.device)
            start = time.perf_counter()
            torch.autograd.grad(model.objective(x, estimator).loss, params)
            _sync(x.device)
            if i > 0:
                times.append(time.perf_counter() - start)
    return min(times)


def gradient_diagnostics(
    model: VAE,
    x: Tensor,
    estimator: Estimators,
    num_estimates: int,
    reference: Reference | None = None,
    name: str | None = None,
    chunk_size: int | None = None,
    timing_repeats: int = 5,
    reference_options: dict | None = None,
) -> GradientReport:
    """Draw `num_estimates` (M >= 2) estimates of the encoder gradient and compare them with
    `reference` (if None, `reference_gradient(model, x, **reference_options)`: max_configs,
    num_estimates and num_samples of the RLOO fallback). `timing_repeats=0` skips the timing."""
    if int(num_estimates) != num_estimates or num_estimates < 2:
        raise ConfigError(f"the gradient diagnostics need num_estimates >= 2 (a variance), got {num_estimates}")
    if reference is None:
        reference = reference_gradient(model, x, chunk_size=chunk_size, **(reference_options or {}))
    estimator = per_layer(model, estimator)
    moments = draw(model, x, estimator, num_estimates, shift=reference.grad, chunk_size=chunk_size)
    mean, variance = moments.mean(), moments.variance()
    ref = reference.grad
    cosine = float(torch.nn.functional.cosine_similarity(mean, ref, dim=0))
    return GradientReport(
        estimator=name or type(estimator[0]).__name__,
        num_estimates=int(num_estimates),
        mean=mean,
        variance=variance,
        mse=moments.mean_square(),
        bias=float((mean - ref).norm()),
        bias_se=math.sqrt(variance / num_estimates + reference.se**2),
        cosine=cosine,
        snr=float(mean.norm()) / math.sqrt(variance) if variance > 0 else math.inf,
        seconds_per_estimate=time_per_estimate(model, x, estimator, timing_repeats) if timing_repeats else math.nan,
        reference=reference,
    )
