"""Likelihood bounds of a trained checkpoint on a data split, in nats per image.

    python scripts/evaluate.py ckpt_path=PATH/checkpoints/best-step5000.ckpt
    python scripts/evaluate.py ckpt_path=... num_samples=5000 split=val device=cuda

Prints neg_elbo (m hard samples, analytic KL), nll_iwae (the importance-weighted
bound with m samples, Burda et al. 2016) and nll_exact (exact -log p(x) by
enumeration when K^N <= max_configs, else absent), and writes them as JSON beside
the checkpoint. The maths is in discrete_vae/evaluation.py; options in conf/evaluate.yaml.
"""

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from discrete_vae.checks import check_known_keys, require_choice, require_seed, require_writable_folder
from discrete_vae.cli import normalize_overrides, run_script
from discrete_vae.errors import ConfigError, count, exit_on_user_error, require_budget, require_number

SPLITS = ("train", "val", "test")
PATH_KEYS = ("ckpt_path", "output", "data_root")


def check_options(cfg: DictConfig) -> None:
    """Every option of conf/evaluate.yaml, before anything is read."""
    check_known_keys(cfg, "evaluate")
    require_choice("split", cfg.split, SPLITS)
    for key in ("num_samples", "batch_size", "max_rows"):
        require_number(key, cfg[key], positive=True, integer=True)
    require_budget("max_configs", cfg.max_configs)
    require_seed("seed", cfg.seed)
    if cfg.limit_batches is not None:
        require_number("limit_batches", cfg.limit_batches, positive=True, integer=True, hint="or null for all")
    if cfg.data_root is not None and Path(str(cfg.data_root)).expanduser().is_file():
        raise ConfigError(f"data_root={cfg.data_root} is a file; point it at the folder that holds binarized_mnist/")
    if cfg.output is not None and Path(str(cfg.output)).is_dir():
        raise ConfigError(f"output={cfg.output} is a folder; give the path of the JSON file to write")
    if not all(isinstance(m, str) for m in cfg.trusted_modules):
        raise ConfigError(f"trusted_modules must be a list of package names, got {cfg.trusted_modules}")


def with_progress(batches: list, total: int):
    """The batches, with a line on stderr after each: images done, time spent, an estimate of the
    time left (at m = 1000 the 10,000 test images take minutes)."""
    start, done = time.perf_counter(), 0
    for batch in batches:
        yield batch
        done += len(batch)
        spent = time.perf_counter() - start
        left = spent / done * (total - done)
        print(f"  {done:,} / {total:,} images, {spent:.0f} s" + (f", about {left:.0f} s left" if done < total else ""),
              file=sys.stderr, flush=True)


def run(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError("give the checkpoint to evaluate: python scripts/evaluate.py ckpt_path=PATH.ckpt")
    ckpt = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if not ckpt.is_file():
        raise ConfigError(f"no checkpoint at {ckpt}; pass ckpt_path=PATH to a .ckpt written by scripts/train.py")
    check_options(cfg)
    # torch and Lightning only now (seconds to import): a mistake above is answered at once
    from discrete_vae import records
    from discrete_vae.build import build, load_checkpoint
    from discrete_vae.devices import resolve_device
    from discrete_vae.evaluation import evaluate

    device = resolve_device(str(cfg.device))
    output = Path(str(cfg.output)).expanduser() if cfg.output else records.evaluation_path(ckpt, cfg.split)
    require_writable_folder("the checkpoint's folder" if not cfg.output else "output", output.parent)

    start = time.perf_counter()
    module, train_cfg = load_checkpoint(ckpt, map_location=device, trusted_modules=list(cfg.trusted_modules))
    model = module.model.to(device)
    # the data of this machine, never the checkpoint's path: a checkpoint touches nothing outside its run
    data_cfg = OmegaConf.merge(train_cfg.data, {"root": cfg.data_root})
    images = build(data_cfg).load_splits()[cfg.split]  # (rows, D), on the CPU
    if cfg.split == "train" and images.dtype.is_floating_point:
        raise ConfigError("split=train of dynamically binarized data is grey-level; evaluate split=val or split=test")
    subset = None
    if cfg.limit_batches is not None and int(cfg.limit_batches) * cfg.batch_size < len(images):
        # a random subset (the seed's), not the first images: MNIST's first ones are no fair sample
        import torch

        rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(int(cfg.seed)))
        images = images[rows[: int(cfg.limit_batches) * cfg.batch_size].sort().values]
        subset = f"{len(images)} of the split's images drawn at random with seed {cfg.seed}"
    batches = [images[i : i + cfg.batch_size] for i in range(0, len(images), cfg.batch_size)]

    print(f"evaluating {ckpt.name} on {len(images)} {cfg.split} images{' (a random subset)' if subset else ''}, "
          f"m={cfg.num_samples} samples each, on {device}", flush=True)
    metrics = evaluate(model, with_progress(batches, len(images)), cfg.num_samples, cfg.seed, cfg.max_configs,
                       cfg.max_rows)
    record = {
        "checkpoint": str(ckpt),
        "split": cfg.split,
        "num_images": metrics.pop("num_images"),
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "device": str(device),
        "estimator": train_cfg.estimator._target_.rsplit(".", 1)[-1],
        "latent": OmegaConf.to_container(train_cfg.latent),
        "metrics": metrics,
        **({"subset": subset} if subset else {}),
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    if metrics["nll_exact"] is None:
        record["nll_exact_absent"] = (
            f"{count(model.num_configs)} configurations ({model.describe()}) is over the "
            f"enumeration budget max_configs={cfg.max_configs}"
        )
    records.write_json(output, record)

    print(f"{ckpt} on {cfg.split} ({record['num_images']} images, m={cfg.num_samples}, seed={cfg.seed}, {device}):")
    for name, value in metrics.items():
        shown = f"{value:.3f}" if value is not None else f"absent ({record['nll_exact_absent']})"
        print(f"  {name:9s} {shown}")
    print(f"written to {output}")
    return record


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@exit_on_user_error  # a user's mistake gets its message, not a traceback
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.argv = normalize_overrides(sys.argv, path_keys=PATH_KEYS)
    run_script(main)
