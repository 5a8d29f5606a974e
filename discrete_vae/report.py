"""Tables and plots of training runs, from a sweep folder or from the committed run records.

Three uses, one code path (scripts/report.py is the command line):

- `report(sweep_dir)`: a Hydra multirun of scripts/train.py summarised into it (report.md,
  report.csv, val_neg_elbo.png, test_nll.png);
- `export(sweep_dir, records_dir)`: each finished (or diverged) run's compact record, a few KB:
  `metrics.json` (with the scripts/evaluate.py result of its best checkpoint, when there is one)
  and `val_curve.csv`, with no machine-specific paths, no checkpoints and no event files;
- `results(records_root, markdown)`: the tables and plots of docs/results.md rebuilt from
  the records alone (docs/results/<experiment>/<run>/), so that a sweep can be spread over
  machines and days and anyone can regenerate the page from the repository.

Every job folder (one holding .hydra/ or metrics.json) is one run. A run is "finished" when
its metrics.json says so, "failed" when metrics.json records the error
(discrete_vae.training.train writes it), "diverged" when its loss stopped being finite
(the DivergenceGuard callback stopped it), and "unfinished" when there is no metrics.json
(killed, or still running); failed and unfinished runs are listed, never silently dropped
(nor diverged ones). Runs are grouped into configurations by their overrides minus the seed
(and minus the keys that do not name a run: paths, resources, quick-check limits, and overrides every run shares), so a
sweep over estimator=... and seed=... gives one row per estimator.

The sweep report (report.md) has one row per configuration, mean ± standard deviation over
seeds (sample s.d., n - 1) of val/neg_elbo, test/neg_elbo, test/nll_iwae, the number of seeds,
steps, wall time, and how much val/neg_elbo still fell over the last 20% of the steps; then
every run, and the runs that failed or did not finish. Curves come from a run's val_curve.csv
(records) or else its TensorBoard event files (sweep folders).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from discrete_vae import records
from discrete_vae.cli import CONF, override_pairs
from discrete_vae.errors import ConfigError, DataError
from discrete_vae.records import DIVERGED, DONE, EARLIER_DIR, FAILED, FINISHED, METRICS_FILE, UNFINISHED

# Overrides that never name a configuration: the seed and Hydra's own settings, plus the
# keys each run's Hydra config excludes from its directory name (read from .hydra/hydra.yaml:
# hydra.job.config.override_dirname.exclude_keys, set in conf/train.yaml).
ALWAYS_IGNORED = {"seed"}
METRICS = ("val/neg_elbo", "test/neg_elbo", "test/nll_iwae")
# scripts/evaluate.py on the best checkpoint (m samples per test image), when a run has one
EVAL_METRICS = ("eval/neg_elbo", "eval/nll_iwae", "eval/nll_exact")
CURVE_TAG = "val/neg_elbo"
CURVE_FILE = "val_curve.csv"  # step,val/neg_elbo: a record's validation curve
LAST_FRACTION = 0.2  # "still falling": the val/neg_elbo drop over the last 20% of the steps
UNFINISHED_WHY = "no metrics.json: killed, crashed hard, or still running"
MAX_VALUE = 1e15  # nats per image: a bound beyond this is no measurement (and 1e308s overflow means and plots)
MAX_YAML_BYTES = 2**20  # .hydra/hydra.yaml is a few KB; PyYAML takes seconds and ~1 KB of memory a node
MAX_CURVE_BYTES = 8 * 2**20  # val_curve.csv: ~20 bytes an evaluation, 10,000 evaluations are 200 KB
log = logging.getLogger(__name__)


@dataclass
class Run:
    path: Path
    overrides: list[str]
    status: str  # finished | failed | diverged | unfinished
    record: dict = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val/neg_elbo)
    config: str = ""
    ignored_keys: set[str] = field(default_factory=lambda: set(ALWAYS_IGNORED))

    @property
    def seed(self):
        for item in self.overrides:
            if item.startswith("seed="):
                return item.split("=", 1)[1]
        return self.record.get("seed")

    @property
    def estimator(self) -> str:
        for item in self.overrides:
            if item.startswith("estimator="):
                return item.split("=", 1)[1]
        return self.record.get("estimator") or "(default)"

    @property
    def evaluation(self) -> dict:
        """scripts/evaluate.py's record of the best checkpoint on the test split ({} when none)."""
        return self.record.get("evaluation") or {}

    def naming_overrides(self) -> list[str]:
        """The overrides that name the run: without the keys its Hydra config leaves out of run
        names (paths such as data.root, budgets of quick checks, resources) and hydra.* (the seed stays)."""
        dropped = self.ignored_keys - ALWAYS_IGNORED
        return [o for o in self.overrides if _key(o) not in dropped and not _key(o).startswith("hydra.")]

    def metric(self, name: str) -> float | None:
        if name.startswith("eval/"):
            value = self.evaluation.get("metrics", {}).get(name[len("eval/"):])
        else:
            value = self.record.get("metrics", {}).get(name)
        return float(value) if measured(value) else None

    def last_drop(self) -> float | None:
        """val/neg_elbo at the last evaluation at or before 80% of the steps, minus the final one."""
        if len(self.curve) < 2:
            return None
        threshold = (1 - LAST_FRACTION) * self.curve[-1][0]
        before = [v for s, v in self.curve if s <= threshold] or [self.curve[0][1]]
        return before[-1] - self.curve[-1][1]


def _key(item: str) -> str:
    """The key of an override: `+model.x=1` -> `model.x`."""
    return str(item).split("=", 1)[0].lstrip("+~")


def where(run: Run, root: Path) -> str:
    return "." if run.path == root else str(run.path.relative_to(root))


def find_runs(root: Path) -> list[Run]:
    """Every run under `root`, as its own metrics.json names it: its overrides are the record's
    (.hydra/ is rewritten by any later command in the folder, even one that is skipped or refused),
    and .hydra/overrides.yaml stands in only where there is no record. Attempts set aside in a
    run's earlier/ folder are not runs. A record that cannot be read or is not valid is listed as
    failed, with its problem, never a traceback."""
    folders = {p.parent for p in root.rglob(METRICS_FILE)}
    folders |= {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    folders = {f for f in folders if EARLIER_DIR not in f.relative_to(root).parts}
    runs = []
    for folder in sorted(folders):
        record, problem = records.load_record(folder)
        if problem:
            record = {"status": FAILED, "error": f"not a valid run record: {problem}; fix or delete it"}
        record = records.strict_json(record or {})  # NaN or Infinity read as null, as training writes them
        overrides = record.get("overrides")
        if overrides is None:
            overrides = _yaml(folder / ".hydra" / "overrides.yaml")
            overrides = overrides if isinstance(overrides, list) else []
        status = record.get("status", UNFINISHED) if record else UNFINISHED
        if record and "evaluation" not in record and (evaluation := read_evaluation(folder, record)):
            record["evaluation"] = evaluation
        runs.append(Run(folder, [str(o) for o in overrides or []], status, record, read_curve(folder), "",
                        ALWAYS_IGNORED | excluded_keys(folder)))
    return runs


class NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (*name): a kilobyte of nested aliases (the "billion laughs")
    expands into billions of items, minutes and gigabytes. Hydra never writes an alias into .hydra/."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "found an alias (*name), which .hydra/ files never hold;"
                                              " write the values out", self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _yaml(path: Path):
    """A YAML file's contents, or None when it is absent or not YAML (a report never stops on one; a
    file it refuses is named in a warning): read with records.read_small_text (a small regular file,
    UTF-8) and NoAliasLoader; a nesting too deep for PyYAML's recursion is refused like a syntax error."""
    try:
        return yaml.load(records.read_small_text(path, MAX_YAML_BYTES), Loader=NoAliasLoader)  # noqa: S506
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("%s cannot be read (%s); the run is listed without it", path, err.strerror or err)
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        why = " ".join(str(err).split())  # PyYAML's messages span lines
        log.warning("%s is not a YAML file of Hydra (%s); the run is listed without it", path, why)
    return None


def excluded_keys(folder: Path) -> set[str]:
    """The keys the run's Hydra config leaves out of its directory name (paths, resources, quick-check limits)."""
    tree = _yaml(folder / ".hydra" / "hydra.yaml")
    for key in ("hydra", "job", "config", "override_dirname", "exclude_keys"):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return set(map(str, tree)) if isinstance(tree, list) else set()


def read_evaluation(folder: Path, record: dict) -> dict | None:
    """scripts/evaluate.py's JSON for the run's best checkpoint (written beside it), if any."""
    best = record.get("best_checkpoint")
    if not best:
        return None
    path = records.evaluation_path(folder / "checkpoints" / Path(best).name, "test")
    try:
        evaluation = records.strict_json(records.read_json(path))
    except OSError:  # absent (or its folder is): the run has no evaluation
        return None
    except records.BadRecord as err:  # refused, not UTF-8, not JSON, too deep: named, and left out
        log.warning("%s; the run is listed without its evaluation", err)
        return None
    if (problem := records.check_evaluation(evaluation)) is not None:
        log.warning("%s: %s; the run is listed without its evaluation", path, problem)
        return None
    evaluation["checkpoint"] = Path(evaluation.get("checkpoint", best)).name  # no machine's path
    return evaluation


def measured(value) -> bool:
    """Whether a metric's value is a number a run can have measured: finite and within ±MAX_VALUE. A NaN or
    an infinity (a run diverging, a hand-edited file) would make every mean, band and axis NaN, and 1e308s
    overflow them (matplotlib then refuses the axis limits)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and abs(value) <= MAX_VALUE


def finite(curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The points of a curve whose value was measured (`measured`): the others are dropped."""
    return [(step, value) for step, value in curve if measured(value)]


def read_curve(folder: Path) -> list[tuple[int, float]]:
    """(step, value) of CURVE_TAG: from the folder's val_curve.csv (a record), else from the
    event files directly in `folder` (a sweep's run), by step; points that are not finite dropped."""
    try:
        text = records.read_small_text(folder / CURVE_FILE, MAX_CURVE_BYTES)
    except FileNotFoundError:
        text = None
    except (OSError, ValueError):  # a FIFO, a device, too large, not UTF-8: the run is listed without one
        return []
    if text is not None:
        try:
            return finite([(int(row["step"]), float(row[CURVE_TAG]))
                           for row in csv.DictReader(io.StringIO(text, newline=""))])
        except (ValueError, KeyError, TypeError, csv.Error):
            return []  # a damaged curve: the run is listed without one
    if not any(folder.glob("events.out.tfevents.*")):
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # a resumed run's purge notices: expected
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    try:
        accumulator.Reload()
    except Exception:  # damaged event files (TensorBoard's own errors vary): the run has no curve
        return []
    if CURVE_TAG not in accumulator.Tags().get("scalars", []):
        return []
    by_step = {e.step: e.value for e in accumulator.Scalars(CURVE_TAG)}  # a resumed run: the latest wins
    return finite(sorted(by_step.items()))


def name_configs(runs: list[Run], always: tuple[str, ...] = ()) -> None:
    """config = the run's overrides minus the seed and the keys that do not name a run, and minus the overrides
    that every finished run shares (a failed run started by hand may lack some of those) unless their key
    is one of `always` (a tuned table's estimator and rate name its rows even when it has one)."""

    kept = [[o for o in run.naming_overrides() if _key(o) not in ALWAYS_IGNORED] for run in runs]
    reference = [k for run, k in zip(runs, kept) if run.status == FINISHED] or kept
    shared = set.intersection(*(set(k) for k in reference)) if reference else set()
    shared = {o for o in shared if _key(o) not in always}
    for run, items in zip(runs, kept):
        distinct = [o for o in items if o not in shared]
        if len(distinct) == 1 and distinct[0].startswith("estimator="):
            run.config = run.estimator
        else:
            run.config = ",".join(sorted(distinct)) or "all"


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample s.d. of the finite values; None where there are none, or where the numbers are too
    large to add up (a hostile record's 1e308s: fsum raises OverflowError)."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None, None
    try:
        mean, std = statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)
    except (OverflowError, ValueError):
        return None, None
    return (mean, std) if math.isfinite(mean) and (std is None or math.isfinite(std)) else (None, None)


def summarise(runs: list[Run]) -> list[dict]:
    rows = []
    for config in sorted({r.config for r in runs}):
        group = [r for r in runs if r.config == config]
        done = [r for r in group if r.status == FINISHED]
        row = {
            "config": config,
            "estimator": ",".join(sorted({r.estimator for r in group})),
            "n_seeds": len(done),
            "seeds": " ".join(str(r.seed) for r in sorted(done, key=lambda r: str(r.seed))),
            "n_failed": sum(r.status == FAILED for r in group),
            "n_diverged": sum(r.status == DIVERGED for r in group),
            "n_unfinished": sum(r.status == UNFINISHED for r in group),
        }
        for name in METRICS:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([v for r in done if (v := r.metric(name)) is not None])
        row["steps_mean"], _ = mean_std([r.record["steps"] for r in done if r.record.get("steps") is not None])
        wall, _ = mean_std([r.record["wall_time_s"] / 60 for r in done if r.record.get("wall_time_s") is not None])
        row["wall_time_min_mean"] = wall
        row["val_drop_last20_mean"], row["val_drop_last20_std"] = mean_std(
            [d for r in done if (d := r.last_drop()) is not None]
        )
        rows.append(row)
    best_first = lambda row: (row["test/neg_elbo_mean"] is None, row["test/neg_elbo_mean"] or 0.0)  # noqa: E731
    return sorted(rows, key=best_first)


def fmt(mean: float | None, std: float | None = None, digits: int = 2) -> str:
    """`mean ± std` for a table; "—" for a value that is missing or not `measured` (never "nan")."""
    if not measured(mean):
        return "—"
    if not measured(std):
        std = None
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+")  # what starts a new line anywhere


def md_text(value) -> str:
    """`value` as text on one markdown line: line breaks as spaces (a record's text must not start rows,
    headings or list items of its own), and `<!--` broken up (`<\\!--` renders the same) so that no record
    can open a comment or end a <!-- report:NAME --> block that `results` rebuilds."""
    return LINE_BREAKS.sub(" ", str(value)).replace("<!--", "<\\!--")


def md_cell(value) -> str:
    """`value` as one markdown table cell: `md_text`, with `|` escaped as `\\|` so that it cannot add a
    column (backslashes just before it doubled: `a\\|` must not become an escaped backslash and a bare `|`)."""
    return re.sub(r"(\\*)\|", lambda m: m[1] * 2 + "\\|", md_text(value))


def md_row(cells) -> str:
    """One markdown table row: every table of a report is written through here, each cell by `md_cell`."""
    return "| " + " | ".join(md_cell(c) for c in cells) + " |"


def md_head(head: list[str], align: str = "--:") -> list[str]:
    """A table's header row and its rule: the first column left-aligned, the others `align`."""
    return [md_row(head), "|" + " --- |" + f" {align} |" * (len(head) - 1)]


def write_markdown(path: Path, root: Path, runs: list[Run], rows: list[dict], title: str) -> None:
    lines = [
        f"# Sweep report: `{md_text(title)}`",
        "",
        f"{len(runs)} runs: {sum(r.status == FINISHED for r in runs)} finished, "
        f"{sum(r.status == FAILED for r in runs)} failed, {sum(r.status == DIVERGED for r in runs)} diverged, "
        f"{sum(r.status == UNFINISHED for r in runs)} "
        f"did not finish. Nats per image, mean ± s.d. over seeds (n - 1); lower is better. "
        f"`val drop, last 20%`: how much val/neg_elbo still fell over the last 20% of the steps.",
        "",
        *md_head(["configuration", "seeds", *METRICS, "steps", "wall time (min)", "val drop, last 20%", "failed",
                  "diverged", "unfinished"]),
    ]
    for row in rows:
        lines.append(md_row([row["config"], row["n_seeds"], *(fmt(row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS),
                             fmt(row["steps_mean"], digits=0), fmt(row["wall_time_min_mean"], digits=1),
                             fmt(row["val_drop_last20_mean"], row["val_drop_last20_std"]), row["n_failed"],
                             row["n_diverged"], row["n_unfinished"]]))  # fmt: skip
    lines += ["", "## Every run", ""]
    lines += [md_row(["run", "configuration", "seed", "status", "steps", *METRICS, "wall time (min)"]),
              "| --- | --- | --: | --- | --: | --: | --: | --: | --: |"]
    for run in sorted(runs, key=lambda r: (r.config, str(r.seed))):
        wall = run.record.get("wall_time_s")
        lines.append(md_row([f"`{where(run, root)}`", run.config, run.seed, run.status, run.record.get("steps", "—"),
                             *(fmt(run.metric(m)) for m in METRICS),
                             fmt(None if wall is None else wall / 60, digits=1)]))  # fmt: skip
    problems = [r for r in runs if r.status != FINISHED]
    lines += ["", "## Runs that failed, diverged or did not finish", ""]
    if not problems:
        lines.append("None.")
    for run in problems:
        why = run.record.get("error") if run.status in (FAILED, DIVERGED) else UNFINISHED_WHY
        last = f" (last val/neg_elbo {run.curve[-1][1]:.2f} at step {run.curve[-1][0]})" if run.curve else ""
        lines.append(md_text(f"- `{where(run, root)}` ({run.config}, seed {run.seed}): **{run.status}**{last}. {why}"))
    records.write_atomic(path, "\n".join(lines) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    records.write_atomic(path, text.getvalue())


def save_figure(fig, path: Path) -> None:
    """The figure as a PNG, written atomically (records.write_atomic)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    records.write_atomic(path, buffer.getvalue())


def plot_text(value) -> str:
    """A record's text as a matplotlib label: on one line, and `$` escaped, for matplotlib reads `$...$` as
    mathtext, and an override such as `x=$\\frac{$` would stop the plot with a ValueError."""
    return LINE_BREAKS.sub(" ", str(value)).replace("$", r"\$")


def plot_curves(path: Path, runs: list[Run], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    tops = []
    for row in rows:
        curves = [dict(r.curve) for r in runs if r.config == row["config"] and r.status == FINISHED and r.curve]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[s] for s in steps] for c in curves])  # (seeds, steps)
        mean, std = values.mean(0), values.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
        style = ("-", "--", ":")[len(ax.get_lines()) // 10 % 3]  # ten colours, then dashed
        marker = "o" if len(steps) == 1 else None  # a run that validated once: a point, not an empty line
        (line,) = ax.plot(steps, mean, style, marker=marker, label=f"{plot_text(row['config'])} (n={len(curves)})",
                          lw=1.5)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
        tops.append(mean[min(len(mean) - 1, max(1, len(mean) // 10))])
    if tops:
        bottom = min(line.get_ydata().min() for line in ax.get_lines())
        ax.set_ylim(bottom - 2, max(tops) + 2)  # the first evaluations would squash the rest
    ax.set_xlabel("training step")
    ax.set_ylabel("validation negative ELBO (nats)")
    ax.set_title("val/neg_elbo: mean over seeds, band ± 1 s.d.")
    ax.grid(alpha=0.3)
    if tops:  # (records without curves: an empty plot, and no legend to warn about)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_test(path: Path, runs: list[Run], rows: list[dict]) -> None:
    """Final test bounds per configuration, dots = seeds: test/neg_elbo, the IWAE bound (of
    scripts/evaluate.py where the runs have it, else of trainer.test) and the exact NLL if known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row["n_seeds"] > 0]
    has = lambda metric: any(r.metric(metric) is not None for r in runs)  # noqa: E731
    metrics = ["test/neg_elbo", "eval/nll_iwae" if has("eval/nll_iwae") else "test/nll_iwae"]
    metrics += ["eval/nll_exact"] if has("eval/nll_exact") else []
    colours = ("tab:blue", "tab:orange", "tab:green")
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.6), dpi=100)
    for j, (metric, colour) in enumerate(zip(metrics, colours)):
        offset, label = 0.25 * (j - (len(metrics) - 1) / 2), metric  # labelled once, at its first point
        for i, row in enumerate(rows):
            values = [v for r in runs if r.config == row["config"] and r.status == FINISHED
                      and (v := r.metric(metric)) is not None]  # fmt: skip
            if not values:
                continue
            mean, std = mean_std(values)
            ax.scatter(values, [i + offset] * len(values), s=12, color=colour, alpha=0.5)
            ax.errorbar(mean, i + offset, xerr=std or 0, fmt="o", color=colour, capsize=3, label=label)
            label = None
    ax.set_yticks(range(len(rows)), [plot_text(row["config"]) for row in rows])
    ax.invert_yaxis()
    ax.set_xlabel("nats per test image (lower is better)")
    ax.set_title("final test NLL bounds: mean ± 1 s.d. over seeds, dots = seeds")
    ax.grid(alpha=0.3, axis="x")
    if ax.get_legend_handles_labels()[1]:  # (no finished run: an empty plot, no legend to warn about)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def report(root: Path, title: str | None = None) -> list[dict]:
    """Write report.md, report.csv and the two plots into `root`; return the per-configuration rows."""
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; pass the multirun directory of a sweep")
    runs = find_runs(root)
    if not runs:
        raise DataError(f"no runs under {root}: expected job folders holding .hydra/ or metrics.json")
    name_configs(runs)
    rows = summarise(runs)
    write_markdown(root / "report.md", root, runs, rows, title or str(root))
    write_csv(root / "report.csv", rows)
    plot_curves(root / "val_neg_elbo.png", runs, rows)
    plot_test(root / "test_nll.png", runs, rows)
    return rows


# -- compact run records (docs/results/) ---------------------------------------------------------
RECORD_DROP = ("best_checkpoint",)  # a path on the machine that ran it; the record keeps its name only


def compact_record(run: Run) -> dict:
    """The run's metrics.json as committed: no absolute paths, the evaluation folded in."""
    record = {k: v for k, v in run.record.items() if k not in RECORD_DROP}
    # runs made on other machines (other paths, resources) group into the same rows
    record["overrides"] = run.naming_overrides()
    if run.record.get("best_checkpoint"):
        record["best_checkpoint_name"] = Path(run.record["best_checkpoint"]).name
    return record


def export(sweep_dir: Path, records_dir: Path, extra: dict | None = None) -> list[Path]:
    """Each finished or diverged run of `sweep_dir` as records_dir/<run folder>/{metrics.json,
    val_curve.csv}; `extra` fills keys a record lacks (e.g. "machine" for runs of an older
    version that did not record it). Existing records are overwritten. Returns the folders written."""
    written = []
    for run in find_runs(sweep_dir):
        if run.status not in DONE:
            continue
        target = records_dir / run.path.relative_to(sweep_dir)
        target.mkdir(parents=True, exist_ok=True)
        record = compact_record(run)
        for key, value in (extra or {}).items():
            record.setdefault(key, value)
        records.write_json(target / METRICS_FILE, record)
        lines = [f"step,{CURVE_TAG}"] + [f"{step},{value:.4f}" for step, value in run.curve]
        records.write_atomic(target / CURVE_FILE, "\n".join(lines) + "\n")
        written.append(target)
    return written


# -- docs/results.md ---------------------------------------------------------------------------
LR_KEY = "optimizer.lr"
BUDGET_KEYS = ("trainer.max_steps", "trainer.max_epochs", "trainer.max_time")  # a grid's reduced budget
SELECTION_FILES = ("selection.md", "selection.json")


def composed(overrides: tuple[str, ...]) -> DictConfig | None:
    """conf/'s training config under these overrides (cached), or None where conf/ cannot compose
    them (an experiment of another checkout, a misspelt override, a key this checkout dropped)."""
    if overrides not in _COMPOSED:
        config = None
        if not GlobalHydra.instance().is_initialized():  # inside a Hydra app: its config is not ours to swap
            try:
                with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                    config = compose("train", overrides=list(overrides))
            except Exception as err:  # any composition error means "not known"
                log.debug("conf/ cannot compose %s: %s", overrides, err)
        _COMPOSED[overrides] = config
    return _COMPOSED[overrides]


_COMPOSED: dict[tuple[str, ...], DictConfig | None] = {}


def preset_rate(overrides: tuple[str, ...]) -> float | None:
    """The learning rate conf/ gives a run with these overrides (none of them optimizer.lr): the
    rate of that configuration's fixed-rate runs. None where conf/ cannot compose them."""
    config = composed(overrides)
    return None if config is None else float(config.optimizer.lr)


def changing_overrides(items: tuple[str, ...]) -> int:
    """How many of a configuration's overrides change the config conf/ composes: an override that
    writes out today's default (`estimator.above=mean_field` where that is the default) changes
    nothing and is not counted. Where conf/ cannot compose them, every override counts."""
    full = composed(items)
    if full is None:
        return len(items)
    return sum(composed(items[:i] + items[i + 1:]) != full for i in range(len(items)))


def choose_learning_rates(runs: list[Run], metric: str | None = None) -> list[dict]:
    """The papers' protocol for a learning rate per estimator, from the runs of a grid over
    optimizer.lr: for each configuration (the overrides less the seed and the rate), the rate whose
    finished runs have the lowest mean validation bound. The measure is `metric`, else val/nll_iwae
    where every run logged it, else val/neg_elbo; a test number never chooses (a metric outside val/
    is refused). Each row has the command that trains the chosen rate at the preset's budget with 3
    seeds (the grid's budget keys dropped), `edge` ("smallest", "largest" or None) where the chosen
    rate is at the end of the grid, and `fixed_rate` true where the chosen rate is the one
    conf/ gives that configuration anyway: its fixed-rate runs (docs/results/<experiment>) are then
    already the tuned runs, and `results` puts them in the tuned table."""
    if metric is not None and not str(metric).startswith("val/"):
        raise ConfigError(f"--metric {metric}: a rate is chosen on validation numbers only; use val/neg_elbo or "
                          f"val/nll_iwae")
    runs = [r for r in runs if r.status == FINISHED]
    if not runs:
        raise DataError("no finished run to choose a learning rate from")
    if metric is None:
        metric = "val/nll_iwae" if all(r.metric("val/nll_iwae") is not None for r in runs) else "val/neg_elbo"
    groups: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        rate = override_pairs(run.overrides).get(LR_KEY, "(the config's)")
        rest = sorted(o for o in config_items(run) if _key(o) != LR_KEY)
        groups.setdefault(",".join(rest), {}).setdefault(rate, []).append(run)
    rows = []
    for config, by_rate in sorted(groups.items()):
        scores = {}
        for rate, members in by_rate.items():
            values = [v for r in members if (v := r.metric(metric)) is not None]
            scores[rate] = (statistics.fmean(values) if values else None, len(values))
        scored = {rate: s for rate, (s, _) in scores.items() if s is not None}
        chosen = min(scored, key=scored.get) if scored else None
        keep = [o for o in config.split(",") if o and _key(o) not in BUDGET_KEYS]
        command = (" ".join(["python scripts/train.py -m", *keep, f"{LR_KEY}={chosen}", "seed=1,2,3"])
                   if chosen is not None else None)
        preset = preset_rate(tuple(keep))
        ordered = sorted(scored, key=_rate_order)
        edge = None if chosen is None or len(ordered) < 2 else (
            "smallest" if chosen == ordered[0] else "largest" if chosen == ordered[-1] else None)
        rows.append({"config": config or "all", "metric": metric, "chosen": chosen, "command": command,
                     "preset_config": keep, "preset_rate": preset, "edge": edge,
                     "fixed_rate": chosen is not None and preset is not None and _same_rate(chosen, preset),
                     "rates": {rate: {"mean": s, "runs": n} for rate, (s, n) in scores.items()}})
    return rows


def config_items(run: Run) -> list[str]:
    """The overrides that make a run's configuration, the seed left out: how a grid's configurations
    are grouped, and how the fixed-rate runs of a configuration are found."""
    return [o.lstrip("+") for o in run.naming_overrides() if _key(o) not in ALWAYS_IGNORED]


def _same_rate(rate: str, preset: float) -> bool:
    try:
        return math.isclose(float(rate), preset, rel_tol=1e-9)
    except ValueError:
        return False


def selection_lines(rows: list[dict], title: str | None = None) -> list[str]:
    """The selection as markdown: every configuration's rates with their validation bound, the chosen
    one marked, then the commands for the chosen rates that the fixed-rate runs do not already cover."""
    metric = rows[0]["metric"] if rows else "val/neg_elbo"
    lines = ([f"# Learning rates chosen on validation: `{md_text(title)}`", ""] if title else []) + [
        f"Per configuration, the rate with the lowest mean {metric} over its finished runs (validation "
        f"images only), in nats per image. \"preset's\" marks the rate conf/ gives the configuration, so "
        f"its fixed-rate runs are already the tuned runs.", ""]
    lines += md_head(["configuration", LR_KEY, "runs", metric, "chosen"])
    for row in rows:
        for rate, score in sorted(row["rates"].items(), key=lambda kv: _rate_order(kv[0])):
            notes = ["preset's"] * row["fixed_rate"] + [f"the grid's {row['edge']}"] * bool(row["edge"])
            mark = ("yes" + (f" ({'; '.join(notes)})" if notes else "")) if rate == row["chosen"] else ""
            lines.append(md_row([row["config"], rate, score["runs"], fmt(score["mean"]), mark]))
    if edges := sum(bool(r["edge"]) for r in rows):
        lines += ["", f"{edges} of {len(rows)} chosen rates are at the grid's edge: the best rate may lie "
                      f"beyond it, so a grid extended on that side could choose another."]
    todo = [r["command"] for r in rows if r["command"] and not r["fixed_rate"]]
    lines += ["", "Then, at the preset's budget:", "", "```bash", *todo, "```"] if todo else [
        "", "Every chosen rate is its preset's: the fixed-rate runs are the tuned runs."]
    return lines


def select_learning_rates(root: Path, metric: str | None = None) -> list[dict]:
    """`choose_learning_rates` on the runs under `root` (a sweep or a records folder), written into it
    as selection.md and selection.json."""
    runs = find_runs(root)
    if not any(r.status == FINISHED for r in runs):
        raise DataError(f"{root} holds no finished run to choose a learning rate from")
    rows = choose_learning_rates(runs, metric)
    records.write_atomic(root / SELECTION_FILES[0], "\n".join(selection_lines(rows, root.name)) + "\n")
    records.write_json(root / SELECTION_FILES[1], {"sweep": root.name, "metric": rows[0]["metric"],
                                                   "configurations": rows})
    return rows


def _rate_order(rate: str) -> tuple[int, float, str]:
    try:
        return 0, float(rate), rate
    except ValueError:
        return 1, 0.0, rate


class Paper(NamedTuple):
    """A published table beside one of our experiments: its column title, its numbers (nats), and
    the paper's rows beside each estimator of ours that implements them."""

    column: str
    numbers: dict[str, float]
    rows: dict[str, tuple[str, ...]]


# Jang, Gu & Poole (2017), Table 1: bounds on the test set with m = 1000 samples (their Sec. 4), in
# nats: negative variational lower bounds for the VAEs, -log 1/m sum p(x_lower | h_i) for the SBNs; so
# beside our m = 1000 bound. The VAE presets anneal tau, so our st is the paper's annealed ST as much as
# its ST; the SBN presets keep tau = 1, so there our st is its ST and st_annealed its annealed ST.
JANG_ESTIMATORS = ("SF", "DARN", "MuProp", "ST", "Annealed ST", "Gumbel-S.", "ST Gumbel-S.")
JANG_ROWS = {"sf": ("SF",), "st": ("ST", "Annealed ST"), "gumbel": ("Gumbel-S.",), "st_gumbel": ("ST Gumbel-S.",),
             "muprop": ("MuProp",), "darn": ("DARN",)}
SBN_ROWS = {**JANG_ROWS, "st": ("ST",), "st_annealed": ("Annealed ST",)}
JANG_TABLE1 = {  # Table 1's rows, in the paper's order: (our experiment, the paper's numbers)
    "SBN (Bern.)": ("jang2017_sbn", (72.0, 59.7, 58.9, 58.9, 58.7, 58.5, 59.3)),
    "SBN (Cat.)": ("jang2017_sbn_categorical", (73.1, 67.9, 63.0, 61.8, 61.1, 59.0, 59.7)),
    "VAE (Bern.)": ("jang2017_bernoulli", (112.2, 110.9, 109.7, 116.0, 111.5, 105.0, 111.5)),
    "VAE (Cat.)": ("jang2017", (110.6, 128.8, 107.0, 110.9, 107.8, 101.5, 107.8)),
}
# Yin & Zhou (2019), Table 2, static MNIST, test -log p(x) over 5 seeds. Our sf (an EMA baseline) stands
# beside their REINFORCE; Concrete is our gumbel on bits.
ARM_ROWS = {"arm": ("ARM",), "rebar": ("REBAR",), "gumbel": ("Concrete",), "sf": ("REINFORCE",), "nvil": ("NVIL",)}
PAPERS = {
    **{experiment: Paper("paper, Table 1" if experiment == "jang2017" else f"paper, Table 1 {row}",
                         dict(zip(JANG_ESTIMATORS, numbers)), SBN_ROWS if "sbn" in experiment else JANG_ROWS)
       for row, (experiment, numbers) in JANG_TABLE1.items()},
    "arm2019_linear": Paper("ARM, Table 2", {"ARM": 107.2, "REBAR": 107.7, "Concrete": 107.3, "NVIL": 113.1,
                                             "REINFORCE": 164.0}, ARM_ROWS),
    "arm2019_nonlinear": Paper("ARM, Table 2", {"ARM": 98.4, "REBAR": 101.4, "Concrete": 99.6, "NVIL": 102.2,
                                                "REINFORCE": 114.6}, ARM_ROWS),
    "arm2019_two_layer": Paper("ARM, Table 2", {"ARM": 96.7, "REBAR": 95.4, "Concrete": 95.6, "NVIL": 99.8,
                                                "REINFORCE": 159.2}, ARM_ROWS),
}


TUNED = "_tuned"  # records/<experiment>_tuned: the runs at each estimator's rate chosen on validation
GRID = "_lr"  # records/<experiment>_lr: the learning-rate grid (reduced budget) that chose those rates


def fixed_rate_runs(chosen: list[dict], runs: list[Run]) -> list[Run]:
    """The fixed-rate runs of an experiment that are its tuned runs too: those of each configuration
    whose chosen rate is the one conf/ gave them (`fixed_rate`), as copies named with that rate, so that
    the tuned table has them without training them again."""
    stand_in = []
    for row in chosen:
        if not row["fixed_rate"]:
            continue
        config = set(row["preset_config"])
        for run in runs:
            if set(config_items(run)) == config:
                stand_in.append(replace(run, overrides=[*run.overrides, f"{LR_KEY}={row['chosen']}"], config=""))
    return stand_in


def paper_of(folder: str) -> str | None:
    """The experiment of PAPERS whose numbers go beside a records folder: its own name, or for
    `<experiment>_tuned` (the full-budget runs at the learning rates `select` chose) the experiment's."""
    base = folder[: -len(TUNED)] if folder.endswith(TUNED) else folder
    return base if base in PAPERS else None


def _paper(estimator: str, experiment: str = "jang2017") -> str:
    paper = PAPERS.get(experiment)
    names = paper.rows.get(estimator, ()) if paper else ()
    return "; ".join(f"{paper.numbers[n]:.1f} ({n})" for n in names) or "—"


def results_table(runs: list[Run], rows: list[dict], paper: str | None, exact: bool) -> list[str]:
    """One markdown row per configuration: the bounds over seeds (mean ± s.d.), n, budget, time;
    `paper` names the experiment of PAPERS whose numbers go beside them."""
    head = ["estimator", "seeds", "test −ELBO", "test bound (IWAE)", "m"]
    if paper:
        head.append(PAPERS[paper].column)
    if exact:
        head.append("test NLL (exact)")
    head += ["final val −ELBO", "steps", "min/run"]
    lines = md_head(head)
    for row in rows:
        done = [r for r in runs if r.config == row["config"] and r.status == FINISHED]
        iwae = [v for r in done if (v := r.metric("eval/nll_iwae")) is not None]
        ms = sorted({r.evaluation.get("num_samples") for r in done if r.metric("eval/nll_iwae") is not None})
        if not iwae:  # no scripts/evaluate.py result: the bound of trainer.test
            iwae = [v for r in done if (v := r.metric("test/nll_iwae")) is not None]
            ms = ["test_iwae_samples"] if iwae else []
        cells = [row["config"], f"{len(done)}" + (f" (+{row['n_diverged']} diverged)" if row["n_diverged"] else ""),
                 fmt(row["test/neg_elbo_mean"], row["test/neg_elbo_std"]),
                 fmt(*mean_std(iwae)) + (f" (n={len(iwae)})" if len(iwae) != len(done) else ""),
                 ",".join(map(str, ms)) or "—"]  # fmt: skip
        if paper:
            cells.append(_paper(row["estimator"], paper))
        if exact:
            cells.append(fmt(*mean_std([v for r in done if (v := r.metric("eval/nll_exact")) is not None])))
        cells += [fmt(row["val/neg_elbo_mean"], row["val/neg_elbo_std"]), fmt(row["steps_mean"], digits=0),
                  fmt(row["wall_time_min_mean"], digits=1)]  # fmt: skip
        lines.append(md_row(cells))
    return lines


def provenance(runs: list[Run]) -> list[str]:
    """Where and with what the runs were made: machines, commits, wall time in total."""
    finished = [r for r in runs if r.status in DONE]
    machines = sorted({_machine(r.record.get("machine")) for r in finished})
    commits = sorted({str(r.record.get("commit")) for r in finished if r.record.get("commit")})
    hours = sum(r.record.get("wall_time_s") or 0 for r in finished) / 3600
    evaluation = sum(r.evaluation.get("wall_time_s") or 0 for r in finished) / 3600
    lines = [md_text(f"{len(finished)} runs, {fmt(hours, digits=1)} h of training and testing in all"
                     + (f" plus {fmt(evaluation, digits=1)} h of scripts/evaluate.py" if evaluation else "") + "; "
                     + "machines: " + ("; ".join(machines) or "not recorded") + "; "
                     + "commits: " + (", ".join(f"`{c}`" for c in commits) or "not recorded") + ".")]
    others = [r for r in runs if r.status not in DONE]
    for run in others:
        lines.append(md_text(f"- {run.path.name}: {run.status} ({run.record.get('error') or UNFINISHED_WHY})"))
    return lines


def _machine(machine: dict | str | None) -> str:
    if not machine:
        return "not recorded"
    if isinstance(machine, str):
        return machine
    device = machine.get("gpu") or machine.get("cpu") or "?"
    threads = machine.get("threads")
    return f"{device}" + (f", {threads} torch thread(s)" if threads else "") + (
        f", torch {machine['torch']}" if machine.get("torch") else "")


BLOCK = re.compile(r"(<!-- report:(?P<name>[\w.-]+) -->\n).*?(<!-- /report:(?P=name) -->)", re.S)


def summary_table(experiments: dict[str, list[Run]]) -> list[str]:
    """One row per estimator: its headline numbers on each experiment (the README's table)."""
    names = list(experiments)
    estimators = sorted({r.estimator for runs in experiments.values() for r in runs if r.status == FINISHED})

    def cell(name: str, estimator: str) -> str:
        finished = [r for r in experiments[name] if r.status == FINISHED]
        done = headline_runs(finished, estimator)
        if not done:
            return "—"
        budget = f", {other}" if (other := other_budget(finished, done)) else ""
        key = "eval/nll_exact" if any(r.metric("eval/nll_exact") is not None for r in done) else (
            "eval/nll_iwae" if any(r.metric("eval/nll_iwae") is not None for r in done) else "test/neg_elbo")
        values = [v for r in done if (v := r.metric(key)) is not None]
        label = {"eval/nll_exact": "exact NLL", "eval/nll_iwae": "IWAE", "test/neg_elbo": "−ELBO"}[key]
        return f"{fmt(*mean_std(values), digits=1)} ({label}, n={len(values)}{budget})"

    head = ["estimator", *names] + (["paper, Table 1"] if "jang2017" in names else [])
    lines = md_head(head)
    for estimator in estimators:
        cells = [estimator, *(cell(name, estimator) for name in names)]
        if "jang2017" in names:
            cells.append(_paper(estimator))
        lines.append(md_row(cells))
    return lines


def other_budget(finished: list[Run], done: list[Run]) -> str:
    """"N steps" when the runs `done` trained for another budget than most of the experiment's
    `finished` runs (a reduced or a longer one, to be stated beside their number), else ""."""
    if not done:
        return ""
    steps = Counter(r.record.get("steps") for r in finished).most_common(1)[0][0]  # the experiment's budget
    own = sorted({r.record.get("steps") or 0 for r in done})
    return "" if own == [steps] else f"{' / '.join(f'{n:,}' for n in own)} steps"


def headline_runs(finished: list[Run], estimator: str) -> list[Run]:
    """The finished runs that stand for an estimator in an experiment: one configuration, never an
    average over several: the longest-trained, then the one with the most seeds, then the one with
    the fewest overrides that change conf/'s config (the preset's own over a variant of it, such as
    another learning rate; an override that writes out today's default counts as none), then the
    fewest overrides, then the first by name (sorted: the same on every rebuild). Empty when it has none."""
    members = {}
    for r in finished:
        if r.estimator == estimator:
            members.setdefault(r.config, []).append(r)
    if not members:
        return []
    def budget(config: str) -> tuple[int, int]:
        return max(r.record.get("steps") or 0 for r in members[config]), len(members[config])

    top = max(budget(c) for c in members)
    tied = sorted(c for c in members if budget(c) == top)  # composing conf/ only where the budget ties
    def presetness(config: str) -> tuple[int, int]:
        items = min((tuple(config_items(r)) for r in members[config]), key=len)  # counted, not commas: a list value has some
        return -changing_overrides(items), -len(items)

    best = max(tied, key=presetness) if len(tied) > 1 else tied[0]
    return members[best]


def headline(runs: list[Run], estimator: str) -> tuple[float | None, str, str]:
    """(mean, mark, budget) of an estimator's bound in an experiment (`headline_runs`): the m = 1000
    evaluation where its runs have one, else trainer.test's bound, marked †; budget is "N steps"
    where its runs trained for another budget than the experiment's (`other_budget`), else ""."""
    finished = [r for r in runs if r.status == FINISHED]
    done = headline_runs(finished, estimator)
    for key, mark in (("eval/nll_iwae", ""), ("test/nll_iwae", "†")):
        values = [v for r in done if (v := r.metric(key)) is not None]
        if values:
            return statistics.fmean(values), mark, other_budget(finished, done)
    return None, "", ""


def jang_table1(experiments: dict[str, list[Run]]) -> list[str]:
    """Jang et al. (2017)'s Table 1, its four rows, with ours beside theirs: "ours / theirs" per
    estimator (mean over seeds of the m = 1000 bound; † where only trainer.test's smaller-m bound
    exists yet; the budget where it is not the preset's), and our best estimator of any kind in the row."""
    head = ["model", *JANG_ESTIMATORS, "our best (any estimator)"]
    lines = md_head(head)
    for row, (experiment, numbers) in JANG_TABLE1.items():
        runs = experiments.get(experiment, [])
        ours = {paper: estimator for estimator, names in PAPERS[experiment].rows.items() for paper in names}
        cells = [f"{row} `{experiment}`"]
        for paper, theirs in zip(JANG_ESTIMATORS, numbers):
            mean, mark, budget = headline(runs, ours[paper]) if paper in ours else (None, "", "")
            cells.append(f"{fmt(mean, digits=1)}{mark}{f' ({budget})' if budget else ''} / {theirs:.1f}")
        scored = [(m, e, mark, budget) for e in sorted({r.estimator for r in runs})
                  for m, mark, budget in [headline(runs, e)] if m is not None]
        if scored:
            mean, estimator, mark, budget = min(scored)
            cells.append(f"{mean:.1f}{mark} (`{estimator}`{f', {budget}' if budget else ''})")
        else:
            cells.append("—")
        lines.append(md_row(cells))
    return lines


def results(records_root: Path, markdowns: list[Path]) -> dict[str, list[dict]]:
    """Rebuild the generated parts of each markdown file (the blocks between <!-- report:NAME -->
    and <!-- /report:NAME -->) and the plots beside the records, from records_root/<experiment>/.

    Blocks: <experiment>-table (with the paper's numbers for the experiments of PAPERS, nll_exact where the
    records have it), <experiment>-provenance, and summary (one row per estimator, its headline
    number on each experiment: exact NLL, else the evaluated IWAE bound, else test −ELBO). A
    learning-rate grid, <experiment>_lr/, gets <experiment>_lr-selection (the rates chosen on
    validation) and its provenance instead, and no table, plot or summary column (its budget is a
    reduced one); its configurations whose chosen rate is the preset's bring their fixed-rate runs of
    <experiment>/ into <experiment>_tuned-table. Plots: records_root/<experiment>_val_neg_elbo.png
    and <experiment>_test_nll.png. Text outside the blocks is left as it is."""
    if not records_root.is_dir():
        raise DataError(f"{records_root} is not a directory of run records (docs/results)")
    folders = {p.name: runs for p in sorted(records_root.iterdir()) if p.is_dir() and (runs := find_runs(p))}
    blocks, summary, experiments = {}, {}, {}
    tables = {name: runs for name, runs in folders.items() if not name.endswith(GRID)}
    for name, grid in folders.items():
        if not name.endswith(GRID) or not any(r.status == FINISHED for r in grid):
            continue
        chosen = choose_learning_rates(grid)
        blocks[f"{name}-selection"] = selection_lines(chosen)
        blocks[f"{name}-provenance"] = provenance(grid)
        experiment = name[: -len(GRID)]
        if stand_in := fixed_rate_runs(chosen, folders.get(experiment, [])):
            tables[experiment + TUNED] = tables.get(experiment + TUNED, []) + stand_in
    for name, runs in sorted(tables.items()):
        name_configs(runs, always=("estimator", LR_KEY) if name.endswith(TUNED) else ())
        rows = summarise(runs)
        exact = any(r.metric("eval/nll_exact") is not None for r in runs)
        blocks[f"{name}-table"] = results_table(runs, rows, paper=paper_of(name), exact=exact)
        blocks[f"{name}-provenance"] = provenance(runs)
        plot_curves(records_root / f"{name}_val_neg_elbo.png", runs, rows)
        plot_test(records_root / f"{name}_test_nll.png", runs, rows)
        summary[name], experiments[name] = rows, runs
    blocks["summary"] = summary_table(experiments)
    blocks["jang2017-table1"] = jang_table1(experiments)

    def fill(match: re.Match) -> str:
        lines = blocks.get(match["name"])
        return match[0] if lines is None else match[1] + "\n".join(lines) + "\n" + match[3]

    for markdown in markdowns:
        if markdown.is_dir():
            raise DataError(f"--markdown {markdown} is a folder; give the markdown files to rebuild")
        text = markdown.read_text() if markdown.is_file() else ""
        records.write_atomic(markdown, BLOCK.sub(fill, text))
    return summary
