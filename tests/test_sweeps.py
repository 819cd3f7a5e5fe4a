"""Sweeps as a user runs them (-m, joblib, Optuna): every job's outputs, the summary, failed jobs."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launcher import CONFIG_DIR, check_override_keys, objective, submit_remote, translate_flags, worst_objective
from tests.test_launcher import SMALL, launch, trackio_cli
from training.errors import UserError
from training.sweep_summary import FAILED_FILE

OBJECTIVE = "eval/energy_distance@nfe2"  # SMALL evaluates at NFE 2 only


def sweep_dir(tmp_path: Path) -> Path:
    (found,) = (tmp_path / "outputs" / "multirun").iterdir()
    return found


def summary_rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def test_joblib_runs_jobs_in_parallel_processes_that_share_trackio(tmp_path):
    out = launch(
        tmp_path,
        "-m",
        "run_name=par",
        "seed=0,1",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *SMALL,
        trackio=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    sweep = sweep_dir(tmp_path)
    assert len(list(sweep.glob("*/metrics.json"))) == 2
    assert f"sweep summary: {sweep}/summary.md" in out.stdout
    rows = summary_rows(sweep)
    assert [(r["job"], r["run_name"], r["status"], r["overrides"]) for r in rows] == [
        ("0", "par_0", "completed", "seed=0"),
        ("1", "par_1", "completed", "seed=1"),
    ]
    assert all(float(r[OBJECTIVE]) > 0 and float(r["train/final_loss"]) > 0 for r in rows)
    # both processes wrote to the one trackio SQLite database (trackio locks it across processes)
    runs = json.loads(trackio_cli(tmp_path, "list", "runs", "--project", "denoising-zoo", "--json"))["runs"]
    assert sorted(runs) == ["par_0", "par_1"]
    for run in runs:
        read = trackio_cli(
            tmp_path, "get", "metric", "--project", "denoising-zoo", "--run", run, "--metric", OBJECTIVE, "--json"
        )
        assert len(json.loads(read)["values"]) == 1


def test_optuna_search_minimises_the_optimized_metric(tmp_path):
    out = launch(
        tmp_path,
        "hparams_search=moons_optuna",  # sets hydra.mode=MULTIRUN itself: no -m
        "run_name=hp",
        "hydra.sweeper.n_trials=3",
        f"optimized_metric={OBJECTIVE}",
        *SMALL,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    sweep = sweep_dir(tmp_path)
    jobs = sorted(sweep.glob("*/metrics.json"))
    assert len(jobs) == 3
    values = [json.loads(p.read_text())[OBJECTIVE] for p in jobs]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(values))
    assert set(results["best_params"]) == {"optimizer.lr", "loss"}  # model.hidden is fixed by SMALL
    assert [r["run_name"] for r in summary_rows(sweep)] == ["hp_0", "hp_1", "hp_2"]
    assert f"Best {OBJECTIVE} (lowest)" in (sweep / "summary.md").read_text()
    assert "setup plugin" not in out.stdout + out.stderr  # Optuna's alembic announced its plugins before any job


@pytest.mark.slow
def test_hydra_verbose_brings_the_plugin_set_up_lines_back(tmp_path):
    out = launch(tmp_path, "hparams_search=moons_optuna", "run_name=hpv", "hydra.sweeper.n_trials=1",
                 f"optimized_metric={OBJECTIVE}", "hydra.verbose=alembic", *SMALL)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "setup plugin alembic.autogenerate.schemas" in out.stdout


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    out = launch(tmp_path, "-m", "run_name=mix", *SMALL, "model.hidden=16,-1")  # SMALL's hidden=16, then this
    assert out.returncode == 1, out.stderr[-2000:]
    sweep = sweep_dir(tmp_path)
    assert (sweep / "0_mix" / "metrics.json").exists() and not (sweep / "0_mix" / FAILED_FILE).exists()
    error = (sweep / "1_mix" / FAILED_FILE).read_text().strip()
    assert error.startswith("model config is invalid: ") and "\n" not in error
    rows = summary_rows(sweep)
    assert [(r["status"], r["overrides"], r["error"]) for r in rows] == [
        ("completed", "model.hidden=16", ""),
        ("failed", "model.hidden=-1", error),
    ]
    assert f"- job 1 (mix_1): {error}" in (sweep / "summary.md").read_text()
    assert f"error: job 1 (mix_1) failed: {error}" in out.stderr.splitlines()


def test_submitit_jobs_pickle_and_report_like_local_ones(tmp_path):
    """submitit_local: the code path of the SLURM preset, with jobs as local processes."""
    out = launch(tmp_path, "-m", "run_name=sub", "seed=0,1", "hydra/launcher=submitit_local", *SMALL)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = summary_rows(sweep_dir(tmp_path))
    assert [(r["run_name"], r["status"]) for r in rows] == [("sub_0", "completed"), ("sub_1", "completed")]


def test_slurm_preset_is_submitit_with_cluster_placeholders():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min > 0
    assert {"cpus_per_task", "mem_gb", "account", "setup"} <= set(launcher)


def test_a_misspelt_sweep_key_fails_before_any_job(tmp_path):
    out = launch(tmp_path, "-m", "run_name=typo", "optimizer.lrr=1e-3,1e-2", *SMALL)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: optimizer.lrr=1e-3,1e-2 names no config key 'optimizer.lrr'; did you mean optimizer.lr? "
        "(+optimizer.lrr=... adds a new key)"
    )
    assert not (tmp_path / "outputs").exists()


def test_check_override_keys_composes_the_chosen_groups():
    assert check_override_keys(["run_name=x", "loss=fm,meanflow", "loss.ratio=0.5", "+new.key=1"]) is None
    assert check_override_keys(["model=cnn,mlp", "model.hidden=8"]) is None  # a key of one option of a group sweep
    assert check_override_keys(["experiment=moons_ot", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]) is None
    assert check_override_keys(["hparams_search=moons_optuna"]) is None  # its search space's keys exist
    assert "'lr'; did you mean optimizer.lr?" in check_override_keys(["lr=1e-3"])  # same last name
    assert "'model.hiden'; did you mean model.hidden?" in check_override_keys(["model=unet,mlp", "model.hiden=3"])


def test_objective_is_the_optimized_metric_or_the_first_energy_distance():
    metrics = {"train/final_loss": 2.0, "eval/energy_distance@nfe1": 0.5, "eval/energy_distance@nfe4": 0.1}
    assert objective(metrics, None) == 0.5
    assert objective(metrics, "eval/energy_distance@nfe4") == 0.1
    with pytest.raises(UserError, match="did you mean eval/energy_distance@nfe4"):
        objective(metrics, "eval/energy_distance@nfe40")
    assert worst_objective("minimize") == math.inf and worst_objective("Direction.maximize") == -math.inf
    assert worst_objective(None) is None  # the basic sweeper ignores what a job returns


def test_backend_flag_becomes_an_override():
    assert translate_flags(["--backend", "modal", "run_name=x"]) == ["backend=modal", "run_name=x"]
    assert translate_flags(["-m", "--backend=modal", "seed=0,1"]) == ["-m", "backend=modal", "seed=0,1"]
    assert translate_flags(["--backend", "modal", "--detach", "run_name=x"]) == [
        "backend=modal",
        "backend.detach=true",
        "run_name=x",
    ]
    assert translate_flags(["run_name=x", "--backend"]) == ["run_name=x", "--backend"]  # Hydra rejects it


def test_modal_backend_gets_the_overrides_without_backend_keys(monkeypatch):
    """Without training/modal_backend.py: a stand-in module, then none at all."""
    submitted: list[list[str]] = []

    def submit_run(cfg, overrides):
        submitted.append(overrides)
        return 0

    monkeypatch.setitem(sys.modules, "training.modal_backend", SimpleNamespace(submit_run=submit_run))
    cfg = OmegaConf.create({"run_name": "sweep_1"})
    overrides = ["run_name=sweep", "backend=modal", "backend.gpu=H100", "seed=1"]
    assert submit_remote(cfg, overrides) == 0
    assert submitted == [["run_name=sweep_1", "seed=1"]]  # a sweep job's own run_name

    monkeypatch.setitem(sys.modules, "training.modal_backend", None)  # makes the import fail
    with pytest.raises(UserError, match=r"^backend=modal is unavailable here \(.*\); install modal or use backend="):
        submit_remote(cfg, overrides)
