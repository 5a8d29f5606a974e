"""A run folder or a checkpoint that scripts/train.py cannot have written is refused in one line,
before anything runs: planted places in the run folder (a last.ckpt that is a folder, a link or a
device; checkpoints/ or earlier/ linked elsewhere; a lock file that is a FIFO), and a checkpoint
whose state is implausible (weights that are not finite or do not fit its config, a step count
or a wall clock it cannot have, a config without its parts, an uncapped RELAX network).

Everything here runs in this process: scripts/evaluate.py's `run`, and discrete_vae.training's
`train` in the run folder as its working directory (what scripts/train.py calls under Hydra)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, error_of, load_script, train_in


@pytest.fixture
def run(trained_run, tmp_path) -> pathlib.Path:
    """A copy of the shared finished run, made unfinished (no metrics.json): resume=auto resumes it."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, symlinks=True)
    (copy / "metrics.json").unlink()
    return copy


# -- the run folder -------------------------------------------------------------------------------
def plant(run: pathlib.Path, what: str, outside: pathlib.Path) -> None:
    last = run / "checkpoints" / "last.ckpt"
    if what == "last_is_a_folder":
        last.unlink()
        last.mkdir()
    elif what == "last_is_a_link_loop":
        last.unlink()
        last.symlink_to(last)
    elif what == "last_links_to_dev_zero":
        last.unlink()
        last.symlink_to("/dev/zero")
    elif what in ("checkpoints", "earlier"):  # the folder linked to one outside the run
        if (run / what).exists():
            shutil.rmtree(run / what)
        (run / what).symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize("what, message", [
    ("last_is_a_folder", "last.ckpt is a folder, not a checkpoint file"),
    ("last_is_a_link_loop", "last.ckpt is a symlink, not a checkpoint file"),
    ("last_links_to_dev_zero", "last.ckpt is a symlink, not a checkpoint file"),
    ("checkpoints", "checkpoints is a symlink, not a folder of the run's own"),
    ("earlier", "earlier is a symlink, not a folder of the run's own"),
])
def test_a_planted_run_folder_is_refused_and_nothing_moves(what, message, run, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "last.ckpt").write_bytes(b"someone else's file")
    plant(run, what, outside)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert message in error_of(lambda: train_in(run, monkeypatch))
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing moved out, nothing in
    assert sorted(p.name for p in outside.iterdir()) == ["last.ckpt"]
    assert (outside / "last.ckpt").read_bytes() == b"someone else's file"


def test_a_lock_file_that_is_a_fifo_is_refused_without_blocking(run, monkeypatch):
    (run / ".training.lock").unlink(missing_ok=True)
    os.mkfifo(run / ".training.lock")
    assert "the lock file" in error_of(lambda: train_in(run, monkeypatch))
    assert "not a regular file" in error_of(lambda: train_in(run, monkeypatch))


# -- a checkpoint's state -----------------------------------------------------------------------
def _first_weight(checkpoint: dict) -> str:
    return next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and v.dim() == 2)


def craft(checkpoint: dict, what: str) -> None:
    state, config = checkpoint["state_dict"], checkpoint["config"]
    key = _first_weight(checkpoint)
    if what == "nan_weights":
        state[key] = state[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    elif what == "huge_step":
        checkpoint["global_step"] = 10**12
    elif what == "edited_step":
        checkpoint["global_step"] += 1000
    elif what in ("negative_clock", "text_clock"):
        checkpoint["callbacks"]["WallClock"]["elapsed_s"] = -5.0 if what == "negative_clock" else "an hour"
    elif what == "size_mismatch":
        state[key] = torch.zeros(3, 3)
    elif what == "missing_weight":
        del state[key]
    elif what == "not_a_tensor":
        state[key] = "weights"
    elif what in ("no_estimator", "no_model"):
        del config[what[3:]]
    elif what == "estimator_a_string":
        config["estimator"] = "gumbel"
    elif what == "relax_network_uncapped":
        config["estimator"] = {"_target_": "discrete_vae.estimators.RELAX", "hidden": 10**12}


CASES = {
    "nan_weights": "holds NaN or infinite values",
    "huge_step": "global_step=1000000000000 is not a whole number of steps",
    "edited_step": "disagrees with the 4 optimizer steps its training loop recorded",
    "negative_clock": "WallClock.elapsed_s=-5.0) is not a finite, non-negative number",
    "text_clock": "WallClock.elapsed_s=an hour) is not a finite, non-negative number",
    "size_mismatch": "of shape (3, 3), its config's model",
    "missing_weight": "has no weight",
    "not_a_tensor": "is a str, not a tensor",
    "no_estimator": "its config has no estimator node",
    "no_model": "its config has no model node",
    "estimator_a_string": "its config has no estimator node with a _target_ (got 'gumbel')",
    "relax_network_uncapped": "estimator.hidden must be",
}


@pytest.mark.parametrize("what", CASES)
def test_an_implausible_checkpoint_is_refused_in_one_line(what, trained_run, tmp_path, monkeypatch):
    """Through scripts/evaluate.py (in this process), and for two of them through a resume."""
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    craft(checkpoint, what)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    monkeypatch.setenv("DISCRETE_VAE_DATA", str(trained_run.parent))  # no data is read before the refusal
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt_path={path}", "num_samples=2", "limit_batches=1"])
    message = error_of(lambda: load_script("evaluate").run(cfg))
    assert CASES[what] in message, message
    assert not list(tmp_path.glob("*_eval_*.json"))  # no result written


@pytest.mark.parametrize("what", ["nan_weights", "edited_step", "size_mismatch"])
def test_a_resume_from_an_implausible_last_ckpt_is_refused_and_keeps_it(what, run, monkeypatch):
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    craft(checkpoint, what)
    torch.save(checkpoint, last)
    crafted = last.read_bytes()
    message = error_of(lambda: train_in(run, monkeypatch))
    assert CASES[what] in message and str(last) in message, message
    assert last.read_bytes() == crafted  # kept as it was, for the user to look at


@pytest.mark.parametrize("position", [{"epoch": 0, "consumed": 10**9}, {"epoch": -1, "consumed": 0},
                                      {"epoch": 0, "consumed": "4"}])
def test_a_data_position_past_the_epoch_is_refused_on_resume(position, run, monkeypatch):
    """A data position no epoch reaches (with the step count consistent): the resume stops in one
    line at the restore, and records no steps it did not train."""
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] = [{**position, "seed": 0}]
    torch.save(checkpoint, last)
    message = error_of(lambda: train_in(run, monkeypatch))
    assert "is not one an epoch of 500 batches can reach" in message, message
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"


def test_an_explicit_ckpt_path_in_a_finished_run_folder_is_refused_not_ignored(trained_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    record = (run / "metrics.json").read_text()
    message = error_of(lambda: train_in(run, monkeypatch, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                                        "trainer.max_steps=8"))
    assert "holds a run that is already finished (metrics.json), so ckpt_path=" in message
    assert "hydra.run.dir=NEW ckpt_path=" in message and "resume=never" in message
    assert (run / "metrics.json").read_text() == record


def test_a_skipped_finished_run_names_what_the_rerun_asks_differently(trained_run, tmp_path, monkeypatch, capsys):
    """The quick-check limits do not name a sweep's folders, so a rerun that changes one lands in the
    finished folder: it is skipped, and the line says which setting the record was made with."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    record = (run / "metrics.json").read_text()
    done = train_in(run, monkeypatch, "trainer.max_steps=4", "trainer.limit_val_batches=2")
    assert done["status"] == "finished" and (run / "metrics.json").read_text() == record
    err = capsys.readouterr().err
    assert "already finished (metrics.json): skipped although" in err, err
    assert "trainer.limit_val_batches=2 (the record: 1)" in err, err
    assert "trainer.max_steps" not in err  # what agrees is not listed
