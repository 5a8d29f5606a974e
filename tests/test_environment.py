"""What the machine can do to a run: Ctrl-C during start-up, evaluation or a gradient study, a
full or read-only disk under training, resume, evaluation and the report, and a failed job in a
multirun. Each ends with one `error:` line and a non-zero status (130 for Ctrl-C), and nothing
already written is lost.

The Ctrl-C cases are processes of their own (the exit status and the signal are what is tested);
the disk cases run in this process, with the failing call simulated."""

from __future__ import annotations

import errno
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, shared_data_root
from discrete_vae import records
from discrete_vae.errors import EnvironmentProblem, find_user_error


def start(script: str, *args: str) -> subprocess.Popen:
    env = {"DISCRETE_VAE_DATA": str(shared_data_root()), "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1",
           "PATH": "/usr/bin:/bin"}
    # Ctrl-C as a terminal sends it, even where this test runs with SIGINT ignored (under nohup, or as a
    # background job of a shell without job control), which the script would otherwise inherit
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt(proc: subprocess.Popen, after_line: str | None = None, after_s: float = 0.0) -> tuple[int, str, str]:
    """SIGINT to `proc` once it has printed a line starting with `after_line` (or after `after_s`)."""
    out = []
    if after_line is not None:
        while line := proc.stdout.readline():
            out.append(line)
            if line.startswith(after_line):
                break
        else:
            pytest.fail(f"the script ended before printing {after_line!r}: {proc.stderr.read()[-2000:]}")
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # it ignored the interrupt: stop it, not leave it running
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"the script went on for 120 s after Ctrl-C: {stderr[-2000:]}")
    return proc.returncode, "".join(out) + stdout, stderr


def assert_one_line(stderr: str, status: int, returncode: int) -> None:
    assert returncode == status, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: interrupted (Ctrl-C)"), stderr[-2000:]


def test_ctrl_c_during_start_up_is_one_line_and_status_130(tmp_path):
    proc = start("train.py", f"hydra.run.dir={tmp_path / 'run'}", "logger=null")
    returncode, _, stderr = interrupt(proc, after_s=1.5)  # importing torch, loading the data: start-up
    assert_one_line(stderr, 130, returncode)
    assert not (tmp_path / "run" / "metrics.json").exists()  # neither finished nor failed: no record


def test_ctrl_c_during_evaluation_is_one_line_and_writes_nothing(trained_run, tmp_path):
    ckpt = tmp_path / "best.ckpt"
    shutil.copy(next((trained_run / "checkpoints").glob("best-*.ckpt")), ckpt)
    proc = start("evaluate.py", f"ckpt_path={ckpt}", "device=cpu")  # m = 1000 on 10,000 images: minutes
    returncode, stdout, stderr = interrupt(proc, after_line="evaluating best.ckpt on 10000 test images, m=1000")
    assert_one_line(stderr, 130, returncode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]


def test_ctrl_c_during_a_gradient_study_is_one_line(tmp_path):
    proc = start("gradient_study.py", "estimators=[sf,st]", "num_estimates=100000", "timing_repeats=0",
                 "batch_size=4", "reference.num_estimates=2", f"hydra.run.dir={tmp_path / 'study'}")
    returncode, _, stderr = interrupt(proc, after_line="reference:", after_s=0.5)
    assert_one_line(stderr, 130, returncode)


# -- a full or read-only disk --------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_while_training_keeps_last_ckpt(code, trained_run, tmp_path, monkeypatch):
    """A resumed run whose next checkpoint cannot be written: the error is one line naming the
    cause, and the last.ckpt it resumed from is whole (step 4)."""
    from test_crafted_runs import train_in

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "metrics.json").unlink()

    def refused(fd):
        raise OSError(code, "simulated", None)

    monkeypatch.setattr(records.os, "fsync", refused)
    with pytest.raises(Exception) as caught:
        train_in(run, monkeypatch)
    monkeypatch.undo()
    problem = find_user_error(caught.value)
    assert isinstance(problem, EnvironmentProblem), caught.value
    assert "\n" not in str(problem) and "then run the same command again" in str(problem)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_a_read_only_folder_under_the_report_is_one_line(trained_run, tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(trained_run, sweep / "run")
    from conftest import load_script

    report = load_script("report")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(sweep / "report.md"))

    monkeypatch.setattr(records, "write_atomic", read_only)
    monkeypatch.setattr(report.report, "write_atomic", read_only, raising=False)
    monkeypatch.setattr("pathlib.Path.write_text", read_only)
    assert report.main([str(sweep)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write or read") and "Read-only file system" in err
    assert err.count("\n") == 1


def test_a_failed_job_in_a_multirun_is_named_and_the_others_run(tmp_path):
    """One job of three refused (max_steps=0): the other two train and keep their records, and the
    sweep ends non-zero with the failed job's one line (between Hydra's own two: the job's overrides,
    and how to see a stack trace)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "-m", "trainer.max_steps=2,0,3",
         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "test_iwae_samples=0", "~logger",
         "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"DISCRETE_VAE_DATA": str(shared_data_root()), "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "failed: trainer.max_steps=0 trains nothing" in line and "trainer.max_steps=0" in line.split(" failed")[0]
    done = sorted(p.parent.name.rsplit("=", 1)[-1] for p in tmp_path.glob("*/metrics.json"))
    assert done == ["2", "3"], (done, proc.stderr[-3000:])
