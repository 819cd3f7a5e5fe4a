"""``backend=modal``: run ``train(cfg)`` in a Modal container on one cloud GPU, outputs on a Modal Volume.

Local side: ``submit_run(cfg, overrides)`` checks for a Modal token, builds the App from
``cfg.backend`` (``configs/backend/modal.yaml``) and calls ``remote_train`` in a container
(``.remote``; ``.spawn`` with ``backend.detach=true``). Container side: ``remote_train(overrides)``
composes the launcher's config with every output on the Volume, resumes when the run's ``last.pt``
is already there (a retry after a lost container), and commits the Volume every
``commit_every_minutes`` and once at the end. ``scripts/modal_app.py`` reads the Volume back.

Volume layout (mounted at ``VOLUME_MOUNT``), one writer per file so that parallel sweep jobs, each
in its own container, never commit over each other's files:

    ckpts/<model>/<run_name>/{last.pt,archive/}    checkpoints (paths.ckpt_dir)
    runs/<run_name>/<time>/                        metrics.json, samples (paths.run_dir)
    runs/<run_name>/EXPERIMENT_LOG.md              the run's log entries (one per attempt)
    trackio/<run_name>/<project>.db                the run's trackio store (TRACKIO_DIR)
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import modal
from omegaconf import DictConfig

from training.errors import RunInterrupted, UserError

log = logging.getLogger(__name__)

GPU_TYPES = ("A10G", "L4", "A100-40GB", "A100-80GB", "H100")
MAX_TIMEOUT_HOURS = 24  # Modal's limit for one function call
MAX_RETRIES = 10  # Modal's limit
APP_NAME = "denoising-zoo"
VOLUME_MOUNT = "/outputs"  # the Volume in the container: paths.root of every remote run
PROJECT_DIR = Path(__file__).resolve().parents[1]
REMOTE_PROJECT = "/root/denoising-zoo"
# left out of the upload: environments, local outputs, data and caches
UPLOAD_IGNORE = [
    ".venv",
    ".git",
    "outputs",
    "multirun",
    "data",
    "**/__pycache__",
    "**/*.pt",
    "*.egg-info",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
]


class ModalSetupError(UserError, ValueError):
    """Modal cannot be used as configured (no token, an unknown GPU type, ...): one line, with the fix."""


@dataclass(frozen=True)
class ModalSpec:
    """``cfg.backend`` of ``backend=modal``, checked: what one Modal function call runs with."""

    gpu: str
    timeout_s: int
    retries: int
    volume: str
    secrets: tuple[str, ...] = ()
    detach: bool = False
    commit_every_s: float = 300.0

    def __post_init__(self) -> None:
        if self.gpu not in GPU_TYPES:
            raise ModalSetupError(f"unknown backend.gpu '{self.gpu}'; valid GPU types: {', '.join(GPU_TYPES)}")
        if not 0 < self.timeout_s <= MAX_TIMEOUT_HOURS * 3600:
            raise ModalSetupError(f"backend.timeout_hours must be in (0, {MAX_TIMEOUT_HOURS}] (Modal's limit)")
        if not 0 <= self.retries <= MAX_RETRIES:
            raise ModalSetupError(f"backend.retries must be in [0, {MAX_RETRIES}] (Modal's limit)")
        if self.commit_every_s <= 0:
            raise ModalSetupError("backend.commit_every_minutes must be positive")

    def overrides(self) -> list[str]:
        """This spec as config overrides (``backend=modal`` and every ``backend.*`` value)."""
        secrets = ",".join(f"'{name}'" for name in self.secrets)
        return [
            "backend=modal",
            f"backend.gpu={self.gpu}",
            f"backend.timeout_hours={self.timeout_s / 3600}",
            f"backend.retries={self.retries}",
            f"backend.volume={self.volume}",
            f"backend.secrets=[{secrets}]",
            f"backend.detach={str(self.detach).lower()}",
            f"backend.commit_every_minutes={self.commit_every_s / 60}",
        ]

    @classmethod
    def from_config(cls, backend: DictConfig) -> ModalSpec:
        return cls(
            gpu=str(backend.gpu),
            timeout_s=round(float(backend.timeout_hours) * 3600),
            retries=int(backend.retries),
            volume=str(backend.volume),
            secrets=tuple(str(s) for s in backend.secrets),
            detach=bool(backend.detach),
            commit_every_s=60.0 * float(backend.commit_every_minutes),
        )


@dataclass(frozen=True)
class RemoteResult:
    """What a container sends back: the run's final metrics and where its outputs are on the Volume,
    or the message of a ``UserError``, returned rather than raised (Modal would retry a raised one)."""

    metrics: dict[str, float] = field(default_factory=dict)
    run_dir: str = ""
    checkpoint: str = ""
    error: str | None = None

    def unwrap(self) -> dict[str, float]:
        """The metrics; a run that failed on bad input raises its ``UserError`` here, locally."""
        if self.error is not None:
            raise UserError(self.error)
        return self.metrics


@dataclass(frozen=True)
class ModalApp:
    """The Modal objects of one submission: ``train`` is ``remote_train`` registered on ``app``."""

    app: modal.App
    image: modal.Image
    volume: modal.Volume
    train: modal.Function


# --- local side -------------------------------------------------------------------------------


def has_modal_token() -> bool:
    """A token in MODAL_TOKEN_ID/MODAL_TOKEN_SECRET or the active profile of ~/.modal.toml (MODAL_CONFIG_PATH)."""
    from modal.config import config

    return bool(config.get("token_id") and config.get("token_secret")) or bool(config.get("oauth_refresh_token"))


def require_modal_token() -> None:
    """Fail before anything is built or uploaded when Modal has no credentials."""
    if not has_modal_token():
        raise ModalSetupError(
            "no Modal token: run `modal token new` once (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET)"
        )


def project_image() -> modal.Image:
    """Debian with the project's own dependencies (pyproject.toml, no second list) and its source,
    configs included. The local Python version, so arguments and results unpickle on both sides."""
    return (
        modal.Image.debian_slim(python_version=f"{sys.version_info.major}.{sys.version_info.minor}")
        .pip_install_from_pyproject(str(PROJECT_DIR / "pyproject.toml"))
        .env({"PYTHONPATH": REMOTE_PROJECT})
        .workdir(REMOTE_PROJECT)
        .add_local_dir(PROJECT_DIR, REMOTE_PROJECT, ignore=UPLOAD_IGNORE)
    )


def function_options(spec: ModalSpec, image: modal.Image, volume: modal.Volume) -> dict[str, Any]:
    """The ``App.function`` arguments ``remote_train`` is registered with."""
    return {
        "image": image,
        "gpu": spec.gpu,
        "timeout": spec.timeout_s,
        "retries": modal.Retries(max_retries=spec.retries, backoff_coefficient=1.0, initial_delay=10.0),
        "volumes": {VOLUME_MOUNT: volume},
        "secrets": [modal.Secret.from_name(name) for name in spec.secrets],
        "single_use_containers": True,  # a fresh process per run: trackio reads TRACKIO_DIR once, on import
        "include_source": False,  # the image carries the whole project
    }


def build_app(spec: ModalSpec) -> ModalApp:
    """Modal's objects for ``spec``; nothing is contacted or uploaded until ``app_session``."""
    app = modal.App(APP_NAME)
    image = project_image()
    volume = modal.Volume.from_name(spec.volume, create_if_missing=True)
    train = app.function(**function_options(spec, image, volume))(remote_train)
    return ModalApp(app=app, image=image, volume=volume, train=train)


@contextmanager
def app_session(app: modal.App, detach: bool = False) -> Iterator[None]:
    """The App running on Modal, container logs streamed here: the one place that connects."""
    with modal.enable_output(), app.run(detach=detach):
        yield


def submit_run(cfg: DictConfig, overrides: Sequence[str]) -> int:
    """Run ``cfg`` (``backend=modal``) in a Modal container. ``overrides``: the command line's (with
    the job's run_name in a sweep); backend keys in them are ignored, the backend comes from ``cfg``.

    Waits for the run and prints its metrics; with ``backend.detach=true`` returns once submitted
    and prints how to follow it. Returns the exit status.
    """
    require_modal_token()
    from training.outputs import metrics_table, require_run_name

    run_name = require_run_name(cfg)
    spec = ModalSpec.from_config(cfg.backend)
    sent = container_overrides(overrides, spec)
    built = build_app(spec)
    with app_session(built.app, detach=spec.detach):
        if spec.detach:
            call = built.train.spawn(sent)
            print(
                f"submitted run '{run_name}' to Modal (app {built.app.app_id}, call {call.object_id}); "
                "it goes on after this process exits.\n"
                f"  logs:        modal app logs {built.app.app_id}\n"
                "  metrics:     python scripts/modal_app.py sync  (then: trackio show --project "
                f"{cfg.trackio.project})\n"
                "  checkpoints: python scripts/modal_app.py ckpts"
            )
            return 0
        result: RemoteResult = built.train.remote(sent)
    print(metrics_table(result.unwrap()))
    ckpt = Path(result.checkpoint).relative_to(VOLUME_MOUNT)
    print(f"run directory on Volume '{spec.volume}': {Path(result.run_dir).relative_to(VOLUME_MOUNT)}")
    print(f"checkpoint: {ckpt}  (python scripts/modal_app.py download {ckpt} fetches it)")
    return 0


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _local_only(override: str) -> bool:
    """``hydra*`` configures the local launcher; ``paths.*`` is set by the container (the Volume)."""
    return override_key(override).startswith(("hydra", "paths."))


def with_modal_backend(overrides: Sequence[str]) -> list[str]:
    """``overrides`` composed for ``backend=modal``: another ``backend=`` choice is replaced,
    ``backend.*`` values are kept (a sweep job's settings come from them)."""
    return [o for o in overrides if override_key(o) != "backend" and not _local_only(o)] + ["backend=modal"]


def container_overrides(overrides: Sequence[str], spec: ModalSpec) -> list[str]:
    """What ``remote_train`` receives: ``overrides`` without backend and local-only keys, plus
    ``spec`` as overrides, so that the run's config records the backend it ran on."""
    kept = [o for o in overrides if not _local_only(o) and override_key(o).split(".")[0] != "backend"]
    return kept + spec.overrides()


# --- container side ---------------------------------------------------------------------------


def volume_config(overrides: Sequence[str], root: Path) -> DictConfig:
    """The launcher's config for ``overrides``, every output under the Volume at ``root``."""
    from training.compose import compose_config
    from training.outputs import require_run_name

    cfg = compose_config([*overrides, f"paths.root={root}"])
    run_name = require_run_name(cfg)
    cfg.paths.run_dir = str(root / "runs" / run_name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    cfg.paths.experiment_log = str(root / "runs" / run_name / "EXPERIMENT_LOG.md")
    return cfg


def claim_attempt(root: Path) -> bool:
    """True on a Modal call's first attempt; marks the call on the Volume so that its retries know
    they are retries. A call outside Modal (``.local()``) has no id and no retries: always first."""
    call_id = modal.current_function_call_id()
    if call_id is None:
        return True
    marker = root / ".calls" / call_id
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def resume_overrides(overrides: list[str], checkpoint: Path, first_attempt: bool) -> list[str]:
    """``overrides`` plus ``resume=true`` when the run's ``checkpoint`` is already on the Volume: a
    retry continues where the lost container last checkpointed. The one exception is a call's first
    attempt that asked for ``overwrite=true``: that starts over, as it would locally."""
    asked = {override_key(o): o.split("=", 1)[-1] for o in overrides}
    if not checkpoint.exists() or (first_attempt and asked.get("overwrite") == "true"):
        return overrides
    return [*(o for o in overrides if override_key(o) not in ("resume", "overwrite")), "resume=true"]


def commit_volume(name: str) -> None:
    """Make this container's writes to the Volume visible outside it (sync, ckpts, a retry)."""
    modal.Volume.from_name(name).commit()


class PeriodicCommit:
    """Calls ``commit`` every ``every_s`` seconds from a background thread while the block runs, and
    once more when it ends, also on failure: a lost container loses at most the writes since."""

    def __init__(self, commit: Callable[[], None], every_s: float):
        self.commit = commit
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="volume-commit", daemon=True)

    def __enter__(self) -> PeriodicCommit:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.commit()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.commit()
            except Exception as e:  # a failed commit (network) must not stop training; the next one retries
                log.warning("volume commit failed: %s", e)


def remote_train(overrides: list[str]) -> RemoteResult:
    """The container's entry point: ``train`` on the launcher's config for ``overrides`` (made by
    ``container_overrides``), every output on the Volume; a retry resumes from the run's ``last.pt``."""
    from training.train import train

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    root = Path(VOLUME_MOUNT)
    try:
        cfg = volume_config(overrides, root)
        commit = partial(commit_volume, str(cfg.backend.volume))
        first_attempt = claim_attempt(root)
        commit()  # the call's marker, before anything can be lost
        resumed = resume_overrides(overrides, Path(cfg.paths.ckpt_dir) / "last.pt", first_attempt)
        if resumed != overrides:
            log.info("run '%s' has a checkpoint on the Volume: resuming it (resume=true)", cfg.run_name)
            cfg = volume_config(resumed, root)
        # the run's own trackio store; set before train imports trackio, which reads it once
        os.environ["TRACKIO_DIR"] = str(root / "trackio" / str(cfg.run_name))
        with PeriodicCommit(commit, 60.0 * float(cfg.backend.commit_every_minutes)):
            metrics, objects = train(cfg)
    except RunInterrupted:
        raise  # a preempted container wrote last.pt: a failed call makes Modal retry it, and the retry resumes
    except UserError as e:
        return RemoteResult(error=str(e))
    return RemoteResult(metrics=metrics, run_dir=str(objects["run_dir"]), checkpoint=str(objects["checkpoint"]))
