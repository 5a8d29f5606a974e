"""Long runs you can trust, through scripts/train.py on the real data: a run killed with SIGKILL
(mid-epoch, and again at an epoch's end) resumes bit-for-bit; a re-run sweep skips finished runs
and completes the rest; joblib and submitit sweeps run; a diverging run is stopped and recorded;
every bad input gives one clear line and exit status 1."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hydra import compose, initialize_config_dir

from conftest import REPO, error_of, load_script, run_script, train_in

QUICK = ["trainer.limit_val_batches=2", "trainer.limit_test_batches=1", "test_iwae_samples=5",
         "trainer.enable_progress_bar=false"]
# 3 epochs of 10 steps, last.ckpt every 4 steps, metrics every 2; RELAX on 8 bits, whose own
# parameters (temperature, scale, control network) and their Adam state must resume exactly too
SHORT = ["trainer.max_epochs=3", "trainer.limit_train_batches=10", "trainer.log_every_n_steps=2",
         "callbacks.latest.every_n_train_steps=4", "seed=3", "estimator=relax", "latent=bernoulli",
         "latent.num_latents=8", *QUICK]


def train(args, data_root, tmp_path, check=True, script="train.py"):
    env = {"DISCRETE_VAE_DATA": str(data_root), "KILL_ONCE_DIR": str(tmp_path)}
    return run_script(script, *args, env=env, check=check)


def kill_at(step, only=None, sig=None):
    extra = (f",only:{only}" if only else "") + (f",sig:{sig}" if sig else "")
    return f"+callbacks.kill={{_target_:probes.KillOnce,step:{step}{extra}}}"


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def checkpoint_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root) -> Path:
    """The uninterrupted run of SHORT, which the interrupted and resumed runs below must repeat
    exactly. last.ckpt every 4 steps: a run saving it less often ends with the same files and events."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train([*SHORT, f"hydra.run.dir={run}"], data_root, run.parent)
    return run


def test_kill_and_resume_is_bit_identical(straight, data_root, tmp_path):
    broken = tmp_path / "broken"

    # killed at step 11 (resumes from step 8, mid-epoch, with the best checkpoint of step 10 written
    # past it), then at 22 (from 20, an epoch's end)
    for step in (11, 22):
        proc = train([*SHORT, kill_at(step), f"hydra.run.dir={broken}"], data_root, tmp_path, check=False)
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert not (broken / "metrics.json").exists()
    # last.ckpt of step 20, an epoch's end, was written after that step's validation (Lightning does
    # not repeat it on resume): its best-checkpoint record has the validation's result
    states = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    best = next(v for k, v in states.items() if k.startswith("ModelCheckpoint"))
    assert [Path(p).name for p in best["best_k_models"]] == ["best-step20.ckpt"]
    # the checkpoint carries the time spent up to it, and the resumed run's record counts it
    before = states["WallClock"]["elapsed_s"]
    assert before > 0
    proc = train([*SHORT, f"hydra.run.dir={broken}"], data_root, tmp_path)
    assert "resuming from" in proc.stdout and "(step 20)" in proc.stdout

    a, b = weights(straight), weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after resuming"
    assert {"estimator.log_tau", "estimator.scale", "estimator.net.0.weight"} <= a.keys()
    assert not torch.equal(a["estimator.log_tau"], torch.log(torch.tensor(0.5))), "RELAX's temperature trained"
    assert checkpoint_names(broken) == checkpoint_names(straight), "a checkpoint of a killed process is left over, or a -v1 name"
    moved = [p.name for p in (broken / "earlier").glob("*/checkpoints/*.ckpt")]
    assert "best-step10.ckpt" in moved, "the killed process's checkpoint past last.ckpt is kept aside, not deleted"
    ra, rb = (json.loads((d / "metrics.json").read_text()) for d in (straight, broken))
    assert ra["metrics"] == rb["metrics"] and ra["steps"] == rb["steps"] == 30
    assert rb["resumed_from_step"] == 20 and rb["wall_time_s"] > before
    # TensorBoard shows one trajectory: the killed runs' events past each checkpoint are purged
    for tag in ("train/loss", "val/neg_elbo"):
        assert scalars(straight, tag) == scalars(broken, tag), tag


def test_sweep_rerun_skips_finished_runs_and_completes_the_rest(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "estimator=sf,st", "trainer.max_steps=12", "callbacks.latest.every_n_train_steps=4",
            kill_at(6, only="StraightThrough"), *QUICK, f"hydra.sweep.dir={sweep}"]
    proc = train(args, data_root, tmp_path, check=False)  # sf finishes, then st is killed at step 6
    assert proc.returncode == -9
    runs = {p.name.split(",")[0]: p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert set(runs) == {"sf", "st"}
    assert json.loads((runs["sf"] / "metrics.json").read_text())["status"] == "finished"
    assert not (runs["st"] / "metrics.json").exists()
    files = [p for p in runs["sf"].rglob("*") if p.is_file()]
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files if ".hydra" not in p.parts}
    configs = {p: p.read_bytes() for p in files if ".hydra" in p.parts}

    proc = train(args, data_root, tmp_path)  # the same command again
    assert "already finished (metrics.json): skipped" in proc.stderr
    assert f"sweep done: {sweep}\n  python scripts/report.py {sweep}" in proc.stdout, proc.stdout[-2000:]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == kept, "a finished run was rewritten"
    # Hydra itself saves the job's config before the job starts: the same bytes again
    assert {p: p.read_bytes() for p in configs} == configs
    record = json.loads((runs["st"] / "metrics.json").read_text())
    assert record["status"] == "finished" and record["steps"] == 12 and record["resumed_from_step"] == 4


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_and_cluster_launchers_run_a_sweep(launcher, data_root, tmp_path):
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=5"]
    train(["-m", f"hydra/launcher={launcher}", *extra, "estimator=sf,st", "trainer.max_steps=4", *QUICK,
           f"hydra.sweep.dir={sweep}"], data_root, tmp_path)
    records = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert sorted(r["estimator"] for r in records) == ["sf", "st"]
    assert all(r["status"] == "finished" and r["steps"] == 4 for r in records)


def test_a_diverging_run_is_stopped_recorded_and_reported(data_root, tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    # validation every 5 steps, the loss checked every 10: the first validation already sees NaN
    proc = train(["-m", "optimizer.lr=1e20,1e-3", "trainer.max_steps=40", "trainer.val_check_interval=5",
                  "trainer.log_every_n_steps=10", *QUICK, f"hydra.sweep.dir={sweep}"], data_root, tmp_path, check=False)
    assert proc.returncode != 0, "the sweep reports the diverged job"
    (diverged,), (healthy,) = sweep.glob("optimizer.lr=1e+20,*"), sweep.glob("optimizer.lr=0.001,*")
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))  # noqa: E731
    record = strict((diverged / "metrics.json").read_text())
    assert record["status"] == "diverged" and record["steps"] <= 10
    assert "diverged at step" in record["error"] and "optimizer.lr" in record["error"]
    assert not list((diverged / "checkpoints").glob("best*")), "a non-finite checkpoint was kept as best"
    assert strict((healthy / "metrics.json").read_text())["status"] == "finished", "the sweep carried on"

    run_script("report.py", sweep)
    text = (sweep / "report.md").read_text()
    assert "1 diverged" in text and "**diverged**" in text

    message = error_of(lambda: train_in(tmp_path / "single", monkeypatch, "optimizer.lr=1e20", "trainer.max_steps=20",
                                        "trainer.log_every_n_steps=5"))
    assert "training diverged at step 5" in message and message.count("training diverged") == 1


def test_a_run_shorter_than_an_epoch_ends_validated(trained_run):
    """The shared run stopped at step 4 of an epoch of 500 (trainer.max_steps=4), with logger=null."""
    record = json.loads((trained_run / "metrics.json").read_text())
    assert record["metrics"]["val/neg_elbo"] is not None and record["best_checkpoint"].endswith("best-step4.ckpt")
    assert not list(trained_run.glob("events.out.tfevents.*")), "logger=null writes no event files"


def bad_inputs(trained: Path, tmp: Path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    truncated, text = tmp / "truncated.ckpt", tmp / "text.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    text.write_text("not a checkpoint\n")
    train_ = "train.py"
    return [
        (train_, ["estimator.tau=abc"], "estimator.tau"),
        (train_, ["optimizer.lr=fast"], "optimizer.lr must be a number, got 'fast'"),
        (train_, ["optimizer.lr=1e38"], "optimizer.lr must be at most"),
        (train_, [f"ckpt_path={ckpt}", "latent.num_latents=30"], "has latent.num_latents=20, the config says 30"),
        (train_, [f"ckpt_path={ckpt}", "estimator=sf"], "trained with estimator=st_gumbel (STGumbelSoftmax), the config says estimator=sf"),
        (train_, ["resume=sometimes"], "resume='sometimes' is not one of auto, never"),
        ("evaluate.py", [f"ckpt_path={truncated}"], f"cannot read the checkpoint {truncated}"),
        ("evaluate.py", [f"ckpt_path={text}"], f"cannot read the checkpoint {text}: it is not a torch checkpoint"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_inputs_give_one_clear_line(case, trained_run, tmp_path, monkeypatch):
    """Each script's work in this process; the one line a script prints is the UserError's."""
    script, args, message = bad_inputs(trained_run, tmp_path)[case]
    if script == "train.py":
        assert message in error_of(lambda: train_in(tmp_path / "run", monkeypatch, "trainer.max_steps=2", *args))
        return
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=args)
    assert message in error_of(lambda: load_script("evaluate").run(cfg))


def test_a_bad_input_is_printed_once_with_status_1(trained_run, data_root, tmp_path):
    proc = train(["optimizer.lr=fast", f"hydra.run.dir={tmp_path / 'run'}"], data_root, tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "optimizer.lr must be a number, got 'fast'" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1, "the error is printed once"


def test_evaluate_help_lists_only_its_own_options(data_root, tmp_path):
    proc = train(["--help"], data_root, tmp_path, script="evaluate.py")
    assert "ckpt_path" in proc.stdout and "num_samples" in proc.stdout
    assert "estimator:" not in proc.stdout and "Configuration groups" not in proc.stdout


def test_sigterm_ends_with_status_143_and_the_run_resumes_exactly(data_root, tmp_path):
    # full epochs (no limit_train_batches) of 10 steps and last.ckpt every 10 steps: every
    # checkpoint is taken at an epoch's last batch, as with the presets (every 1,000 steps,
    # epochs of 500). On SIGTERM Lightning stops after the step and leaves fit() with status 0. A small
    # network keeps the big batches cheap.
    full = ["data.batch_size=5000", "model.hidden_dims=[32]", "trainer.max_epochs=2", "callbacks.latest.every_n_train_steps=10",
            "trainer.log_every_n_steps=5", "seed=3", *QUICK]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train([*full, f"hydra.run.dir={straight}"], data_root, tmp_path)
    proc = train([*full, kill_at(13, sig="SIGTERM"), f"hydra.run.dir={broken}"], data_root, tmp_path, check=False)
    assert proc.returncode == 143, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "stopped by SIGTERM at step 13" in out and "last.ckpt holds step 10" in out, out[-2000:]
    assert not (broken / "metrics.json").exists()
    proc = train([*full, f"hydra.run.dir={broken}"], data_root, tmp_path)
    assert "(step 10)" in proc.stdout

    ra, rb = (json.loads((d / "metrics.json").read_text()) for d in (straight, broken))
    assert ra["steps"] == rb["steps"] == 20
    a, b = weights(straight), weights(broken)
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after resuming"
    assert ra["metrics"] == rb["metrics"]
    for tag in ("train/loss", "val/neg_elbo"):
        assert scalars(straight, tag) == scalars(broken, tag), tag


def test_one_process_per_run_folder(tmp_path, monkeypatch):
    from discrete_vae.errors import RunFolderBusy
    from discrete_vae.training import run_folder_lock

    run = tmp_path / "run"
    with run_folder_lock(run):
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"), run_folder_lock(run):
            pass
        # a training on the folder (its lock a file description of its own, as another process's) is
        # refused, and leaves no record in it
        message = error_of(lambda: train_in(run, monkeypatch, "trainer.max_steps=2"))
        assert f"another process (pid {os.getpid()}) is training" in message
        assert not (run / "metrics.json").exists() and not (run / "checkpoints").exists()
    with run_folder_lock(run):  # released on exit
        pass
    assert train_in(run, monkeypatch, "trainer.max_steps=2")["status"] == "finished"
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"


def test_an_attempt_killed_before_its_first_last_ckpt_leaves_nothing_behind(straight, data_root, tmp_path):
    # last.ckpt only every 25 steps: the kill at step 12 comes after the best checkpoint of step 10
    args = [*SHORT, "callbacks.latest.every_n_train_steps=25"]
    broken = tmp_path / "broken"
    proc = train([*args, kill_at(12), f"hydra.run.dir={broken}"], data_root, tmp_path, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert checkpoint_names(broken) == ["best-step10.ckpt"]
    (broken / "checkpoints" / "best-step10_eval_test.json").write_text("{}")  # as scripts/evaluate.py writes

    proc = train([*args, f"hydra.run.dir={broken}"], data_root, tmp_path)
    assert "starting afresh (no last.ckpt to resume from): the earlier attempt's" in proc.stderr + proc.stdout
    kept = list((broken / "earlier").glob("*/checkpoints/*"))  # set aside, not deleted
    assert sorted(p.name for p in kept) == ["best-step10.ckpt", "best-step10_eval_test.json"]
    assert checkpoint_names(broken) == checkpoint_names(straight)  # no stale file, and no "-v1" beside a name already taken
    for tag in ("train/loss", "val/neg_elbo"):  # one trajectory: the attempt's events are purged
        assert scalars(straight, tag) == scalars(broken, tag), tag


def test_a_run_folder_moved_before_its_resume_keeps_one_best_checkpoint(straight, data_root, tmp_path):
    """A killed run resumed from another place (a sweep carried to another machine): the best
    checkpoint's record follows the folder, so the earlier best is replaced, not left beside the
    new one and forgotten (Lightning keeps it only when the folder has not moved)."""
    broken, moved = tmp_path / "broken", tmp_path / "elsewhere" / "run"
    proc = train([*SHORT, kill_at(22), f"hydra.run.dir={broken}"], data_root, tmp_path, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    moved.parent.mkdir()
    shutil.move(broken, moved)

    proc = train([*SHORT, f"hydra.run.dir={moved}"], data_root, tmp_path)
    assert "(step 20)" in proc.stdout
    assert checkpoint_names(moved) == checkpoint_names(straight)
    ra, rm = (json.loads((d / "metrics.json").read_text()) for d in (straight, moved))
    assert ra["metrics"] == rm["metrics"] and Path(rm["best_checkpoint"]).parent == moved / "checkpoints"


def test_a_resume_from_an_epoch_end_checkpoint_is_exact(straight, data_root, tmp_path):
    """Lightning's own ModelCheckpoint saves at an epoch's end by default, and Lightning resumes
    from there without restoring the data position: the epoch's order comes from the trainer."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    every_epoch = ("+callbacks.epochs={_target_:lightning.pytorch.callbacks.ModelCheckpoint,"
                   "save_top_k:-1,every_n_epochs:1,filename:'{epoch}'}")
    train([*SHORT, every_epoch, f"hydra.run.dir={first}"], data_root, tmp_path)
    saved = first / "checkpoints" / "epoch=1.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == 20
    train([*SHORT, f"ckpt_path={saved}", f"hydra.run.dir={resumed}"], data_root, tmp_path)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after resuming from an epoch's end"


def test_ctrl_c_ends_with_status_130_and_says_where_to_resume(data_root, tmp_path):
    run = tmp_path / "run"
    args = ["trainer.max_steps=8", "callbacks.latest.every_n_train_steps=2", "logger=null", *QUICK,
            f"hydra.run.dir={run}"]
    proc = train([*args, kill_at(5, sig="SIGINT")], data_root, tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 130, out[-2000:]
    assert "stopped by SIGINT (Ctrl-C) at step 5" in out and "last.ckpt holds step 4" in out, out[-2000:]
    assert not (run / "metrics.json").exists(), "an interrupted run is neither finished nor failed"
    assert "(step 4)" in train(args, data_root, tmp_path).stdout  # and it resumes


def test_resume_never_sets_the_earlier_attempt_aside(trained_run, data_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    record, names = (run / "metrics.json").read_text(), checkpoint_names(run)
    # a config error first: the finished record stays as it was
    proc = train(["resume=never", "seed=-1", *QUICK, f"hydra.run.dir={run}"], data_root, tmp_path, check=False)
    assert proc.returncode == 1 and "seed must be between 0 and" in proc.stderr
    assert (run / "metrics.json").read_text() == record
    train(["resume=never", "trainer.max_steps=4", "logger=null", *QUICK, f"hydra.run.dir={run}"], data_root, tmp_path)
    (earlier,) = (run / "earlier").iterdir()
    assert (earlier / "metrics.json").read_text() == record, "the finished record is kept, whole"
    assert sorted(p.name for p in (earlier / "checkpoints").iterdir()) == names
    assert checkpoint_names(run) == names, "the new run's own files, no last-v1.ckpt beside an old last.ckpt"
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"


def test_a_run_killed_during_its_test_resumes_to_the_same_record(straight, data_root, tmp_path):
    """Killed after its last checkpoint (written after the final validation) and before its record,
    say during the test: the resumed process trains nothing and validates nothing, and its record
    still has the final val/neg_elbo, restored from the checkpoint (Lightning restores no metric)."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "metrics.json").unlink()
    proc = train([*SHORT, f"hydra.run.dir={run}"], data_root, tmp_path)
    assert "(step 30)" in proc.stdout
    before, after = (json.loads((d / "metrics.json").read_text()) for d in (straight, run))
    assert after["metrics"] == before["metrics"] and after["metrics"]["val/neg_elbo"] is not None
