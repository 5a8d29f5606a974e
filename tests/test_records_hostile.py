"""Hostile run records: every file the records and the reports read is data from anywhere.

A FIFO or a link to /dev/zero in place of metrics.json, .hydra/*.yaml, an evaluation or val_curve.csv,
text in another encoding, a JSON nested 100,000 deep, a YAML alias bomb, NaN in a curve, numbers too
large to add, and text that would add rows or columns to a markdown table: each is refused or listed
with its problem, at once, never a hang, a traceback or a corrupt table. The cases that could block
or read for ever run in a child process with a deadline and a memory limit (`_isolated`), so that a
regression fails its test instead of hanging the suite or filling the machine's memory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO
from discrete_vae import records, report

HANG_S = 60  # a child that takes longer is stuck (it takes a few seconds, most of them importing torch)
MEMORY = 6 * 2**30  # address space of a child: torch's import maps ~3.3 GiB, /dev/zero would take the rest
REPORT = REPO / "scripts" / "report.py"
FINISHED = {"status": "finished", "steps": 1000, "wall_time_s": 60.0, "seed": 1, "estimator": "gumbel",
            "overrides": ["estimator=gumbel", "seed=1"],
            "metrics": {"val/neg_elbo": 101.0, "test/neg_elbo": 100.0, "test/nll_iwae": 95.0}}
ALIAS_BOMB = "- &a [x, x, x, x, x, x, x, x, x]\n" + "".join(  # the "billion laughs": 9^9 items from 400 bytes
    f"- &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def _isolated(*args, timeout: float = HANG_S) -> subprocess.CompletedProcess:
    """`python args...` with this checkout's package, killed after `timeout` seconds and refused more
    than MEMORY of address space: a regression that blocks on a FIFO or reads /dev/zero fails here."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    try:
        return subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True,
                              timeout=timeout, preexec_fn=_limits)
    except subprocess.TimeoutExpired:
        pytest.fail(f"python {' '.join(map(str, args))[:200]} still running after {timeout} s: a read blocks")


@contextmanager
def deadline(seconds: int):
    """Fails the block (TimeoutError) when it runs longer than `seconds`, blocked in a system call or not."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _plant(path: Path, kind: str) -> None:
    """A file that never ends or never opens where a record belongs: a FIFO with no writer, or /dev/zero."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")


def _record(folder: Path, record: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


# -- 1. only small regular files are read ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_metrics_json_that_is_no_regular_file_is_refused_at_once(tmp_path, kind):
    """load_record, read_record and done_record (training's start-up check) refuse it without blocking."""
    _plant(tmp_path / "metrics.json", kind)
    code = ("import json, sys; from pathlib import Path; from discrete_vae import records; f = Path(sys.argv[1]); "
            "print(json.dumps([records.load_record(f), records.read_record(f), records.done_record(f)]))")
    child = _isolated("-c", code, tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]
    (record, problem), read, done = json.loads(child.stdout.splitlines()[-1])
    assert record is None and read is None and done is None
    assert f"{tmp_path / 'metrics.json'} cannot be read (" in problem and "not a regular file" in problem


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_the_report_lists_runs_whose_files_are_no_regular_files(tmp_path, kind):
    """scripts/report.py on a sweep where metrics.json, .hydra/overrides.yaml, .hydra/hydra.yaml, the
    evaluation JSON and val_curve.csv are each a FIFO or a link to /dev/zero: every run listed, none hangs."""
    sweep = tmp_path / "sweep"
    good = _record(sweep / "good", {**FINISHED, "best_checkpoint": "/elsewhere/best-step999.ckpt"})
    _plant(good / "checkpoints" / "best-step999_eval_test.json", kind)
    _plant(good / "val_curve.csv", kind)
    _plant(sweep / "bad_metrics" / "metrics.json", kind)
    _plant(sweep / "bad_overrides" / ".hydra" / "overrides.yaml", kind)  # no metrics.json: its overrides are read
    hydra = _record(sweep / "bad_hydra", {**FINISHED, "overrides": ["estimator=sf", "seed=1"], "estimator": "sf"})
    (hydra / ".hydra").mkdir()
    (hydra / ".hydra" / "overrides.yaml").write_text("- estimator=sf\n- seed=1\n")
    _plant(hydra / ".hydra" / "hydra.yaml", kind)
    child = _isolated(REPORT, sweep)
    assert child.returncode == 0 and "Traceback" not in child.stderr, child.stderr[-3000:]
    text = (sweep / "report.md").read_text()
    assert "4 runs: 2 finished, 1 failed, 0 diverged, 1 did not finish" in text
    assert f"not a valid run record: {sweep / 'bad_metrics' / 'metrics.json'} cannot be read (" in text
    assert "not a regular file" in text
    for name in ("overrides.yaml", "hydra.yaml", "best-step999_eval_test.json"):
        assert re.search(rf"{name}\S* cannot be read \(a .*, not a regular file", child.stderr), name


def test_read_small_file_reads_regular_files_and_refuses_the_rest(tmp_path):
    record = tmp_path / "metrics.json"
    record.write_text('{"status": "finished"}')
    (tmp_path / "link.json").symlink_to(record)  # a link to a regular file is read
    assert records.read_small_file(tmp_path / "link.json") == record.read_bytes()
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(records.MAX_RECORD_BYTES + 1)  # sparse: refused by its size, never read
    os.mkfifo(tmp_path / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    refused = {big: "over the", tmp_path: "a folder", tmp_path / "fifo": "a FIFO",
               Path("/dev/zero"): "a character device", tmp_path / "sock": ""}
    try:
        with deadline(10):
            for path, why in refused.items():
                with pytest.raises(OSError) as err:
                    records.read_small_file(path)
                assert why in str(err.value), path
    finally:
        server.close()
    with pytest.raises(FileNotFoundError):
        records.read_small_file(tmp_path / "absent.json")


# -- 2. text that is not UTF-8 JSON, or nests too deeply ------------------------------------------
DECODING = {
    "latin-1": ('{"status": "finished", "error": "caf\xe9"}'.encode("latin-1"), "is not UTF-8"),
    "utf-16": (json.dumps(FINISHED).encode("utf-16"), "is not UTF-8"),  # with its BOM
    "deep": (b"[" * 100_000, "nests too deeply"),
    "deep-but-parsed": (json.dumps({**FINISHED, "machine": json.loads('{"a": ' * 500 + "1" + "}" * 500)}).encode(),
                        "nests too deeply"),
}


@pytest.mark.parametrize("case", DECODING)
def test_a_metrics_json_that_is_no_utf8_json_is_an_invalid_record(tmp_path, case):
    data, why = DECODING[case]
    run = tmp_path / "sweep" / "run"
    run.mkdir(parents=True)
    (run / "metrics.json").write_bytes(data)
    record, problem = records.load_record(run)
    assert record is None and problem.startswith(f"{run / 'metrics.json'} {why}")
    assert records.read_record(run) is None and records.done_record(run) is None
    report.report(tmp_path / "sweep")
    text = (tmp_path / "sweep" / "report.md").read_text()
    assert "**failed**" in text and f"not a valid run record: {run / 'metrics.json'} {why}" in text


@pytest.mark.parametrize("case", DECODING)
def test_an_evaluation_that_is_no_utf8_json_is_named_and_left_out(tmp_path, case, caplog):
    data, why = DECODING[case]
    run = _record(tmp_path / "sweep" / "run", {**FINISHED, "best_checkpoint": "/elsewhere/best-step9.ckpt"})
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best-step9_eval_test.json").write_bytes(data)
    with caplog.at_level(logging.WARNING):
        (found,) = report.find_runs(tmp_path / "sweep")
    assert found.status == "finished" and found.evaluation == {}
    assert f"{run / 'checkpoints' / 'best-step9_eval_test.json'} {why}" in caplog.text
    assert "listed without its evaluation" in caplog.text


# -- 3. a curve's NaN and infinities --------------------------------------------------------------
def test_points_of_a_curve_that_are_not_finite_are_dropped(tmp_path):
    """No NaN in the tables, the CSV, the exported curve or the plots' axes; nothing crashes."""
    sweep = tmp_path / "sweep"
    for seed in (1, 2):
        overrides = ["estimator=gumbel", f"seed={seed}"]
        run = _record(sweep / f"seed={seed}", {**FINISHED, "seed": seed, "overrides": overrides})
        (run / "val_curve.csv").write_text(
            "step,val/neg_elbo\n100,200.0\n200,nan\n300,inf\n400,-Infinity\n500,1e308\n600,190.0\n")
    failed = _record(sweep / "failed", {**FINISHED, "status": "failed", "error": "x", "overrides": ["estimator=sf"]})
    (failed / "val_curve.csv").write_text("step,val/neg_elbo\n100,210.0\n200,NaN\n")  # its last point is listed
    assert report.read_curve(sweep / "seed=1") == [(100, 200.0), (600, 190.0)]
    assert report.read_curve(failed) == [(100, 210.0)]
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "val_curve.csv").write_text("step,val/neg_elbo\n100,210.0\n200,low\n")
    assert report.read_curve(tmp_path / "damaged") == []  # not a number: the curve is rejected
    rows = report.report(sweep)
    assert rows[0]["val_drop_last20_mean"] == pytest.approx(10.0)
    for name in ("report.md", "report.csv"):
        assert not re.search(r"\b(nan|inf|infinity)\b", (sweep / name).read_text(), re.I), name
    exported = report.export(sweep, tmp_path / "records")
    assert all("nan" not in (folder / "val_curve.csv").read_text() for folder in exported)


def test_numbers_too_large_to_add_are_shown_as_missing(tmp_path):
    """1e308s overflow every mean (fsum) and the plots' axes; an int of 400 digits is no float at all."""
    sweep = tmp_path / "sweep"
    huge = {"val/neg_elbo": 1e308, "test/neg_elbo": 1e308, "test/nll_iwae": -1e308}
    for seed in (1, 2):
        run = _record(sweep / f"seed={seed}", {**FINISHED, "seed": seed, "wall_time_s": 1e308, "metrics": huge,
                                                "overrides": ["estimator=gumbel", f"seed={seed}"]})  # fmt: skip
        (run / "val_curve.csv").write_text("step,val/neg_elbo\n100,1e308\n200,-1e308\n300,1e15\n")
    (sweep / "int" / "metrics.json").parent.mkdir()
    (sweep / "int" / "metrics.json").write_text(json.dumps({**FINISHED, "metrics": {"test/neg_elbo": 10**400}}))
    rows = report.report(sweep)
    text = (sweep / "report.md").read_text()
    assert "metrics must be an object of numbers" in text and "1e+308" not in text and len(text) < 5_000
    assert not re.search(r"\b(nan|inf)\b", text, re.I)
    assert next(r for r in rows if r["n_seeds"])["test/neg_elbo_mean"] is None


# -- 4. YAML alias bombs --------------------------------------------------------------------------
def test_a_yaml_alias_is_refused_at_once(tmp_path, caplog):
    bomb = tmp_path / "overrides.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 1_000
    with caplog.at_level(logging.WARNING), deadline(10):
        refused = report._yaml(bomb) is None  # not in the assert: pytest would print what it read
    assert refused
    assert f"{bomb} is not a YAML file of Hydra (found an alias" in caplog.text
    anchored = tmp_path / "hydra.yaml"  # an anchor that is never used is no alias: still read
    anchored.write_text("hydra:\n  job: &job\n    name: train\n")
    assert report._yaml(anchored) == {"hydra": {"job": {"name": "train"}}}


def test_the_report_refuses_alias_bombs_in_hydra_files(tmp_path):
    """In .hydra/overrides.yaml (a run with no metrics.json) and in hydra.yaml's exclude_keys: each run
    is listed without them, in seconds (a minute and a half and 1.5 GB before)."""
    sweep = tmp_path / "sweep"
    (sweep / "overrides" / ".hydra").mkdir(parents=True)
    (sweep / "overrides" / ".hydra" / "overrides.yaml").write_text(ALIAS_BOMB)
    hydra = _record(sweep / "hydra", FINISHED)
    (hydra / ".hydra").mkdir()
    (hydra / ".hydra" / "hydra.yaml").write_text(
        "bomb:\n" + "".join(f"  {line}\n" for line in ALIAS_BOMB.splitlines())
        + "hydra:\n  job:\n    config:\n      override_dirname:\n        exclude_keys: *i\n")
    code = ("import json, sys; from pathlib import Path; from discrete_vae import report; "
            "runs = report.find_runs(Path(sys.argv[1])); "
            "print(json.dumps([[r.path.name, r.overrides, sorted(r.ignored_keys)] for r in runs]))")
    start = time.monotonic()
    child = _isolated("-c", code, sweep)
    assert child.returncode == 0, child.stderr[-3000:]
    assert time.monotonic() - start < HANG_S
    found = json.loads(child.stdout.splitlines()[-1])
    assert found == [["hydra", FINISHED["overrides"], ["seed"]], ["overrides", [], ["seed"]]]
    assert child.stderr.count("found an alias") == 2


# -- 5. markdown injection --------------------------------------------------------------------------
def _cells(line: str) -> int:
    """How many cells a markdown table row has, as GitHub splits it: at each `|` not escaped by `\\`."""
    count, escaped = 0, False
    for char in line.strip()[1:-1]:
        count += char == "|" and not escaped
        escaped = char == "\\" and not escaped
    return count + 1


def _tables(text: str) -> list[list[str]]:
    """The markdown tables of `text`: runs of lines that start with `|`."""
    tables, current = [], []
    for line in text.split("\n"):
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables, current = tables + [current], []
    return tables + ([current] if current else [])


HOSTILE = ["estimator=a|b\n| injected | row | here |", "lr=1\r\n## heading\\|", "x=<!-- /report:jang2017-table -->"]


def test_text_of_a_record_adds_no_row_or_column_to_the_sweep_report(tmp_path):
    sweep = tmp_path / "sweep"
    _record(sweep / "run1", {**FINISHED, "overrides": [*HOSTILE, "seed=1"]})
    _record(sweep / "run2", {**FINISHED, "seed": 2, "overrides": ["estimator=gumbel", "seed=2"]})
    _record(sweep / "other", {**FINISHED, "status": "failed", "overrides": ["estimator=sf|x"],
                              "error": "Boom\n| a | row |\n# heading"})
    (sweep / "unfinished" / ".hydra").mkdir(parents=True)
    (sweep / "unfinished" / ".hydra" / "overrides.yaml").write_text('- "estimator=c|d\\r\\n| e | f |"\n- seed=3\n')
    rows = report.report(sweep)
    text = (sweep / "report.md").read_text()
    configs, every_run = _tables(text)
    assert len(configs) == 2 + len(rows) and len(every_run) == 2 + 4  # header and rule, then one row each
    assert {_cells(line) for line in configs} == {11} and {_cells(line) for line in every_run} == {9}
    assert "\\|" in text and "\n# heading" not in text and "\n## heading" not in text
    problems = text.split("## Runs that failed, diverged or did not finish\n\n")[1].strip().split("\n")
    assert len(problems) == 2 and all(line.startswith("- `") for line in problems)


def test_text_of_a_record_adds_no_row_column_or_block_end_to_the_results_page(tmp_path, sweep_records):
    """results(): the tables of docs/results.md and the README keep their shape, and rebuilding twice gives
    the same page (no record's text ends a <!-- report:NAME --> block early)."""
    markdown = tmp_path / "results.md"
    blocks = ("jang2017-table", "jang2017-provenance", "summary", "jang2017-table1")
    markdown.write_text("".join(f"<!-- report:{b} -->\n<!-- /report:{b} -->\nprose after {b}\n" for b in blocks))
    report.results(sweep_records, [markdown])
    first = markdown.read_text()
    report.results(sweep_records, [markdown])
    assert markdown.read_text() == first
    assert all(f"\nprose after {b}\n" in first for b in blocks)
    assert first.count("<!-- report:") == first.count("<!-- /report:") == len(blocks)
    table, summary, table1 = _tables(first)
    assert len(table) == 2 + 3 and {_cells(line) for line in table} == {_cells(table[0])} == {9}
    assert len(summary) == 2 + 2 and {_cells(line) for line in summary} == {3}
    assert {_cells(line) for line in table1} == {9}
    provenance = first.split("<!-- report:jang2017-provenance -->\n")[1].split("<!-- /report:")[0].strip("\n")
    assert len(provenance.split("\n")) == 2  # the summary line and the failed run, one line each


@pytest.fixture
def sweep_records(tmp_path) -> Path:
    """docs/results/jang2017/: two configurations, one named by hostile overrides, and a failed run whose
    error would end the provenance block."""
    root = tmp_path / "results"
    _record(root / "jang2017" / "a", {**FINISHED, "overrides": [*HOSTILE, "seed=1"], "estimator": "gumbel"})
    _record(root / "jang2017" / "b", {**FINISHED, "overrides": ["estimator=sf", "seed=1"], "estimator": "sf|x\ny"})
    _record(root / "jang2017" / "c", {**FINISHED, "status": "failed", "overrides": ["estimator=st"],
                                      "error": "x\n<!-- /report:jang2017-provenance -->\n| a | b |"})
    return root


def test_a_dollar_in_an_override_does_not_stop_the_plots(tmp_path):
    """matplotlib reads `$...$` in a label as mathtext: `$\\frac{$` raised a ValueError from plt."""
    sweep = tmp_path / "sweep"
    for seed, override in ((1, "x=$\\frac{$"), (2, "estimator=gumbel")):
        run = _record(sweep / f"run{seed}", {**FINISHED, "seed": seed, "overrides": [override, f"seed={seed}"]})
        (run / "val_curve.csv").write_text("step,val/neg_elbo\n100,200.0\n200,190.0\n")
    report.report(sweep)
    assert (sweep / "val_neg_elbo.png").read_bytes()[:4] == b"\x89PNG"
