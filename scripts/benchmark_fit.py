"""Our `trainer.fit`, as scripts/train.py runs it, against a plain PyTorch loop on the same work.

    python scripts/benchmark_fit.py                          # CPU or GPU, 1 epoch per measurement, 3 rounds
    python scripts/benchmark_fit.py --epochs 2 --rounds 5 estimator=gumbel data.batch_size=1000

Three pipelines train the same model (the configured one, default 20x10 with 784-512-256
MLPs and ST Gumbel-Softmax) on the same binarized MNIST for the same number of epochs, each
epoch followed by one validation pass over the validation split:
- `fit`: `trainer.fit` built exactly as scripts/train.py builds it (`discrete_vae.training.build_run`):
  validation, checkpoints (best and latest), TensorBoard, temperature annealing, divergence guard;
- `plain`: a hand-written loop: the split as one tensor on the device, one `randperm` per epoch,
  the model's shared step, Adam with `fused=True`, no logging;
- `lightning`: Lightning's loop alone: a Trainer with no callbacks, logger or checkpoints and no
  sanity check, over the same model and datamodule: the ceiling of any `fit` built on Lightning;
- `dataloader`: the pipeline of typical public Gumbel-Softmax VAE code: a per-image
  `Dataset` and a shuffling `DataLoader`, default Adam, the same step.
They run interleaved (fit, plain, lightning, dataloader; `--rounds` times) so that they share the
machine's state, and the medians are reported as images per second, with the ratios.
Data must be local: point DISCRETE_VAE_DATA (or data.root=...) at it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from discrete_vae.build import build_module
from discrete_vae.cli import normalize_overrides
from discrete_vae.devices import describe_device
from discrete_vae.module import NVML_CHECK
from discrete_vae.training import build_run, quiet_third_party, set_num_threads

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_run(overrides: list[str], output_dir: Path):
    """The training config with Hydra's runtime set, as under scripts/train.py."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={output_dir}"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def time_fit(cfg, output_dir: Path, epochs: int) -> tuple[float, int]:
    """Seconds of `trainer.fit` for `epochs` epochs, and the images trained on."""
    datamodule, model, trainer = build_run(cfg, output_dir, extra_trainer={"max_epochs": epochs, "max_steps": -1})
    return _timed_fit(trainer, model, datamodule, cfg.data.batch_size)


def time_lightning(cfg, datamodule, epochs: int) -> tuple[float, int]:
    """Seconds of a bare `trainer.fit` (Lightning's loop with nothing of ours around it), and the images."""
    model = build_module(cfg)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, max_epochs=epochs,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[],
    )
    return _timed_fit(trainer, model, datamodule, cfg.data.batch_size)


def _timed_fit(trainer, model, datamodule, batch_size: int) -> tuple[float, int]:
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, trainer.global_step * batch_size


def plain_epoch_loop(model, train, val, epochs, optimizer, batches) -> None:
    for _ in range(epochs):
        model.train()
        for x in batches(train):
            optimizer.zero_grad(set_to_none=True)
            model.model.objective(x, model.estimators).loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for start in range(0, len(val), 1000):
                model.model.neg_elbo(val[start : start + 1000].float()).mean()


def time_plain(cfg, device, splits, epochs: int) -> tuple[float, int]:
    model = build_module(cfg).to(device)
    train, val = splits["train"].to(device), splits["val"].to(device)
    B = cfg.data.batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optimizer.lr, fused=True)

    def batches(data):
        order = torch.randperm(len(data), device=device)
        for start in range(0, len(data), B):
            yield data[order[start : start + B]].float()

    return _timed(lambda: plain_epoch_loop(model, train, val, epochs, optimizer, batches), device), epochs * len(train)


def time_dataloader(cfg, device, splits, epochs: int) -> tuple[float, int]:
    from torch.utils.data import DataLoader, Dataset

    class Images(Dataset):  # one image per __getitem__, as torchvision datasets serve them
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return self.data[i].float()

    model = build_module(cfg).to(device)
    train, val = splits["train"], splits["val"].to(device)
    loader = DataLoader(Images(train), batch_size=cfg.data.batch_size, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optimizer.lr)
    batches = lambda _: (x.to(device) for x in loader)  # noqa: E731
    return _timed(lambda: plain_epoch_loop(model, train, val, epochs, optimizer, batches), device), epochs * len(train)


def _timed(fn, device) -> float:
    """Seconds of fn(), run as it would run in a script that never imported Lightning: Lightning's
    import sets PYTORCH_NVML_BASED_CUDA_CHECK=1, which costs a plain loop on a CPU ~70 us a step in
    Adam's torch.cuda.is_available() (our fit switches it off itself: VAEModule.on_fit_start)."""
    saved = os.environ.pop(NVML_CHECK, None)
    try:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    finally:
        if saved is not None:
            os.environ[NVML_CHECK] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the pipelines")
    parser.add_argument("--skip-dataloader", action="store_true", help="leave the DataLoader pipeline out")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config, e.g. estimator=gumbel")
    args = parser.parse_args()
    quiet_third_party()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = normalize_overrides(["trainer.enable_progress_bar=false", *args.overrides], ("data.root",))
        cfg = compose_run(overrides, Path(tmp) / "run0")
        torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))
        set_num_threads(cfg)  # num_threads=..., as scripts/train.py applies it
        datamodule = instantiate(cfg.data)
        splits = datamodule.load_splits()
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu")
        print(f"device: {describe_device(device)}, torch {torch.__version__}, batch {cfg.data.batch_size}, "
              f"{args.epochs} epoch(s) per measurement, {args.rounds} interleaved rounds, overrides: {args.overrides}")
        results: dict[str, list[float]] = {"fit": [], "plain": [], "lightning": [], "dataloader": []}
        for r in range(args.rounds):
            torch.manual_seed(r)
            seconds, images = time_fit(compose_run(overrides, Path(tmp) / f"run{r + 1}"), Path(tmp) / f"run{r + 1}", args.epochs)
            results["fit"].append(images / seconds)
            seconds, images = time_plain(cfg, device, splits, args.epochs)
            results["plain"].append(images / seconds)
            seconds, images = time_lightning(cfg, datamodule, args.epochs)
            results["lightning"].append(images / seconds)
            if not args.skip_dataloader:
                seconds, images = time_dataloader(cfg, device, splits, args.epochs)
                results["dataloader"].append(images / seconds)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} images/s" for k, v in results.items() if v))
    median = {k: statistics.median(v) for k, v in results.items() if v}
    print("\n| pipeline | images / s (median) | fit / pipeline |\n| --- | --: | --: |")
    for name, value in median.items():
        print(f"| {name} | {value:,.0f} | {median['fit'] / value:.2f}x |")
    print(f"\nLightning's loop alone runs at {median['lightning'] / median['plain']:.2f}x the plain loop: "
          f"no fit built on it is faster; ours takes {median['lightning'] / median['fit'] - 1:+.1%} time over that bare Trainer.")


if __name__ == "__main__":
    main()
