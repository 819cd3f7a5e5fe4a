"""The command-line scripts run as users run them: in a subprocess, on a tiny run's checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from models.fingerprint import DIGEST_KEY, with_digest
from scripts.export import export
from scripts.trackio_delete import Run, matching_runs
from training.checkpoint import save_checkpoint
from training.errors import UserError
from training.inference import load_model, model_weights
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "denoising-zoo"
RUN_NAMES = ["sweep_0", "sweep_1", "sweep_10x", "smoke", "smoke"]  # trackio allows a repeated name


def run_script(name: str, *args: str, trackio_dir: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRACKIO_DIR": str(trackio_dir), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, f"scripts/{name}.py", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def python_in(trackio_dir: Path, code: str) -> str:
    """Run ``code`` in a fresh interpreter: trackio reads TRACKIO_DIR once, when it is imported."""
    env = {**os.environ, "TRACKIO_DIR": str(trackio_dir), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def assert_one_line_error(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr


@pytest.fixture
def checkpoint(make_cfg) -> Path:
    """last.pt of a 2-epoch run on moons (about 3 s)."""
    _, objects = train(make_cfg())
    return objects["checkpoint"]


# --- visualize_2d.py -------------------------------------------------------------------------


def test_visualize_writes_samples_trajectories_and_animation(checkpoint, tmp_path):
    done = run_script(
        "visualize_2d",
        str(checkpoint),
        "--solver",
        "heun",
        "--nfe",
        "8",
        "--num-samples",
        "300",
        "--points",
        "40",
        trackio_dir=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = checkpoint.parent / "viz"
    for name in ("samples.png", "trajectories.png", "flow.gif"):
        assert (out / name).stat().st_size > 0
    with Image.open(out / "flow.gif") as gif:
        assert gif.n_frames > 1


def test_visualize_refuses_a_solver_the_model_was_not_trained_for(checkpoint, tmp_path):
    """The flow-matching checkpoint predicts a velocity: MeanFlow's jumps would plot nonsense."""
    done = run_script("visualize_2d", str(checkpoint), "--solver", "meanflow", "--num-samples", "10",
                      trackio_dir=tmp_path)  # fmt: skip
    assert_one_line_error(done)
    assert "--solver meanflow samples average_velocity models; this one predicts velocity: use --solver" in done.stderr


@pytest.mark.parametrize("script", ["visualize_2d", "export"])
@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_missing_or_corrupt_checkpoint_is_a_one_line_error(script, case, tmp_path):
    path = tmp_path / "last.pt"
    if case == "corrupt":
        path.write_bytes(b"\x00 not a checkpoint" * 8)
    done = run_script(script, str(path), "--out", str(tmp_path / "out"), trackio_dir=tmp_path)
    assert_one_line_error(done)
    assert str(path) in done.stderr
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_config_are_a_user_error(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["model"]["hidden"] = 16
    bad = tmp_path / "bad.pt"
    save_checkpoint(state, bad)
    with pytest.raises(UserError, match="do not fit"):
        load_model(bad)


# --- export.py -------------------------------------------------------------------------------


def test_export_round_trips_the_ema_model(checkpoint, tmp_path):
    done = run_script("export", str(checkpoint), trackio_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    out = checkpoint.parent / "export_last"

    model = instantiate(OmegaConf.load(out / "config.yaml").model)
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    model.eval()
    reference, state = load_model(checkpoint)
    x, t = torch.randn(64, 2), torch.rand(64)
    with torch.no_grad():
        assert torch.equal(model(x, t, t), reference(x, t, t))
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {
            "step": str(state["step"]),
            "epoch": str(state["epoch"]),
            "weights": "ema",
            "format": state["format"],
            DIGEST_KEY: with_digest(load_file(out / "model.safetensors"))[DIGEST_KEY],
        }


def test_export_raw_writes_the_raw_weights(checkpoint, tmp_path):
    weights_path, _ = export(checkpoint, tmp_path / "raw", use_ema=False)
    state = torch.load(checkpoint, weights_only=True)
    exported = load_file(weights_path)
    assert exported.keys() == state["model"].keys()
    assert all(torch.equal(exported[k], v) for k, v in state["model"].items())
    # The EMA weights differ after training, so the EMA round trip above tests the right copy.
    ema = model_weights(state, use_ema=True)
    assert any(not torch.equal(ema[k], v) for k, v in state["model"].items())
    with safe_open(weights_path, "pt") as f:
        assert f.metadata()["weights"] == "raw"


# --- trackio_delete.py -----------------------------------------------------------------------


@pytest.fixture
def trackio_dir(tmp_path) -> Path:
    """A trackio store holding one logged run per name in RUN_NAMES."""
    store = tmp_path / "trackio"
    python_in(
        store,
        f"""
import trackio
for name in {RUN_NAMES!r}:
    trackio.init(project={PROJECT!r}, name=name, auto_log_cpu=False, auto_log_gpu=False)
    trackio.log({{"train/loss": 1.0}})
    trackio.finish()
""",
    )
    return store


def stored_runs(trackio_dir: Path) -> list[str]:
    """The run names in the store, read with trackio itself rather than the script under test."""
    code = (
        "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
        f"print(json.dumps(S.get_runs({PROJECT!r})))"
    )
    return json.loads(python_in(trackio_dir, code))


def test_list_shows_every_run(trackio_dir):
    done = run_script("trackio_delete", "--list", "--project", PROJECT, trackio_dir=trackio_dir)
    assert done.returncode == 0, done.stderr
    assert f"{len(RUN_NAMES)} runs" in done.stdout
    assert all(name in done.stdout for name in RUN_NAMES)


def test_dry_run_deletes_nothing(trackio_dir):
    done = run_script("trackio_delete", "sweep_.*", "--dry-run", trackio_dir=trackio_dir)
    assert done.returncode == 0, done.stderr
    assert "3 runs" in done.stdout
    assert sorted(stored_runs(trackio_dir)) == sorted(RUN_NAMES)


def test_yes_deletes_only_runs_whose_whole_name_matches(trackio_dir):
    done = run_script("trackio_delete", "sweep_[0-9]+|smoke", "--yes", trackio_dir=trackio_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("deleted ") == 4  # both runs named smoke go
    assert stored_runs(trackio_dir) == ["sweep_10x"]


@pytest.mark.parametrize(
    ("answer", "left"),
    [("n\n", RUN_NAMES), ("", RUN_NAMES), ("y\n", ["sweep_10x", "smoke", "smoke"])],
)
def test_prompt_deletes_only_on_yes(trackio_dir, answer, left):
    done = run_script("trackio_delete", "sweep_[0-9]", trackio_dir=trackio_dir, stdin=answer)
    assert "Delete 2 runs? [y/N]" in done.stdout
    assert done.returncode == (0 if answer.startswith("y") else 1), done.stderr
    assert sorted(stored_runs(trackio_dir)) == sorted(left)


def test_no_match_exits_1_and_invalid_regex_exits_2(trackio_dir):
    done = run_script("trackio_delete", "nothing.*", "--yes", trackio_dir=trackio_dir)
    assert done.returncode == 1 and "no run" in done.stdout
    assert_one_line_error(run_script("trackio_delete", "sweep_(", "--yes", trackio_dir=trackio_dir))
    assert_one_line_error(run_script("trackio_delete", "--list", "--project", "absent", trackio_dir=trackio_dir))
    assert sorted(stored_runs(trackio_dir)) == sorted(RUN_NAMES)


def test_matching_runs_uses_fullmatch():
    runs = [Run(name, None, None) for name in ("sweep_1", "sweep_1_long", "old_sweep_1")]
    assert [r.name for r in matching_runs("sweep_1", runs)] == ["sweep_1"]
    assert [r.name for r in matching_runs(".*sweep_1.*", runs)] == [
        "sweep_1",
        "sweep_1_long",
        "old_sweep_1",
    ]
    with pytest.raises(UserError, match="invalid regular expression"):
        matching_runs("[", runs)
