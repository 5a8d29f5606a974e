"""Time one training step (encoder, estimator, decoder, backward, Adam) per estimator.

    python scripts/benchmark.py                        # every estimator, GPU if there is one
    python scripts/benchmark.py --estimators sf rloo --device cpu --steps 200

Prints a Markdown table of milliseconds per step and images per second. The step is the
model's own objective (`VAE.objective`, what training_step calls) on a batch already on the device,
without the Lightning loop, so the figures are the estimator's cost, not the framework's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from discrete_vae.build import build_module
from discrete_vae.devices import describe_device, resolve_device
from discrete_vae.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


def time_steps(model, x, steps: int, warmup: int) -> float:
    """Seconds per optimisation step, synchronising the device only around the timed loop."""
    optimizer = model.configure_optimizers()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.model.objective(x, model.estimators).loss.backward()
        optimizer.step()
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    names = sorted(p.stem for p in (CONF / "estimator").glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimators", nargs="+", default=names, choices=names)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the model, e.g. latent.num_latents=30")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    x = (torch.rand(args.batch_size, 784, device=device) < 0.13).float()
    print(f"device: {device} ({describe_device(device)}), torch {torch.__version__}, batch {args.batch_size}, {args.steps} steps\n")
    print("| estimator | model | ms / step | images / s |\n| --- | --- | --- | --- |")
    for name in args.estimators:
        small = ["latent.num_latents=2", "latent.num_categories=10"] if name == "exact" else []
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[f"estimator={name}", *small, *args.overrides])
            try:  # each estimator on a latent type that offers what it needs: the configured one, else bits
                instantiate(cfg.estimator).check(instantiate(cfg.latent))
            except ConfigError:
                cfg = compose("train", overrides=[f"estimator={name}", "latent=bernoulli", *args.overrides])
        model = build_module(cfg).to(device)
        seconds = time_steps(model, x, args.steps, args.warmup)
        print(f"| {name} | {model.model.latent.describe()} | {1e3 * seconds:.2f} | {args.batch_size / seconds:,.0f} |")


if __name__ == "__main__":
    main()
