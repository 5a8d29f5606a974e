"""Safe to point at any file: a checkpoint is data, never code, and touches nothing outside its run
folder. Crafted checkpoints, each through the four ways a checkpoint is opened (scripts/evaluate.py,
scripts/gradient_study.py, scripts/train.py ckpt_path=, and a tampered last.ckpt under
resume=auto; each in this process): a pickled object that would create a marker file, a stored
config whose `_target_` would create it, OmegaConf interpolations that would build a hidden target
when resolved (a resolver, a reference to an unchecked key, a module written onto sys.path), and
checkpoint-callback state naming a file outside the folder for Lightning to delete. The marker
never appears and the outside file survives."""

from __future__ import annotations

import errno
import functools
import pathlib
import shutil

import pytest
import torch

from hydra import compose, initialize_config_dir

from conftest import REPO, load_script, shared_data_root, train_in
from discrete_vae import records
from discrete_vae.checkpoints import AtomicCheckpointIO
from discrete_vae.errors import UserError

@pytest.fixture
def trained(trained_run) -> pathlib.Path:
    """The shared finished 4-step run; checkpoints/last.ckpt is the base of every crafted file."""
    return trained_run


class Touch:
    """Unpickling this calls pathlib.Path.touch(marker): code run by merely loading the file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _path(p) -> str:
    return f"{{_target_: pathlib.Path, _args_: ['{p}']}}"


# a stored config whose strings are OmegaConf interpolations: resolving one builds what it names
INTERPOLATIONS = {
    # a resolver that builds a target hidden in a string: truncates the victim
    "resolver": lambda marker, victim: {"estimator": {
        "_target_": "discrete_vae.estimators.GumbelSoftmax",
        "tau": f"${{oc.create:{{_target_: pathlib.Path.write_text, _args_: [{_path(victim)}, '']}}}}"}},
    # a reference to a top-level key that the allowlist does not look at
    "reference": lambda marker, victim: {
        "estimator": {"_target_": "discrete_vae.estimators.GumbelSoftmax", "tau": "${evil}"},
        "evil": {"_target_": "pathlib.Path.touch", "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}]}},
    # a module written onto sys.path[0], then imported by a later target
    "module": lambda marker, victim: {"latent": {
        "_target_": "discrete_vae.latents.Categorical", "num_latents": 2,
        "num_categories": f"${{oc.create:{{_target_: pathlib.Path.write_text, _args_: "
                          f"[{_path(marker.parent / 'evil_module.py')}, 'import os']}}}}"}},
}

RUN_OF = {"train": "resumed", "tampered_last": "tampered"}  # the run folder each way trains in


def crafted(trained: pathlib.Path, route: str, tmp: pathlib.Path, way: str) -> tuple[dict, pathlib.Path, pathlib.Path]:
    """(checkpoint, marker, victim): the trained last.ckpt changed along one route."""
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    marker, victim = tmp / "marker", tmp / "victim.txt"
    victim.write_text("a colleague's file\n")
    if route == "pickle":
        checkpoint["extra"] = Touch(marker)
    elif route == "target":
        checkpoint["config"]["estimator"] = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
        checkpoint["config"]["data"]["_target_"] = "pathlib.Path.touch"
    elif route in INTERPOLATIONS:
        checkpoint["config"].update(INTERPOLATIONS[route](marker, victim))
    else:  # callback state naming a file outside the run folder, as the worst model: the next to go
        here = tmp / RUN_OF.get(way, "run") / "checkpoints"  # the folder it is restored into: Lightning trusts it
        outside = f"{here}/../../{victim.name}"
        for key, state in checkpoint["callbacks"].items():
            if key.startswith("ModelCheckpoint"):
                state.update(best_model_path=outside, kth_best_model_path=outside, dirpath=str(here),
                             best_model_score=torch.tensor(1e9), kth_value=torch.tensor(1e9),
                             best_k_models={outside: torch.tensor(1e9)})
            if key.startswith("LatestCheckpoint"):
                state.update(last_model_path=outside, dirpath=str(here))
    return checkpoint, marker, victim


class Ran:
    """What an in-process run of a script's function left: its exit status and its error line."""

    def __init__(self, fn):
        try:
            fn()
            self.returncode, self.stderr = 0, ""
        except UserError as err:  # what the script's entry point prints as its one line, with status 1
            self.returncode, self.stderr = 1, f"error: {err}"


def open_it(way: str, path: pathlib.Path, trained: pathlib.Path, tmp: pathlib.Path, monkeypatch):
    """Opens the checkpoint at `path` one of the four ways, each in this process (evaluate.py's and
    gradient_study.py's work, and the training as train.py runs it); returns what it left."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        if way == "evaluate":
            cfg = compose("evaluate", overrides=[f"ckpt_path={path}", "num_samples=2", "limit_batches=1"])
            return Ran(lambda: load_script("evaluate").run(cfg))
        if way == "gradient_study":
            cfg = compose("gradient_study", overrides=[
                f"ckpt_path={path}", "estimators=[sf]", "num_estimates=2", "batch_size=4", "timing_repeats=0",
                "reference.num_estimates=2", f"data.root={shared_data_root()}"])
            return Ran(lambda: load_script("gradient_study").study(cfg))
    if way == "train":
        return Ran(lambda: train_in(tmp / RUN_OF[way], monkeypatch, f"ckpt_path={path}"))
    run = tmp / RUN_OF[way]  # the run's own last.ckpt replaced, the run resumed as a sweep would
    shutil.copytree(trained, run)
    (run / "metrics.json").unlink()  # an unfinished run
    shutil.copy(path, run / "checkpoints" / "last.ckpt")
    return Ran(lambda: train_in(run, monkeypatch))


WAYS = ("evaluate", "gradient_study", "train", "tampered_last")


@pytest.mark.parametrize("route", ["pickle", "target", "path", *INTERPOLATIONS])
def test_a_crafted_checkpoint_runs_nothing_and_deletes_nothing(route, trained, tmp_path, monkeypatch):
    for way in WAYS:
        tmp = tmp_path / way
        tmp.mkdir()
        checkpoint, marker, victim = crafted(trained, route, tmp, way)
        path = tmp / "crafted.ckpt"
        torch.save(checkpoint, path)
        monkeypatch.chdir(tmp)  # the study writes its table into the working folder
        monkeypatch.setenv("DISCRETE_VAE_DATA", str(shared_data_root()))  # evaluate.py reads the data here too
        proc = open_it(way, path, trained, tmp, monkeypatch)
        assert not marker.exists(), f"{route} via {way}: the checkpoint ran code"
        assert victim.read_text() == "a colleague's file\n", f"{route} via {way}: a file outside the run was touched"
        assert "Traceback" not in proc.stderr, (route, way, proc.stderr[-2000:])
        assert not (tmp / "evil_module.py").exists(), f"{route} via {way}: a module was written"
        if route == "pickle":
            assert proc.returncode == 1 and "holds Python objects, and loading them could run code" in proc.stderr
        elif route == "target" and way in ("evaluate", "gradient_study"):
            assert proc.returncode == 1 and "estimator._target_='builtins.open'" in proc.stderr, proc.stderr[-2000:]
        elif route == "path":
            assert proc.returncode == 0, (way, proc.stderr[-2000:])
        elif route in INTERPOLATIONS:
            assert proc.returncode == 1 and "refused the checkpoint" in proc.stderr, (way, proc.stderr[-2000:])
            assert "is an interpolation" in proc.stderr or "_args_" in proc.stderr, proc.stderr[-2000:]


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """A full disk during a save (ENOSPC, simulated at the flush to disk): last.ckpt is the previous
    one, whole and loadable, and no temporary file is left beside it."""
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "weights": torch.ones(1000)}, path)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("config, problem", [
    ({"estimator": {"tau": "${oc.env:HOME}"}}, "config.estimator.tau='${oc.env:HOME}' is an interpolation"),
    ({"a": {"${x}": 1}}, "config.a has a key holding an interpolation"),
    ({"a": [1, {"b": "x ${y} z"}]}, "config.a[1].b='x ${y} z' is an interpolation"),
    ({"estimator": {"_target_": "x", "_args_": [1]}}, "config.estimator._args_=[1] is not a setting"),
    ({"estimator": {"_recursive_": False}}, "_recursive_=False is not a setting"),
    ({"model": {"_convert_": "anything"}}, "_convert_='anything' is not a setting"),
    ({"a": {1: 2}}, "config.a has a key that is not a string"),
    ({"a": b"bytes"}, "config.a holds a bytes, not plain data"),
    ({"a": functools.reduce(lambda tree, _: [tree], range(40), 0)}, "nested deeper than 32"),
])
def test_a_checkpoint_config_that_is_not_plain_data_is_named(config, problem):
    from discrete_vae.checkpoints import plain_data_problem

    assert problem in plain_data_problem(config, "config")


def test_the_config_train_writes_is_plain_data(trained):
    from discrete_vae.checkpoints import plain_data_problem

    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["config"]["model"]["_convert_"] == "all"
    for node in ("config", "choices", "hyper_parameters"):
        assert plain_data_problem(checkpoint[node], node) is None
