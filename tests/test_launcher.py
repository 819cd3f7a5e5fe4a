"""The launcher as a user runs it: a subprocess with command-line overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import SMALL_RUN

from launcher import check_group_options

ROOT = Path(__file__).resolve().parents[1]
SMALL = [*SMALL_RUN, "dataloaders.num_train=512"]


def launch(tmp_path: Path, *args: str, trackio: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}
    paths = [f"paths.root={tmp_path}/outputs", f"paths.experiment_log={tmp_path}/EXPERIMENT_LOG.md"]
    extra = [] if trackio else ["trackio.enabled=false"]
    return subprocess.run(
        [sys.executable, "launcher.py", *args, *paths, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_run_name_is_a_one_line_error(tmp_path):
    out = launch(tmp_path, *SMALL)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: run_name is required: add run_name=<name> (it names the checkpoint folder, trackio run and log entry)"
    ]
    assert not (tmp_path / "outputs" / "ckpts").exists()


def test_unknown_group_option_lists_the_valid_ones(tmp_path):
    out = launch(tmp_path, "run_name=x", "model=transformer")
    assert out.returncode == 2
    line = out.stderr.strip()
    assert line.startswith("error: unknown model option 'transformer'; valid options: ") and "\n" not in line
    assert "mlp" in line.split("valid options: ")[1].split(", ")


def test_check_group_options_reads_sweeps_and_ignores_values():
    assert check_group_options(["loss=fm,fm_ot", "optimizer.lr=1e-3", "seed=1,2"]) is None
    assert "unknown solver option 'rk5'" in check_group_options(["-m", "solver=euler,rk5"])
    assert "unknown eval/fid option 'cifar100'" in check_group_options(["eval/fid=cifar100"])  # nested groups too


def test_help_lists_groups(tmp_path):
    out = subprocess.run(
        [sys.executable, "launcher.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    for group in ("dataloaders", "model", "loss", "solver", "precision"):
        assert f"{group}:" in out.stdout


def trackio_cli(tmp_path: Path, *args: str) -> str:
    exe = str(Path(sys.executable).parent / "trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=120, check=True).stdout


def test_run_logs_to_trackio_and_the_cli_reads_it_back(tmp_path):
    out = launch(tmp_path, "run_name=tracked", *SMALL, trackio=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "energy distance" in out.stdout and "nfe2" in out.stdout
    read = trackio_cli(
        tmp_path,
        "get",
        "metric",
        "--project",
        "denoising-zoo",
        "--run",
        "tracked",
        "--metric",
        "eval/energy_distance@nfe2",
        "--json",
    )
    values = json.loads(read)["values"]
    assert len(values) == 1 and values[0]["step"] == 4 and values[0]["value"] > 0
    # starting the run over replaces its trackio run instead of adding a second one of the same name
    again = launch(tmp_path, "run_name=tracked", "overwrite=true", *SMALL, trackio=True)
    assert again.returncode == 0, again.stderr[-2000:]
    runs = json.loads(trackio_cli(tmp_path, "list", "runs", "--project", "denoising-zoo", "--json"))
    assert runs["runs"] == ["tracked"]


def test_multirun_sweep_of_four_runs(tmp_path):
    out = launch(tmp_path, "-m", "run_name=sweep", "loss=fm,fm_ot", "seed=0,1", *SMALL)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = sorted((tmp_path / "outputs" / "multirun").glob("*/*/metrics.json"))
    assert len(metrics) == 4
    ckpts = sorted(p.name for p in (tmp_path / "outputs" / "ckpts" / "mlp").iterdir())
    assert ckpts == ["sweep_0", "sweep_1", "sweep_2", "sweep_3"]  # each job its own checkpoint folder
    log = (tmp_path / "EXPERIMENT_LOG.md").read_text()
    assert all(f"sweep_{i} · completed" in log for i in range(4))
    assert "loss=fm_ot" in log and "seed=1" in log
