"""Every input a user can type gets one clear line naming the key and the fix, or a correct run:
the run's own keys and the Trainer's (discrete_vae.checks), the scripts' options, hand-edited
records, the environment (a stale RANK, a filesystem without locks, a symlinked lock file), and
nothing recorded is lost (a finished record is never replaced)."""

from __future__ import annotations

import errno
import json
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from conftest import REPO, load_script, run_script, tiny_module
from discrete_vae import estimators as E
from discrete_vae import records, report, training
from discrete_vae.checks import check_run, check_trainer
from discrete_vae.errors import ConfigError, RunFolderBusy

GOOD_RUN = {"seed": 0, "num_threads": None, "float32_matmul_precision": "high", "test": True, "num_images": 8,
            "ckpt_path": None}
GOOD_TRAINER = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "trainer" / "default.yaml"))


@pytest.mark.parametrize("key, value, message", [
    ("seed", "abc", "seed must be an integer"),
    ("seed", -1, "seed must be between 0 and 4294967295"),
    ("seed", 10**30, "seed must be between 0 and 4294967295"),
    ("num_threads", 0, "num_threads must be positive"),
    ("float32_matmul_precision", "ultra", "float32_matmul_precision='ultra' is not one of highest, high, medium"),
    ("test", "maybe", "test must be true or false"),
    ("num_images", -1, "num_images must be between 0 and 10000"),
    ("ckpt_path", 3, "ckpt_path must be a path"),
    ("val_iwae_samples", -2, "val_iwae_samples must be at least 0"),
    ("callbacks", {"checkpoint": {"monitor": "val/nll_iwae"}},
     "callbacks.checkpoint.monitor=val/nll_iwae is not logged by validation, which logs val/neg_elbo; set val_iwae"),
    ("callbacks", {"checkpoint": {"monitor": "val/elbo"}}, "monitor=val/elbo is not logged by validation"),
    ("callbacks", {"checkpoint": {"monitor": "train/los"}}, "monitor=train/los is not logged by validation"),
    ("optimzer", {"lr": 0.1}, r"optimzer is not a setting of conf/train.yaml \(did you mean optimizer\?\)"),
])
def test_the_runs_own_keys(key, value, message):
    check_run(GOOD_RUN)
    with pytest.raises(ConfigError, match=message):
        check_run({**GOOD_RUN, key: value})


def test_a_checkpoint_rule_on_the_validation_bound_is_accepted_with_its_samples():
    check_run({**GOOD_RUN, "val_iwae_samples": 5, "callbacks": {"checkpoint": {"monitor": "val/nll_iwae"}}})
    check_run({**GOOD_RUN, "callbacks": {"checkpoint": None}})  # no best checkpoint: nothing to check


@pytest.mark.parametrize("key, value, message", [
    ("log_every_n_steps", 0, "trainer.log_every_n_steps must be positive"),
    ("max_steps", -5, "trainer.max_steps must be at least -1"),
    ("max_epochs", "abc", "trainer.max_epochs must be an integer"),
    ("limit_train_batches", -1, "trainer.limit_train_batches must be at least 0"),
    ("limit_val_batches", 2.5, "trainer.limit_val_batches must be between 0.0 and 1.0"),
    ("val_check_interval", 0, "trainer.val_check_interval must be positive"),
    ("accumulate_grad_batches", 0, "trainer.accumulate_grad_batches must be positive"),
    ("gradient_clip_val", -1, "trainer.gradient_clip_val must be at least 0"),
    ("gradient_clip_algorithm", "max", "trainer.gradient_clip_algorithm='max' is not one of null, norm, value"),
    ("precision", "8-bit", "trainer.precision='8-bit' is not one of"),
    ("accelerator", "quantum", "trainer.accelerator='quantum' is not one of"),
    ("devices", 0, "trainer.devices must be positive"),
    ("num_sanity_val_steps", -5, "trainer.num_sanity_val_steps must be at least -1"),
    ("profiler", "fancy", "trainer.profiler='fancy' is not one of"),
    ("max_time", "soon", "trainer.max_time must be DD:HH:MM:SS"),
    ("enable_progress_bar", "yes", "trainer.enable_progress_bar must be true or false"),
    ("precision", "64-true", "trainer.precision=64-true is not supported"),
    ("precision", "16-true", "trainer.precision=16-true is not supported"),
    ("max_steps", 0, "trainer.max_steps=0 trains nothing"),
    ("max_epochs", 0, "trainer.max_epochs=0 trains nothing"),
])
def test_the_trainer_keys(key, value, message):
    check_trainer(GOOD_TRAINER)
    with pytest.raises(ConfigError, match=message):
        check_trainer({**GOOD_TRAINER, key: value})


def test_a_gpu_asked_for_where_there_is_none_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="torch sees no CUDA device here; use trainer.accelerator=cpu"):
        check_trainer({**GOOD_TRAINER, "accelerator": "gpu"})


def test_clipping_under_mixed_precision_trains_with_an_unfused_adam():
    """bf16-mixed with gradient clipping: Lightning refuses to clip for the fused Adam (it unscales
    its gradients itself), so the module does not force it then; the run trains."""
    model = tiny_module(E.StraightThrough(), input_dim=16)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", precision="bf16-mixed", gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=torch.ones(2, 4, 16))  # 2 batches of 4
    assert trainer.global_step == 2 and not trainer.optimizers[0].defaults.get("fused")
    plain = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    plain.fit(fused := tiny_module(E.StraightThrough(), input_dim=16), train_dataloaders=torch.ones(1, 4, 16))
    assert plain.optimizers[0].defaults.get("fused"), "without clipping the fused kernel is kept"
    del fused


def script_config(name: str):
    """conf/<name>.yaml as the script sees it: without Hydra's own nodes."""
    cfg = OmegaConf.load(REPO / "conf" / f"{name}.yaml")
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("defaults", "hydra")])


@pytest.mark.parametrize("key, value, message", [
    ("num_samples", True, "num_samples must be an integer, got True"),
    ("num_samples", 0, "num_samples must be positive"),
    ("batch_size", -1, "batch_size must be positive"),
    ("split", "dev", "split='dev' is not one of train, val, test"),
    ("seed", "abc", "seed must be an integer"),
    ("max_configs", 0, "max_configs must be positive"),
    ("limit_batches", 0, "limit_batches must be positive"),
    ("max_rows", 0, "max_rows must be positive"),
    ("data_root", str(REPO / "README.md"), "data_root=.*README.md is a file"),
    ("output", str(REPO), "output=.* is a folder"),
    ("max_configs", 10**13, "max_configs must be at most 1048576"),
    ("max_configs", 10**30, "max_configs must be at most 1048576"),
    ("num_sample", 10, r"num_sample is not a setting of conf/evaluate.yaml \(did you mean num_samples\?\)"),
])
def test_evaluate_options(key, value, message):
    cfg = script_config("evaluate")
    cfg.ckpt_path = "x.ckpt"
    evaluate = load_script("evaluate")
    evaluate.check_options(cfg)
    cfg[key] = value
    with pytest.raises(ConfigError, match=message):
        evaluate.check_options(cfg)


@pytest.mark.parametrize("key, value, message", [
    ("temperature", 0, "temperature must be positive"),
    ("temperature", -1, "temperature must be positive"),
    ("num_estimates", 1, "num_estimates must be at least 2"),
    ("batch_size", 0, "batch_size must be positive"),
    ("timing_repeats", -1, "timing_repeats must be at least 0"),
    ("chunk_size", 0, "chunk_size must be positive"),
    ("num_threads", 0, "num_threads must be positive"),
    ("warm_baseline", "maybe", "warm_baseline must be true or false"),
    ("warm_control_variate", -1, "warm_control_variate must be at least 0"),
    ("ckpt_path", "/nowhere.ckpt", "no checkpoint at /nowhere.ckpt"),
    ("estimators", [], r"estimators=\[\] names no estimator to study"),
    ("estimator_options", {"bogus": {"tau": 1}}, r"estimator_options.bogus: no estimator is called bogus; choose"),
    ("estimator_options", {"gumbell": {"tau": 1}}, r"no estimator is called gumbell \(did you mean gumbel\?\)"),
    ("reference", {"max_configs": 10**13, "num_estimates": 10, "num_samples": 10},
     "reference.max_configs must be at most 1048576"),
    ("num_estimate", 10, "num_estimate is not a setting of conf/gradient_study.yaml \\(did you mean num_estimates"),
])
def test_gradient_study_options(key, value, message):
    cfg = script_config("gradient_study")
    study = load_script("gradient_study")
    study.check_options(cfg)
    cfg[key] = value
    with pytest.raises(ConfigError, match=message):
        study.check_options(cfg)


# -- records: never lost, never a traceback -----------------------------------------------------
FINISHED = {"status": "finished", "metrics": {"val/neg_elbo": 100.0, "test/neg_elbo": 101.0}, "steps": 10,
            "wall_time_s": 60.0, "overrides": ["estimator=st_gumbel", "seed=1"], "seed": 1, "estimator": "st_gumbel"}


@pytest.mark.parametrize("edit", [
    lambda r: "{not json",
    lambda r: "[1, 2]",
    lambda r: json.dumps({k: v for k, v in r.items() if k != "status"}),
    lambda r: json.dumps({**r, "status": "done"}),
    lambda r: json.dumps({**r, "metrics": [1, 2]}),
    lambda r: json.dumps({**r, "metrics": {"val/neg_elbo": "low"}}),
    lambda r: json.dumps({**r, "steps": "ten"}),
    lambda r: json.dumps({**r, "wall_time_s": "1 h"}),
    lambda r: json.dumps({**r, "overrides": "estimator=sf"}),
    lambda r: json.dumps({**r, "evaluation": {"metrics": None}}),
])
def test_report_lists_a_broken_record_with_its_problem(tmp_path, edit):
    good, broken = tmp_path / "sweep" / "good", tmp_path / "sweep" / "broken"
    for folder in (good, broken):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(FINISHED))
    (broken / "metrics.json").write_text(edit(FINISHED))
    (broken / "val_curve.csv").write_text("step,val/neg_elbo\nten,abc\n")  # a damaged curve, too
    rows = report.report(tmp_path / "sweep")
    text = (tmp_path / "sweep" / "report.md").read_text()
    assert "not a valid run record" in text and "fix or delete it" in text
    assert sum(row["n_seeds"] for row in rows) == 1 and sum(row["n_failed"] for row in rows) == 1


def test_the_record_names_its_run_whatever_hydra_rewrote(tmp_path):
    """A later, skipped command with other overrides rewrites .hydra/overrides.yaml; the record wins."""
    run = tmp_path / "sweep" / "st_gumbel,seed=1"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- estimator=gumbel\n- seed=1\n")
    (run / "metrics.json").write_text(json.dumps(FINISHED))
    (run / "earlier" / "2026-01-01_00-00-00").mkdir(parents=True)  # an attempt set aside: not a run
    (run / "earlier" / "2026-01-01_00-00-00" / "metrics.json").write_text(json.dumps(FINISHED))
    (found,) = report.find_runs(tmp_path / "sweep")
    assert found.estimator == "st_gumbel" and found.overrides == FINISHED["overrides"]


def test_a_finished_record_is_never_replaced(tmp_path, caplog):
    (tmp_path / "metrics.json").write_text(json.dumps(FINISHED))
    cfg = OmegaConf.create({"seed": 1, "trainer": {"accelerator": "cpu"}})
    with caplog.at_level(logging.WARNING):
        training.write_record(cfg, tmp_path, 0.0, status="failed", metrics={}, error="ConfigError: seed")
    assert json.loads((tmp_path / "metrics.json").read_text()) == FINISHED
    assert "kept the finished record" in caplog.text


# -- the environment ---------------------------------------------------------------------------
def test_a_stale_rank_does_not_make_a_single_process_run_a_worker(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(rank_zero_only, "rank", 3)  # what Lightning read from the environment at import
    training.forget_stale_rank({"devices": 2, "num_nodes": 1})
    assert rank_zero_only.rank == 3, "a data-parallel run keeps its rank"
    training.forget_stale_rank({"devices": 1, "num_nodes": 1})
    assert rank_zero_only.rank == 0


def test_the_lock_goes_on_without_flock_and_refuses_a_symlink(tmp_path, monkeypatch, caplog):
    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(training.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING), training.run_folder_lock(tmp_path / "run"):
        pass
    assert "going on without the guard" in caplog.text
    monkeypatch.undo()
    (tmp_path / "victim").write_text("keep\n")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / training.LOCK_FILE).symlink_to(tmp_path / "victim")
    with pytest.raises(RunFolderBusy, match="symlink or not writable"), training.run_folder_lock(tmp_path / "linked"):
        pass
    assert (tmp_path / "victim").read_text() == "keep\n"


def test_git_describe_runs_without_the_checkouts_fsmonitor(monkeypatch):
    seen = []
    monkeypatch.setattr(records.subprocess, "run", lambda args, **kw: seen.append(args) or
                        type("Done", (), {"returncode": 0, "stdout": "abc1234\n"})())
    records.source_commit.cache_clear()
    assert records.source_commit() == "abc1234"
    assert seen[0][:3] == ["git", "-c", "core.fsmonitor=false"]
    # once per process: a multirun's later jobs record the commit of the code they run
    assert records.source_commit() == "abc1234" and len(seen) == 1
    records.source_commit.cache_clear()


@pytest.mark.parametrize("overrides, message", [
    (["model.activation=LeakyReLU", "+model.activation_args.slope=0.3"],
     r"model.activation_args=\{'slope': 0.3\} do not fit torch.nn.LeakyReLU"),
    (["model.activation_args=3"], "model.activation_args must be a mapping"),
    (["model=sbn", "model.activation_args=3"], "model.activation_args must be a mapping"),  # checked where used
    (["latent=bernoulli", "+latent.num_categories=3"],
     "latent.num_categories is not a setting of discrete_vae.latents.Bernoulli; remove it"),
    (["estimator=rebar", "estimator.learn=maybe"], "estimator.learn must be true or false"),
    (["estimator=relax", "estimator.hidden=0"], "estimator.hidden must be positive"),
    (["estimator=relax", "estimator.hidden=1000000000000"], "estimator.hidden must be at most 16384"),
    (["+optimizer.lrr=0.1"], "optimizer.lrr is not a setting of torch.optim.Adam; remove it"),
    (["model.activation=Module"], "model.activation='Module' is not a torch.nn activation"),
    (["model.activation=Linear"], "model.activation='Linear' is not a torch.nn activation"),
    (["estimator=exact", "latent.num_latents=400"], "enumerates about 10\\^400 configurations"),
    (["estimator=exact", "estimator.max_configs=10000000000000"], "estimator.max_configs must be at most 1048576"),
])
def test_model_and_estimator_settings_are_one_line(overrides, message):
    from hydra import compose, initialize_config_dir

    from discrete_vae.build import build_module

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with pytest.raises(ConfigError, match=message):
        build_module(cfg)


def test_half_precision_on_a_cpu_is_refused_not_quietly_replaced(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_trainer({**GOOD_TRAINER, "precision": "bf16-mixed"})
    with pytest.raises(ConfigError, match="trainer.precision=16-mixed needs a CUDA GPU"):
        check_trainer({**GOOD_TRAINER, "precision": "16-mixed"})


def test_a_validation_interval_longer_than_an_epoch_is_one_line():
    from discrete_vae.checks import check_validation_interval

    check_validation_interval({"val_check_interval": 500, "check_val_every_n_epoch": 1}, 500)
    check_validation_interval({"val_check_interval": 5000, "check_val_every_n_epoch": None}, 500)
    with pytest.raises(ConfigError, match="val_check_interval=501 steps is longer than an epoch \\(500 batches\\)"):
        check_validation_interval({"val_check_interval": 501, "check_val_every_n_epoch": 1}, 500)


@pytest.mark.parametrize("name, message", [
    ("meta", "device=meta is not one this script computes on"),
    ("mps", "device=mps but this machine has no Apple GPU"),
    ("cuda:7", "device=cuda:7 but CUDA is not available here"),
    ("quantum", "device='quantum' is not a device"),
])
def test_a_device_that_is_not_there_is_one_line(name, message, monkeypatch):
    from discrete_vae.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match=message):
        resolve_device(name)


def test_an_output_folder_that_is_a_file_stops_before_hydra(tmp_path):
    from discrete_vae.cli import normalize_overrides

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert normalize_overrides([f"hydra.run.dir={tmp_path}/new"]) == [f"hydra.run.dir={tmp_path}/new"]
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        with pytest.raises(SystemExit, match=f"error: {key}={afile} is a file"):
            normalize_overrides(["train.py", f"{key}={afile}"])


def test_an_unwritable_output_is_refused_before_the_work(tmp_path):
    from discrete_vae.checks import require_writable_folder

    assert require_writable_folder("output", tmp_path / "new" / "deeper").is_dir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="output: cannot write into .*afile/sub"):
        require_writable_folder("output", tmp_path / "afile" / "sub")


def test_a_checkpoint_that_cannot_be_read_says_so_not_truncated(tmp_path, monkeypatch):
    from discrete_vae.checkpoints import read_checkpoint
    from discrete_vae.errors import DataError

    path = tmp_path / "x.ckpt"
    path.write_bytes(b"PK")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(DataError, match="cannot read the checkpoint .*: permission denied; give this user read"):
        read_checkpoint(path)


@pytest.mark.parametrize("args, line", [
    (["estimator=gumbell"], "error: estimator=gumbell is not an option (did you mean gumbel?); choose from arm, "),
    (["trainer.max_step=100"], "error: trainer.max_step is not a setting (did you mean trainer.max_steps?); correct"),
    (["model.hidden_dim=3"], "error: model.hidden_dim is not a setting (did you mean model.hidden_dims?)"),
    (["estimator=sf,st"], "error: estimator=sf,st gives several values: add -m to run one job for each (python "
                          "train.py -m estimator=sf,st)"),
    (["+optimzer.lr=0.1"], "error: optimzer is not a setting of conf/train.yaml (did you mean optimizer?)"),
])
def test_hydras_mistakes_are_one_line_with_the_closest_name(args, line, tmp_path):
    proc = run_script("train.py", *args, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(line) and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_hydra_full_error_still_gives_the_whole_trace(tmp_path):
    proc = run_script("train.py", "estimator=gumbell", env={"HYDRA_FULL_ERROR": "1"}, check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "Could not find 'estimator/gumbell'" in proc.stderr


def test_the_summary_a_run_ends_with_is_rounded_for_a_person(tmp_path):
    from discrete_vae.cli import run_summary_lines

    record = {"status": "finished", "steps": 50000, "wall_time_s": 1234.5,
              "metrics": {"val/neg_elbo": 105.123456, "test/neg_elbo": 104.98765, "test/nll_iwae": None}}
    assert run_summary_lines(record, tmp_path) == [
        f"finished: {tmp_path} (50,000 steps, 20.6 min)",
        "  val/neg_elbo 105.12  test/neg_elbo 104.99  (nats per image)",
        f"  tensorboard --logdir {tmp_path}",
    ]


def test_the_hparams_tab_holds_the_keys_that_define_a_run():
    from discrete_vae.training import run_hparams

    config = {"seed": 2, "latent": {"_target_": "discrete_vae.latents.Categorical", "num_latents": 20},
              "optimizer": {"lr": 0.001, "_partial_": True}, "data": {"batch_size": 100, "root": "/data"},
              "trainer": {"max_steps": 500, "log_every_n_steps": 50}, "model": {"hidden_dims": [512, 256]},
              "resume": "auto"}
    summary = {"choices": {"estimator": "gumbel", "latent": "categorical"},
               "overrides": ["estimator=gumbel", "trainer.max_steps=500", "data.root=/data", "seed=2"]}
    assert run_hparams(config, summary) == {
        "seed": 2, "latent/_target_": "discrete_vae.latents.Categorical", "latent/num_latents": 20,
        "optimizer/lr": 0.001, "data/batch_size": 100, "trainer/max_steps": 500,
        "choice/estimator": "gumbel", "choice/latent": "categorical"}
