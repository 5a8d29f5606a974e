"""scripts/report.py on a synthetic multirun folder, and the failed-run metrics.json of train.py.

The synthetic sweep has two estimators x three seeds with known numbers and val curves
(TensorBoard event files), one run that failed and one that never finished, so the
table's means, standard deviations and seed counts can be checked exactly.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import statistics
import subprocess
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from conftest import REPO, error_of, load_script, train_in

REPORT = REPO / "scripts" / "report.py"
COMMON = ["experiment=jang2017", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
TEST_NEG_ELBO = {"sf": [120.0, 122.0, 127.0], "gumbel": [105.0, 106.0, 110.0]}


def _job(root, estimator: str, seed: int, record: dict | None, curve: list[float] | None = None, extra=()):
    folder = root / ",".join([f"estimator={estimator},seed={seed}", *extra])
    (folder / ".hydra").mkdir(parents=True)
    overrides = [*COMMON[:1], f"seed={seed}", f"estimator={estimator}", *COMMON[1:], *extra]
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / ".hydra" / "hydra.yaml").write_text(  # as conf/train.yaml: paths and resources do not name a run
        "hydra:\n  job:\n    config:\n      override_dirname:\n        exclude_keys: [data.root, trainer.enable_progress_bar]\n")
    if record is not None:
        (folder / "metrics.json").write_text(json.dumps({"estimator": estimator, "overrides": overrides,
                                                         "seed": seed, **record}))  # fmt: skip
    if curve:
        writer = SummaryWriter(str(folder))
        for i, value in enumerate(curve):
            writer.add_scalar("val/neg_elbo", value, global_step=100 * (i + 1) - 1)
        writer.close()
    return folder


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    for estimator, values in TEST_NEG_ELBO.items():
        for seed, test in enumerate(values, start=1):
            metrics = {"val/neg_elbo": test + 1.0, "test/neg_elbo": test, "test/nll_iwae": test - 5.0}
            record = {"steps": 1000, "wall_time_s": 60.0 * seed, "metrics": metrics, "status": "finished"}
            curve = [200.0 - 10 * i + seed for i in range(10)]  # falls 10 per evaluation, 20 over the last 20%
            _job(root, estimator, seed, record, curve)
    _job(root, "exact", 1, {"metrics": {}, "status": "failed", "error": "ConfigError: K^N is over budget"})
    _job(root, "rloo", 1, None, [210.0, 190.0])  # killed: curves but no metrics.json
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def _run(script, *args, cwd):
    """scripts/report.py's main in this process (its exit status, stdout and stderr), from `cwd`."""
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            returncode = load_script(Path(script).stem).main([str(a) for a in args])
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess([script, *args], returncode, out.getvalue(), err.getvalue())


def test_report_table_csv_and_plots(sweep):
    result = _run(REPORT, sweep, cwd=sweep.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["config"]: row for row in csv.DictReader((sweep / "report.csv").open())}
    assert set(rows) == {"sf", "gumbel", "exact", "rloo"}  # one row per estimator, failures included
    for estimator, values in TEST_NEG_ELBO.items():
        row = rows[estimator]
        assert int(row["n_seeds"]) == 3 and row["seeds"] == "1 2 3"
        assert float(row["test/neg_elbo_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["test/neg_elbo_std"]) == pytest.approx(statistics.stdev(values))  # n - 1
        assert float(row["test/nll_iwae_mean"]) == pytest.approx(statistics.fmean(values) - 5.0)
        assert float(row["wall_time_min_mean"]) == pytest.approx(2.0)
        assert float(row["val_drop_last20_mean"]) == pytest.approx(20.0)
    assert (rows["exact"]["n_seeds"], rows["exact"]["n_failed"], rows["exact"]["n_unfinished"]) == ("0", "1", "0")
    assert (rows["rloo"]["n_seeds"], rows["rloo"]["n_failed"], rows["rloo"]["n_unfinished"]) == ("0", "0", "1")

    table = (sweep / "report.md").read_text()
    assert "| gumbel | 3 | 108.00 ± 2.65 | 107.00 ± 2.65 | 102.00 ± 2.65 |" in table
    assert table.index("| gumbel |") < table.index("| sf |")  # best test/neg_elbo first
    assert "**failed**" in table and "ConfigError: K^N is over budget" in table
    assert "**unfinished**" in table and "last val/neg_elbo 190.00 at step 199" in table
    assert "8 runs: 6 finished, 1 failed, 0 diverged, 1 did not finish" in table
    for name in ("val_neg_elbo.png", "test_nll.png"):
        png = (sweep / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 200_000


def test_report_refuses_a_folder_without_runs(tmp_path):
    result = _run(REPORT, tmp_path, cwd=tmp_path)
    assert result.returncode != 0 and "no runs under" in result.stderr


def test_failed_training_run_writes_metrics_json_that_report_lists(tmp_path, monkeypatch):
    """Training refuses estimator=exact on the 20x10 model; its metrics.json says so, and the report
    lists it (both in this process)."""
    run_dir = tmp_path / "sweep" / "estimator=exact"
    assert "max_configs" in error_of(lambda: train_in(run_dir, monkeypatch, "experiment=jang2017", "estimator=exact",
                                                      quick=False))
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "failed" and record["estimator"] == "exact" and "ConfigError" in record["error"]
    assert "estimator=exact" in record["overrides"]
    assert load_script("report").main([str(tmp_path / "sweep")]) == 0
    assert "**failed**" in (tmp_path / "sweep" / "report.md").read_text()


def test_export_writes_compact_records_without_machine_paths(sweep, tmp_path):
    gumbel1 = sweep / "estimator=gumbel,seed=1"
    record = json.loads((gumbel1 / "metrics.json").read_text())
    best = gumbel1 / "checkpoints" / "best-step999.ckpt"
    best.parent.mkdir()
    record["best_checkpoint"] = str(best)
    (gumbel1 / "metrics.json").write_text(json.dumps(record))
    evaluation = {"checkpoint": str(best), "split": "test", "num_samples": 1000, "wall_time_s": 30.0,
                  "metrics": {"neg_elbo": 104.0, "nll_iwae": 99.5, "nll_exact": None}}
    (best.parent / "best-step999_eval_test.json").write_text(json.dumps(evaluation))

    records = tmp_path / "docs" / "results" / "jang2017"
    result = _run(REPORT, "export", sweep, records, "--machine", "test machine", "--commit", "abc1234", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted(p.name for p in records.iterdir())
    assert folders == [f"estimator={e},seed={s}" for e in ("gumbel", "sf") for s in (1, 2, 3)]  # finished only
    for folder in records.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "val_curve.csv"]
        for file in folder.iterdir():
            assert str(tmp_path) not in file.read_text() and file.stat().st_size < 5_000
    exported = json.loads((records / "estimator=gumbel,seed=1" / "metrics.json").read_text())
    assert exported["evaluation"]["metrics"]["nll_iwae"] == 99.5
    assert exported["evaluation"]["checkpoint"] == exported["best_checkpoint_name"] == "best-step999.ckpt"
    assert (exported["machine"], exported["commit"]) == ("test machine", "abc1234")
    assert exported["overrides"] == ["experiment=jang2017", "seed=1", "estimator=gumbel", "trainer.max_epochs=2"]
    curve = (records / "estimator=gumbel,seed=1" / "val_curve.csv").read_text().splitlines()
    assert curve[0] == "step,val/neg_elbo" and curve[1] == "99,201.0000" and len(curve) == 11


def test_results_page_is_rebuilt_from_the_records_alone(sweep, tmp_path):
    records = tmp_path / "docs" / "results" / "jang2017"
    assert _run(REPORT, "export", sweep, records, cwd=tmp_path).returncode == 0
    for run in sweep.glob("estimator=*"):  # nothing of the sweep is left: only the records
        for file in sorted(run.rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
    markdown = tmp_path / "docs" / "results.md"
    markdown.write_text("# Results\n\nprose before\n<!-- report:jang2017-table -->\nold table\n"
                        "<!-- /report:jang2017-table -->\nprose after\n<!-- report:jang2017-provenance -->\n"
                        "<!-- /report:jang2017-provenance -->\n")  # fmt: skip
    markdown.write_text(markdown.read_text() + "<!-- report:jang2017-table1 -->\n<!-- /report:jang2017-table1 -->\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report:summary -->\n<!-- /report:summary -->\nrest\n")
    result = _run(REPORT, "results", tmp_path / "docs" / "results", "--markdown", markdown, readme, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    text = markdown.read_text()
    assert "old table" not in text and "prose before" in text and "prose after" in text
    def row(name):
        lines = text.splitlines()
        header = [c.strip() for c in next(line for line in lines if line.startswith("| estimator |")).strip("|").split("|")]
        cells = [c.strip() for c in next(line for line in lines if line.startswith(f"| {name} |")).strip("|").split("|")]
        return dict(zip(header, cells))

    gumbel = row("gumbel")
    assert (gumbel["seeds"], gumbel["test −ELBO"], gumbel["test bound (IWAE)"]) == ("3", "107.00 ± 2.65", "102.00 ± 2.65")
    assert gumbel["paper, Table 1"] == "101.5 (Gumbel-S.)"  # the paper's Table 1 beside it
    assert row("sf")["paper, Table 1"] == "110.6 (SF)" and row("sf")["steps"] == "1000"
    assert "6 runs, 0.2 h of training" in text
    # Jang et al.'s Table 1, ours beside theirs: the VAE (Cat.) row from these records, the others empty
    table1 = [line for line in text.splitlines() if line.startswith("| VAE (Cat.) `jang2017` |")]
    assert len(table1) == 1 and "/ 101.5 |" in table1[0] and "— / 128.8 |" in table1[0]  # DARN: none here
    assert "| SBN (Bern.) `jang2017_sbn` | — / 72.0 |" in text
    summary = readme.read_text().splitlines()
    assert summary[0] == "intro" and summary[-1] == "rest"
    assert "| gumbel | 107.0 ± 2.6 (−ELBO, n=3) | 101.5 (Gumbel-S.) |" in summary
    for name in ("jang2017_val_neg_elbo.png", "jang2017_test_nll.png"):
        png = (tmp_path / "docs" / "results" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _record(folder: Path, estimator: str, seed: int, value: float, *extra: str, steps: int = 1000) -> None:
    """A committed record (report.py export's form) with validation and evaluated test numbers."""
    folder.mkdir(parents=True)
    overrides = ["experiment=jang2017", f"seed={seed}", f"estimator={estimator}", *extra]
    metrics = {"val/neg_elbo": value + seed, "test/neg_elbo": value + seed + 0.5}
    (folder / "metrics.json").write_text(json.dumps({
        "estimator": estimator, "overrides": overrides, "seed": seed, "steps": steps, "wall_time_s": 60.0,
        "status": "finished", "metrics": metrics, "commit": "abc1234",
        "evaluation": {"num_samples": 1000, "metrics": {"nll_iwae": value + seed - 10.0}}}))


def test_a_learning_rate_grid_chooses_the_tuned_rows_and_reuses_the_fixed_rate_runs(tmp_path):
    """docs/results/<experiment>_lr (a grid at a reduced budget) is shown as its selection, not as a
    table or a summary column; where the chosen rate is the preset's own, the fixed-rate runs stand in
    the tuned table (named with the rate) beside the runs trained at the other chosen rates."""
    root = tmp_path / "results"
    for seed in (1, 2, 3):
        _record(root / "jang2017" / f"sf,seed={seed}", "sf", seed, 130.0)
        _record(root / "jang2017" / f"st,seed={seed}", "st", seed, 120.0)
        _record(root / "jang2017_tuned" / f"sf,seed={seed},lr", "sf", seed, 125.0, "optimizer.lr=3e-4")
    grid = {("sf", "3e-4"): 140.0, ("sf", "1e-3"): 142.0, ("st", "3e-4"): 139.0, ("st", "1e-3"): 135.0}
    for (estimator, rate), value in grid.items():  # the test numbers would choose otherwise: they are not read
        _record(root / "jang2017_lr" / f"{estimator},{rate}", estimator, 1, value, f"optimizer.lr={rate}",
                "trainer.max_steps=200", steps=200)
    markdown = tmp_path / "results.md"
    markdown.write_text("".join(f"<!-- report:{name} -->\n<!-- /report:{name} -->\n" for name in (
        "jang2017_tuned-table", "jang2017_lr-selection", "jang2017_lr-table", "summary")))
    result = _run(REPORT, "results", root, "--markdown", markdown, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    text = markdown.read_text()
    tuned = {line.split("|")[1].strip(): line for line in text.split("<!-- /report:jang2017_tuned-table")[0]
             .splitlines() if line.startswith("| estimator=")}
    assert set(tuned) == {"estimator=sf,optimizer.lr=3e-4", "estimator=st,optimizer.lr=1e-3"}, tuned
    assert "| 112.00 ± 1.00 |" in tuned["estimator=st,optimizer.lr=1e-3"]  # the fixed-rate st runs' bound
    assert "| 117.00 ± 1.00 |" in tuned["estimator=sf,optimizer.lr=3e-4"]  # the tuned sf runs'
    selection = text.split("<!-- report:jang2017_lr-selection -->")[1].split("<!-- /report")[0]
    assert "| estimator=st,experiment=jang2017,trainer.max_steps=200 | 1e-3 | 1 | 136.00 | yes (preset's; the grid's largest) |" in selection
    assert "| estimator=sf,experiment=jang2017,trainer.max_steps=200 | 3e-4 | 1 | 141.00 | yes (the grid's smallest) |" in selection
    assert "python scripts/train.py -m estimator=sf experiment=jang2017 optimizer.lr=3e-4 seed=1,2,3" in selection
    assert "<!-- report:jang2017_lr-table -->\n<!-- /report:jang2017_lr-table -->" in text  # no table of the grid
    summary = text.split("<!-- report:summary -->")[1]
    assert "jang2017_tuned" in summary and "jang2017_lr" not in summary
    assert not (root / "jang2017_lr_val_neg_elbo.png").exists() and (root / "jang2017_tuned_test_nll.png").exists()
    # a tuned table of one estimator still names its row with the estimator and the rate
    for folder in (root / "jang2017_tuned").iterdir():
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    assert _run(REPORT, "results", root, "--markdown", markdown, cwd=tmp_path).returncode == 0
    tuned = markdown.read_text().split("<!-- /report:jang2017_tuned-table")[0].splitlines()
    assert [line.split("|")[1].strip() for line in tuned if line.startswith("| estimator=")] == [
        "estimator=st,optimizer.lr=1e-3"]


def test_results_refuses_a_missing_records_folder(tmp_path):
    result = _run(REPORT, "results", tmp_path / "nowhere", "--markdown", tmp_path / "r.md", cwd=tmp_path)
    assert result.returncode == 1 and "not a directory of run records" in result.stderr


def test_committed_results_name_no_machine_paths():
    """docs/ and its run records are read on other machines: no absolute paths of the one that made them."""
    pattern = re.compile(r"(/work/|/root/|/home/|/Users/|/tmp/|[A-Z]:\\\\)")
    files = [p for p in (REPO / "docs").rglob("*") if p.suffix in (".md", ".json", ".csv")]
    assert files, "docs/ has its results page"
    for path in files:
        match = pattern.search(path.read_text())
        assert match is None, f"{path.relative_to(REPO)} names {match[0]!r}"


def test_summary_keeps_configurations_apart_and_states_a_reduced_budget(sweep, tmp_path):
    def finished(test, steps):
        return {"steps": steps, "wall_time_s": 60.0, "status": "finished",
                "metrics": {"val/neg_elbo": test, "test/neg_elbo": test, "test/nll_iwae": test - 5.0}}

    _job(sweep, "gumbel", 1, finished(150.0, 200), extra=["optimizer.lr=1e-4", "trainer.max_epochs=1"])
    _job(sweep, "indecater", 1, finished(130.0, 200), extra=["trainer.max_epochs=1"])
    _job(sweep, "st", 1, finished(90.0, 4000), extra=["trainer.max_epochs=8"])  # a longer budget
    records = tmp_path / "docs" / "results" / "jang2017"
    assert _run(REPORT, "export", sweep, records, cwd=tmp_path).returncode == 0
    readme = tmp_path / "README.md"
    readme.write_text("<!-- report:summary -->\n<!-- /report:summary -->\n"
                      "<!-- report:jang2017-table1 -->\n<!-- /report:jang2017-table1 -->\n")
    result = _run(REPORT, "results", tmp_path / "docs" / "results", "--markdown", readme, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = readme.read_text()
    # the full-budget gumbel runs alone, not averaged with the short run of another learning rate
    assert "| gumbel | 107.0 ± 2.6 (−ELBO, n=3) |" in summary
    assert "| indecater | 130.0 (−ELBO, n=1, 200 steps) |" in summary
    assert "| st | 90.0 (−ELBO, n=1, 4,000 steps) |" in summary
    # Jang et al.'s Table 1 states a budget other than the preset's, in its cell and as our best
    table1 = next(line for line in summary.splitlines() if line.startswith("| VAE (Cat.) `jang2017` |"))
    assert "| 85.0† (4,000 steps) / 110.9 | 85.0† (4,000 steps) / 107.8 |" in table1  # ST and Annealed ST
    assert "| 102.0† / 101.5 |" in table1  # gumbel at the preset's budget: no label
    assert table1.endswith("| 85.0† (`st`, 4,000 steps) |")


def test_the_presets_configuration_stands_for_its_estimator_over_a_variant_at_the_same_budget(tmp_path):
    """Table 1 and the summary show an estimator's preset configuration, not a variant of it (another
    rate, another option) that has as many steps and seeds, whichever sorts first by name."""
    records = tmp_path / "results"
    for seed in (1, 2, 3):
        _record(records / "jang2017" / f"sf{seed}", "sf", seed, 120.0, steps=50000)
        _record(records / "jang2017" / f"sf_lr{seed}", "sf", seed, 100.0, "optimizer.lr=0.0003", steps=50000)
        _record(records / "jang2017" / f"mp{seed}", "muprop", seed, 110.0, steps=50000)
        _record(records / "jang2017" / f"mp_mf{seed}", "muprop", seed, 90.0, "estimator.above=mean_field",
                steps=50000)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- report:summary -->\n<!-- /report:summary -->\n"
                      "<!-- report:jang2017-table1 -->\n<!-- /report:jang2017-table1 -->\n")
    result = _run(REPORT, "results", records, "--markdown", readme, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    text = readme.read_text()
    assert "| sf | 112.0 ± 1.0 (IWAE, n=3) |" in text and "| muprop | 102.0 ± 1.0 (IWAE, n=3) |" in text
    table1 = next(line for line in text.splitlines() if line.startswith("| VAE (Cat.) `jang2017` |"))
    assert table1.startswith("| VAE (Cat.) `jang2017` | 112.0 / 110.6 | — / 128.8 | 102.0 / 107.0 |")


def test_an_override_that_writes_out_the_default_counts_as_the_presets_configuration(tmp_path):
    """Runs that name today's default explicitly (kept from when it was not the default, or typed out)
    are the preset's configuration: they stand for their estimator over a variant with as many
    overrides, steps and seeds that sorts first by name."""
    from discrete_vae.report import changing_overrides, preset_rate

    rate = preset_rate(("experiment=jang2017", "estimator=st"))
    other = rate * 0.3
    assert f"optimizer.lr={other}" < f"optimizer.lr={rate}"  # the variant sorts first
    base = ("experiment=jang2017", "estimator=st")
    assert changing_overrides((*base, f"optimizer.lr={rate}")) == 2
    assert changing_overrides((*base, f"optimizer.lr={other}")) == 3
    assert changing_overrides(("experiment=no_such_experiment", "estimator=st")) == 2  # unknown: all count
    records = tmp_path / "results"
    for seed in (1, 2, 3):
        _record(records / "jang2017" / f"a{seed}", "st", seed, 100.0, f"optimizer.lr={other}", steps=50000)
        _record(records / "jang2017" / f"b{seed}", "st", seed, 120.0, f"optimizer.lr={rate}", steps=50000)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- report:summary -->\n<!-- /report:summary -->\n")
    result = _run(REPORT, "results", records, "--markdown", readme, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| st | 112.0 ± 1.0 (IWAE, n=3) |" in readme.read_text()


def test_the_tuned_runs_table_has_its_experiments_paper_column():
    from discrete_vae import report

    assert report.paper_of("jang2017_sbn_tuned") == "jang2017_sbn" and report.paper_of("jang2017") == "jang2017"
    assert report.paper_of("small_exact_tuned") is None and report.paper_of("jang2017_lr") is None


def test_each_papers_numbers_go_beside_its_own_experiment():
    """The Bernoulli tables get their own papers' numbers: Jang et al.'s "VAE (Bern.)" row and ARM's Table 2."""
    from discrete_vae.report import PAPERS, _paper

    assert _paper("gumbel", "jang2017") == "101.5 (Gumbel-S.)"
    assert _paper("gumbel", "jang2017_bernoulli") == "105.0 (Gumbel-S.)"
    assert _paper("st", "jang2017_bernoulli") == "116.0 (ST); 111.5 (Annealed ST)"
    # the SBN presets hold tau at 1: there st is the paper's ST, and st_annealed its Annealed ST
    assert _paper("st", "jang2017_sbn") == "58.9 (ST)" and _paper("st_annealed", "jang2017_sbn") == "58.7 (Annealed ST)"
    assert _paper("st_annealed", "jang2017_sbn_categorical") == "61.1 (Annealed ST)"
    assert _paper("muprop", "jang2017") == "107.0 (MuProp)" and _paper("nvil", "arm2019_linear") == "113.1 (NVIL)"
    assert _paper("sf", "arm2019_linear") == "164.0 (REINFORCE)"
    assert _paper("arm", "arm2019_linear") == "107.2 (ARM)" and _paper("arm", "arm2019_nonlinear") == "98.4 (ARM)"
    assert _paper("gumbel", "arm2019_nonlinear") == "99.6 (Concrete)"
    assert _paper("disarm", "arm2019_linear") == "—" and _paper("gumbel", "small_exact") == "—"
    assert PAPERS["arm2019_linear"].column == "ARM, Table 2"


def test_a_run_that_validated_once_is_a_point_on_the_validation_plot(tmp_path, monkeypatch):
    from discrete_vae import report

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig))
    runs = [report.Run(tmp_path / "a", ["estimator=sf"], report.FINISHED, curve=[(500, 180.0)], config="sf"),
            report.Run(tmp_path / "b", ["estimator=st"], report.FINISHED, curve=[(500, 190.0), (1000, 170.0)],
                       config="st")]
    report.plot_curves(tmp_path / "val.png", runs, [{"config": "sf"}, {"config": "st"}])
    once, twice = figures[0].axes[0].get_lines()
    assert once.get_marker() == "o" and list(once.get_xdata()) == [500]
    assert twice.get_marker() in ("None", None, "") and list(twice.get_xdata()) == [500, 1000]


def test_report_groups_runs_as_their_folders_are_named(tmp_path):
    """report.py groups by the rule that names sweep folders (conf/train.yaml): the training budget
    names a run, so two budgets are two rows; a quick-check limit does not, so it splits no row."""
    import yaml

    exclude = yaml.safe_load((REPO / "conf" / "train.yaml").read_text())["hydra"]["job"]["config"]
    exclude = exclude["override_dirname"]["exclude_keys"]
    assert "trainer.limit_train_batches" in exclude and "trainer.max_steps" not in exclude
    root = tmp_path / "multirun"
    runs = [(1, "trainer.max_steps=100", "trainer.limit_train_batches=5"), (2, "trainer.max_steps=100", None),
            (1, "trainer.max_steps=200", None), (2, "trainer.max_steps=200", None)]
    for seed, budget, limit in runs:
        folder = _job(root, "gumbel", seed, {"steps": int(budget.split("=")[1]), "wall_time_s": 1.0, "status": "finished",
                                             "metrics": {"val/neg_elbo": 100.0, "test/neg_elbo": 99.0}},
                      extra=[budget, *([limit] if limit else [])])
        (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"job": {"config": {"override_dirname": {"exclude_keys": exclude}}}}}))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    result = _run(REPORT, root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["config"]: row for row in csv.DictReader((root / "report.csv").open())}
    assert set(rows) == {"trainer.max_steps=100", "trainer.max_steps=200"}, set(rows)
    assert rows["trainer.max_steps=100"]["n_seeds"] == rows["trainer.max_steps=200"]["n_seeds"] == "2"


def test_select_chooses_each_estimators_rate_on_validation_never_on_test(tmp_path):
    """A grid over optimizer.lr at a reduced budget: per estimator, the rate with the lowest mean
    validation bound is chosen, though the test numbers would pick another; the command for the chosen
    rate drops the grid's budget; a test metric is refused."""
    import yaml

    root = tmp_path / "grid"
    val = {("sf", "3e-4"): 110.0, ("sf", "1e-3"): 112.0, ("sf", "3e-3"): 115.0,
           ("st", "3e-4"): 109.0, ("st", "1e-3"): 107.0, ("st", "3e-3"): 108.0}
    for (estimator, rate), value in val.items():
        for seed in (1, 2):
            metrics = {"val/neg_elbo": value + seed, "test/neg_elbo": 300.0 - value}  # test ranks them the other way
            folder = _job(root, estimator, seed, {"steps": 1000, "wall_time_s": 1.0, "status": "finished",
                                                   "metrics": metrics},
                          extra=[f"optimizer.lr={rate}", "trainer.max_steps=1000"])
            (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
                {"hydra": {"job": {"config": {"override_dirname": {"exclude_keys": ["trainer.enable_progress_bar"]}}}}}))
    result = _run(REPORT, "select", root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    chosen = {row["config"]: row for row in json.loads((root / "selection.json").read_text())["configurations"]}
    sf = next(row for config, row in chosen.items() if "estimator=sf" in config)
    st = next(row for config, row in chosen.items() if "estimator=st" in config)
    assert sf["chosen"] == "3e-4" and st["chosen"] == "1e-3" and sf["metric"] == "val/neg_elbo"
    assert sf["rates"]["3e-4"] == {"mean": 111.5, "runs": 2}
    assert "optimizer.lr=1e-3 seed=1,2,3" in st["command"] and "max_steps" not in st["command"]
    assert "experiment=jang2017" in st["command"]
    assert "| estimator=st" in result.stdout
    # st's chosen 1e-3 is the rate conf/ gives experiment=jang2017: its fixed-rate runs are the tuned ones
    assert st["fixed_rate"] and st["preset_rate"] == 1e-3 and not sf["fixed_rate"]
    assert "| yes (preset's) |" in result.stdout and sf["command"] in result.stdout
    # sf's 3e-4 is the grid's smallest rate: a wider grid might choose another, and the page says so
    assert sf["edge"] == "smallest" and st["edge"] is None and "| yes (the grid's smallest) |" in result.stdout
    assert "1 of 2 chosen rates are at the grid's edge" in result.stdout
    assert st["command"] not in result.stdout
    refused = _run(REPORT, "select", root, "--metric", "test/neg_elbo", cwd=tmp_path)
    assert refused.returncode == 1 and "validation numbers only" in refused.stderr
