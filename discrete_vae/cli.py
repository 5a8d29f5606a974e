"""What the scripts share around Hydra's parsing of the command line: spellings Hydra's grammar
would refuse, turned into what the user meant; Hydra's own errors (a misspelt option or key, a
comma list without -m) and Ctrl-C as one line each; and the run-directory names of sweeps."""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from discrete_vae.errors import INTERRUPTED, find_user_error

CONF = Path(__file__).resolve().parents[1] / "conf"
OURS = "DISCRETE_VAE_HYDRA_ERRORS"  # set with HYDRA_FULL_ERROR by run_script, for its child processes

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


def override_pairs(overrides: Sequence[str]) -> dict[str, str]:
    """`key=value` command-line overrides as {key: value}, `+`/`~` prefixes dropped (the last of a key wins)."""
    return {key.lstrip("+~"): value for key, _, value in (str(o).partition("=") for o in overrides)}


def run_name(overrides: Sequence[str], exclude: Sequence[str] = ()) -> str:
    """A sweep job's folder name from its overrides: the estimator's name first, then the seed,
    then the other `key=value` pairs sorted, `+` prefixes dropped and `exclude` (paths, resources,
    cadences, quick-check limits: conf/train.yaml) left out,
    e.g. `st_gumbel,seed=2,trainer.max_epochs=5`. TensorBoard's run list shows the start of
    each name, so what differs between runs comes first."""
    pairs = {key: value for key, value in override_pairs(overrides).items() if key not in exclude}
    head = [pairs.pop(k) if k == "estimator" else f"{k}={pairs.pop(k)}" for k in FIRST_KEYS if k in pairs]
    return ",".join(head + [f"{k}={v}" for k, v in sorted(pairs.items())]) or "default"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", lambda overrides, exclude: run_name(overrides, exclude))


def run_script(main: Callable[[], Any]) -> None:
    """A script's `__main__`. Hydra's own mistakes (a misspelt option, an unknown key, a comma list
    without -m), a user's mistake or the machine's, and Ctrl-C (outside the training loop, whose own
    handling says where the run stopped) end it with one `error:` line, status 1 (130 for Ctrl-C),
    instead of Hydra's many lines or a traceback. HYDRA_FULL_ERROR=1 keeps Hydra's whole trace."""
    full = os.environ.get("HYDRA_FULL_ERROR") == "1" and not os.environ.get(OURS)
    os.environ.update({"HYDRA_FULL_ERROR": "1", OURS: "1"})  # Hydra raises its errors here, to be told in one line
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); nothing partial was written, and what was written before is kept. "
              "Run the same command again to go on", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except Exception as err:
        line = None if full else hydra_error_line(err)
        if line is None and not full and (user_error := find_user_error(err)) is not None:
            line = f"error: {user_error}"
        if line is None:
            raise
        sys.exit(line)


def hydra_error_line(err: BaseException) -> str | None:
    """One line for an error Hydra raises while it composes the config, or None for any other."""
    from hydra.errors import CompactHydraException, HydraException, MissingConfigException

    text = str(err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, name = err.missing_cfg_file.rsplit("/", 1)
        options = sorted(err.options or [])
        return f"error: {group}={name} is not an option{_closest(name, options)}; choose from {', '.join(options)}"
    if match := re.search(r"Ambiguous value for argument '([^']+)'", text):
        arg = match.group(1)
        return (f"error: {arg} gives several values: add -m to run one job for each (python "
                f"{Path(sys.argv[0]).name} -m {arg}), write [a,b] for a list, or quote it for one string")
    if match := re.search(r"Could not override '([^']+)'", text):
        key = match.group(1)
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        siblings = [parent + name for name in sibling_keys(key)]
        return (f"error: {key} is not a setting{_closest(key, siblings)}; correct it "
                f"(python {Path(sys.argv[0]).name} --help lists the groups), or add a new key with +{key}=...")
    if isinstance(err, (CompactHydraException, HydraException)):
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
        return first if first.startswith("error:") else f"error: {first}"
    return None


def _closest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def sibling_keys(dotted: str) -> list[str]:
    """The keys beside `dotted`'s last part in conf/: those of every file of its group (conf/trainer/*.yaml
    for trainer.max_step), or of the scripts' own files for a top-level key."""
    parts = dotted.split(".")
    files = sorted((CONF / parts[0]).glob("*.yaml")) if len(parts) > 1 else sorted(CONF.glob("*.yaml"))
    keys = set()
    for path in files:
        node = OmegaConf.to_container(OmegaConf.load(path))
        for part in parts[1:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            keys |= {str(k) for k in node if not str(k).startswith("_")} - {"defaults", "hydra"}
    return sorted(keys)


SUMMARY_METRICS = ("val/neg_elbo", "val/nll_iwae", "test/neg_elbo", "test/nll_iwae")


def run_summary_lines(record: dict[str, Any], folder: Path) -> list[str]:
    """What a person reads at the end of a training run: the folder, the final bounds rounded to
    hundredths of a nat, and the command that shows the run in TensorBoard."""
    metrics = record.get("metrics") or {}
    shown = "  ".join(f"{k} {metrics[k]:.2f}" for k in SUMMARY_METRICS if isinstance(metrics.get(k), (int, float)))
    steps, wall = record.get("steps"), record.get("wall_time_s")
    budget = ", ".join(filter(None, [f"{steps:,} steps" if isinstance(steps, int) else "",
                                     _duration(wall) if isinstance(wall, (int, float)) else ""]))
    return [f"{record.get('status', 'finished')}: {folder}" + (f" ({budget})" if budget else ""),
            f"  {shown or 'no bounds recorded'}  (nats per image)",
            f"  tensorboard --logdir {folder}"]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


class SweepSummary(Callback):
    """A Hydra callback (conf/train.yaml's hydra.callbacks) that ends a multirun with the command
    that tabulates its runs."""

    def on_multirun_end(self, config, **kwargs) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        print(f"sweep done: {folder}\n  python scripts/report.py {folder}   # one table of its runs (report.md)")
