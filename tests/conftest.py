"""Shared fixtures: configs composed exactly as the launcher composes them, shrunk to run in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tests.helpers import Recorder  # noqa: E402
from training import run as run_module  # noqa: E402
from training.compose import compose_config  # noqa: E402

torch.set_num_threads(2)

TINY = [
    "run_name=test",
    "device=cpu",
    "trackio.enabled=false",
    "epochs=2",
    "checkpoint.archive_every_epochs=1",
]
# the sample evaluators' settings, shrunk; left out when a test picks the prompt-grid evaluator
TINY_EVAL = ["eval.nfe=[1,4]", "eval.num_samples=256", "eval.every_epochs=1", "eval.trajectory_points=16"]

# GLIDE's tokenizer vocabulary, shared reference data (not in the repository)
GLIDE_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glide"


# the default 2D data, shrunk; left out when a test picks other data or an experiment
TINY_TOY_DATA = ["dataloaders.num_train=1024", "dataloaders.num_eval=256", "dataloaders.batch_size=128"]


def tiny_config(tmp_path: Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The launcher's config with TINY settings, every output under ``tmp_path``."""
    other_data = any(o.startswith(("dataloaders=", "experiment=")) for o in overrides)
    prompt_eval = any(o == "eval=prompts" or o.startswith(("experiment=glide", "experiment=sdxl")) for o in overrides)
    return compose_config(
        [
            *TINY,
            *([] if prompt_eval else TINY_EVAL),
            *([] if other_data else TINY_TOY_DATA),
            f"paths.root={tmp_path}/outputs",
            f"paths.run_dir={tmp_path}/run",
            f"paths.experiment_log={tmp_path}/EXPERIMENT_LOG.md",
            *overrides,
        ]
    )


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg("loss=fm_ot", ...)`` -> a composed tiny config writing under tmp_path."""

    def make(*overrides: str) -> DictConfig:
        return tiny_config(tmp_path, overrides)

    return make


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """40 small PNGs in two class folders (cats/, dogs/): each image a flat colour."""
    from PIL import Image

    root = tmp_path / "images"
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for i in range(20):
            colour = (10 * i, 100 * c, 255 - 10 * i)
            Image.new("RGB", (12, 10), colour).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """What a run logs to its tracker, kept in memory instead of trackio."""
    rec = Recorder()
    monkeypatch.setattr(run_module, "make_tracker", lambda *a, **k: rec)
    return rec
