"""The gradient study of scripts/gradient_study.py: several estimators on one model and one batch
of validation images, compared by variance, bias, cosine, SNR and time (the statistics are
discrete_vae.diagnostics'). It writes gradient_study.md (the table), gradient_study.csv (every
statistic) and gradient_study.png (variance and bias, log scale) into the run folder.

The script checks its options before it imports this module (torch and Lightning take seconds),
so that a mistake is answered at once.
"""

from __future__ import annotations

import csv
import math
import zlib
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from discrete_vae import diagnostics
from discrete_vae.build import build, build_model, load_checkpoint
from discrete_vae.checks import ESTIMATOR_DIR, estimator_names
from discrete_vae.devices import describe_device, resolve_device
from discrete_vae.errors import ConfigError
from discrete_vae.estimators import ScoreFunction
from discrete_vae.vae import VAE


def load_model(cfg: DictConfig, device: torch.device, splits: dict[str, torch.Tensor]) -> tuple[VAE, str]:
    """The checkpoint's VAE, or a fresh one initialised with `seed`; and a line describing it."""
    if cfg.ckpt_path:
        model = load_checkpoint(cfg.ckpt_path, trusted_modules=list(cfg.trusted_modules))[0].model
        weights = f"checkpoint {cfg.ckpt_path}"
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        if model.output_bias_pending:  # as training starts: the output bias from the training split
            model.init_output_bias(splits["train"])
        weights = f"fresh initialisation (seed {cfg.seed}, output bias {model.output_bias_init})"
    return model.to(device), weights


def validation_batch(cfg: DictConfig, device: torch.device, splits: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first `batch_size` validation images.  # (B, D)"""
    val = splits["val"]
    if cfg.batch_size < 1 or cfg.batch_size > len(val):
        raise ConfigError(f"batch_size must be in [1, {len(val)}] (the validation images), got {cfg.batch_size}")
    return val[: cfg.batch_size].to(device=device, dtype=torch.float32)


def build_estimators(cfg: DictConfig, model: VAE, device: torch.device):
    """(name, estimators) for each requested YAML file, one estimator per stochastic layer (copies for
    the layers above the first); estimators refused by a layer's latent type (exact over its budget,
    a type it does not support, a chain too costly) are skipped with a printed note."""
    available = estimator_names()
    names = list(cfg.estimators) if cfg.estimators is not None else available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"estimators: unknown {unknown}; choose from {available} (files in {ESTIMATOR_DIR})")
    chosen, notes = [], []
    for name in names:
        node = OmegaConf.merge(OmegaConf.load(ESTIMATOR_DIR / f"{name}.yaml"), cfg.estimator_options.get(name, {}))
        estimator = build(node).to(device)
        try:
            estimators = model.layer_estimators(estimator)
        except ConfigError as err:
            notes.append(f"skipped {name}: {err}")
            print(f"note: skipping estimator {name}: {err}")
            continue
        if cfg.temperature is not None and estimator.has_temperature:
            tau = float(cfg.temperature)
            if estimator.tau_min is not None and tau < estimator.tau_min:  # as training would: never below it
                notes.append(f"{name}: tau = {estimator.tau_min:g}, its floor tau_min, not temperature={tau:g} "
                             f"(+estimator_options.{name}.tau_min=null lifts it)")
                print(f"note: {notes[-1]}")
                tau = estimator.tau_min
            for each in estimators:
                each.tau.fill_(tau)
        chosen.append((name, estimators))
    return chosen, notes


def warm_baseline(model: VAE, x: torch.Tensor, estimators: list[ScoreFunction]) -> None:
    """One training-mode forward: each layer's bias-corrected EMA becomes the batch-mean cost of one draw."""
    for each in estimators:
        each.train()
    with torch.no_grad():
        model.objective(x, estimators)
    for each in estimators:
        each.eval()


def warm_control_variate(model: VAE, x: torch.Tensor, estimators, steps: int, lr: float = 1e-2) -> None:
    """`steps` Adam steps of the estimators' own parameters (REBAR's temperature and scale, RELAX's
    network too) on their variance gradient at this batch, the model fixed: as they would stand after
    training alongside it, rather than at their initial values."""
    params = [p for each in estimators for p in each.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    for each in estimators:
        each.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model.objective(x, estimators).loss.backward(inputs=params)  # the model's gradients are not wanted
        optimizer.step()
    for each in estimators:
        each.eval()


def seed_for(cfg: DictConfig, name: str) -> int:
    """A seed per estimator name: results do not depend on the order of the list, and no
    estimator shares its random stream with the reference."""
    return (int(cfg.seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)



def fmt(value: float, digits: int = 3) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}g}"


def markdown(rows: list[dict], header: list[str]) -> str:
    lines = [
        "| estimator | tau | variance | bias ± SE | cosine | SNR | ms / estimate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| `{r['estimator']}` | {r['tau']} | {fmt(r['variance'])} | {fmt(r['bias'])} ± {fmt(r['bias_se'], 2)} "
            f"| {r['cosine']:.4f} | {fmt(r['snr'])} | {fmt(1e3 * r['seconds_per_estimate'])} |"
        )
    return "\n".join([*(f"- {h}" for h in header), "", *lines, ""])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["estimator"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "variance", "total variance tr Cov"), (axes[1], "bias", "bias ||mean - ref|| ± SE")):
        values = [r[key] for r in rows]
        errors = [r["bias_se"] if key == "bias" else 0.0 for r in rows]
        positive = [v for v in values if v > 0]
        floor = min(positive) / 10 if positive else 1.0
        ax.bar(names, [max(v, floor) for v in values], yerr=errors if key == "bias" else None,
               color=["C0" if v > 0 else "lightgrey" for v in values], capsize=3)
        for i, v in enumerate(values):
            if v <= 0:
                ax.annotate("0", (i, floor), ha="center", va="bottom")
        ax.set_yscale("log")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_study(cfg: DictConfig) -> list[dict]:
    """The study of conf/gradient_study.yaml's options (checked by scripts/gradient_study.py): the
    table, printed and written with its CSV and plot into the run folder; returns its rows."""
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    device = resolve_device(cfg.device)
    output_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    splits = build(cfg.data).load_splits()  # read once: the training mean and the batch
    model, weights = load_model(cfg, device, splits)
    x = validation_batch(cfg, device, splits)
    estimators, notes = build_estimators(cfg, model, device)

    torch.manual_seed(seed_for(cfg, "reference"))
    reference = diagnostics.reference_gradient(model, x, chunk_size=cfg.chunk_size, **cfg.reference)
    print(f"reference: {reference.describe()}")
    rows = []
    for name, layers in estimators:
        estimator = layers[0]
        torch.manual_seed(seed_for(cfg, name))
        if isinstance(estimator, ScoreFunction) and cfg.warm_baseline:
            warm_baseline(model, x, layers)
        if cfg.warm_control_variate and any(p.requires_grad for each in layers for p in each.parameters()):
            warm_control_variate(model, x, layers, int(cfg.warm_control_variate))
        report = diagnostics.gradient_diagnostics(
            model, x, layers, cfg.num_estimates, reference=reference, name=name,
            chunk_size=cfg.chunk_size, timing_repeats=cfg.timing_repeats,
        )
        tau = f"{float(estimator.tau):g}" if estimator.has_temperature else "-"
        rows.append({**report.row(), "tau": tau})
        print(f"{name}: {report}")

    header = [
        f"model: {model.describe()}, hidden {list(cfg.model.hidden_dims)}; "
        f"weights: {weights}" + ("; the gradient of the lowest layer's encoder" if len(model.latents) > 1 else ""),
        f"batch: the first {len(x)} validation images; M={cfg.num_estimates} estimates per estimator; "
        f"gradient of the training loss w.r.t. the encoder parameters",
        f"reference: {reference.describe()}",
        f"temperature: {'each estimator its own tau' if cfg.temperature is None else f'tau = {cfg.temperature} for all (none below its floor tau_min)'}"
        + ("; sf baseline: the batch-mean cost" if cfg.warm_baseline else "")
        + (f"; rebar and relax: their parameters after {cfg.warm_control_variate} Adam steps (lr 1e-2) of the "
           f"variance gradient on the batch" if cfg.warm_control_variate else ""),
        f"device: {describe_device(device)}; torch {torch.__version__}",
        *notes,
    ]
    table = markdown(rows, header)
    print(table)
    (output_dir / "gradient_study.md").write_text(table)
    with open(output_dir / "gradient_study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["estimator"])
        writer.writeheader()
        writer.writerows(rows)
    if rows:
        plot(rows, output_dir / "gradient_study.png", f"{model.describe()}; reference: {reference.describe()}")
    print(f"wrote gradient_study.md, .csv, .png in {output_dir}")
    return rows
