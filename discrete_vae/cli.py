"""What the scripts share before Hydra parses the command line: spellings Hydra's grammar would
refuse, turned into what the user meant, and the run-directory names of sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

OPTIONAL_GROUPS = ("logger",)  # groups a run can go without: `logger=null` means `~logger`
OUTPUT_DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")  # Hydra creates them before any code of ours runs


def normalize_overrides(argv: Sequence[str], path_keys: Sequence[str] = ()) -> list[str]:
    """`logger=null` -> `~logger` (Hydra only knows the latter), and path values quoted for
    Hydra's grammar: sweep folders are named like `st_gumbel,seed=1`, and an unquoted `=` or
    `,` in a value is a syntax error. An output folder that is a file ends the script here, in
    one line (Hydra would fail creating it, with a traceback)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in OUTPUT_DIR_KEYS and Path(value.strip("'\"")).expanduser().is_file():
            raise SystemExit(f"error: {key.lstrip('+')}={value} is a file; give a folder for the run's outputs")
        if sep and key.lstrip("+") in OPTIONAL_GROUPS and value in ("null", "none", "None"):
            arg = f"~{key.lstrip('+')}"
        elif sep and key in path_keys and value and value[0] not in "'\"" and "'" not in value:
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


FIRST_KEYS = ("estimator", "seed")  # what tells the runs of a typical sweep apart (the estimator bare)


def run_name(overrides: Sequence[str], exclude: Sequence[str] = ()) -> str:
    """A sweep job's folder name from its overrides: the estimator's name first, then the seed,
    then the other `key=value` pairs sorted, `+` prefixes dropped and paths/budgets excluded,
    e.g. `st_gumbel,seed=2,trainer.max_epochs=5`. TensorBoard's run list shows the start of
    each name, so what differs between runs comes first."""
    pairs = {}
    for item in overrides:
        key, _, value = str(item).lstrip("~+").partition("=")
        if key not in exclude:
            pairs[key] = value
    head = [pairs.pop(k) if k == "estimator" else f"{k}={pairs.pop(k)}" for k in FIRST_KEYS if k in pairs]
    return ",".join(head + [f"{k}={v}" for k, v in sorted(pairs.items())]) or "default"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", lambda overrides, exclude: run_name(overrides, exclude))
