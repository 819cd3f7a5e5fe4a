"""backend=modal, the Modal sweep launcher and scripts/modal_app.py, offline: Modal's real objects are
built but nothing connects; the remote entry point runs through ``.local()`` on a folder standing in
for the Volume."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

modal = pytest.importorskip("modal")

from helpers import SMALL_RUN  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.plugins import Plugins  # noqa: E402
from hydra.core.singleton import Singleton  # noqa: E402
from hydra.core.utils import JobStatus  # noqa: E402
from hydra.plugins.launcher import Launcher  # noqa: E402
from modal.types import FileEntry, FileEntryType  # noqa: E402

from hydra_plugins.modal_launcher.modal_launcher import ModalLauncher  # noqa: E402
from scripts.modal_app import checkpoints, download, merge_trackio, parse_args, run, run_dirs, sync  # noqa: E402
from training import modal_backend as mb  # noqa: E402
from training.compose import CONFIG_DIR, compose_config  # noqa: E402
from training.errors import UserError  # noqa: E402

# Modal's reminder that a .local() call has no Volume mounted: here a folder stands in for it
pytestmark = pytest.mark.filterwarnings("ignore:The remote_train function is executing locally:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "denoising-zoo"
SMALL = ["dataloaders=moons", "model=mlp", *SMALL_RUN, "max_steps=5", "dataloaders.num_train=1024"]


def python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter at the repository root (trackio and Modal read their settings on import)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


class FolderVolume:
    """``modal.Volume``'s read side over a local folder, reading in small chunks."""

    def __init__(self, root: Path, chunk: int = 64 * 1024):
        self.root, self.chunk = root, chunk

    def listdir(self, path: str, *, recursive: bool = False) -> list[FileEntry]:
        base = self.root / path
        if not base.exists():
            raise FileNotFoundError(path)
        found = base.rglob("*") if recursive else base.iterdir()
        return [
            FileEntry(
                path=p.relative_to(self.root).as_posix(),
                type=FileEntryType.DIRECTORY if p.is_dir() else FileEntryType.FILE,
                mtime=int(p.stat().st_mtime),
                size=0 if p.is_dir() else p.stat().st_size,
            )
            for p in sorted(found)
        ]

    def read_file(self, path: str) -> Iterator[bytes]:
        file = self.root / path
        if not file.is_file():
            raise FileNotFoundError(path)
        with file.open("rb") as f:
            while chunk := f.read(self.chunk):
                yield chunk


# --- the Modal objects ------------------------------------------------------------------------


def modal_cfg(*overrides: str):
    return compose_config(["run_name=r", "backend=modal", *overrides])


def test_app_image_volume_and_function_are_modal_objects_built_from_the_config(monkeypatch):
    cfg = modal_cfg("backend.gpu=H100", "backend.timeout_hours=2", "backend.retries=3", "backend.secrets=[huggingface]")
    spec = mb.ModalSpec.from_config(cfg.backend)
    assert spec == mb.ModalSpec(
        gpu="H100", timeout_s=7200, retries=3, volume="denoising-zoo", secrets=("huggingface",), commit_every_s=300.0
    )
    registered: list[dict[str, Any]] = []
    original = modal.App.function

    def spy(self, **kwargs):
        registered.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(modal.App, "function", spy)
    built = mb.build_app(spec)
    assert isinstance(built.app, modal.App) and built.app.name == mb.APP_NAME
    assert isinstance(built.image, modal.Image) and isinstance(built.volume, modal.Volume)
    assert isinstance(built.train, modal.Function) and built.train.app is built.app
    (options,) = registered
    assert options["gpu"] == "H100" and options["timeout"] == 7200
    assert isinstance(options["retries"], modal.Retries) and options["retries"].max_retries == 3
    assert options["volumes"] == {"/outputs": built.volume} and options["image"] is built.image
    assert [type(s) for s in options["secrets"]] == [modal.Secret]
    assert options["single_use_containers"] is True


def test_defaults_match_the_backend_config():
    spec = mb.ModalSpec.from_config(modal_cfg().backend)
    assert (spec.gpu, spec.timeout_s, spec.retries, spec.volume) == ("A10G", 12 * 3600, 5, "denoising-zoo")
    assert (spec.secrets, spec.detach, spec.commit_every_s) == ((), False, 300.0)


def test_unknown_gpu_type_is_a_one_line_error_listing_the_valid_ones():
    with pytest.raises(mb.ModalSetupError) as e:
        mb.ModalSpec.from_config(modal_cfg("backend.gpu=V100").backend)
    assert str(e.value) == "unknown backend.gpu 'V100'; valid GPU types: A10G, L4, A100-40GB, A100-80GB, H100"
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)


def test_without_a_token_submit_stops_first_with_one_line(tmp_path):
    """No MODAL_TOKEN_* and an empty HOME: the token check comes before the GPU check and before
    anything is built (build_app would raise)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env.update(HOME=str(tmp_path), MODAL_CONFIG_PATH=str(tmp_path / "absent.toml"))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                from training import modal_backend as mb
                from training.compose import compose_config

                def never(spec):
                    raise AssertionError("built an app without a token")

                mb.build_app = never
                cfg = compose_config(["run_name=r", "backend=modal", "backend.gpu=V100"])
                try:
                    mb.submit_run(cfg, ["run_name=r", "backend=modal"])
                except ValueError as e:
                    print(type(e).__name__, e, sep=": ")
                """
            ),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == (
        "ModalSetupError: no Modal token: run `modal token new` once (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET)"
    ), out.stderr


def test_a_token_in_the_environment_is_found(monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    assert mb.has_modal_token()


def test_overrides_sent_to_a_container_carry_the_backend_it_runs_on():
    given = ["run_name=a", "backend=local", "backend.gpu=L4", "paths.root=/tmp/x", "hydra.verbose=1", "seed=3"]
    assert mb.with_modal_backend(given) == ["run_name=a", "backend.gpu=L4", "seed=3", "backend=modal"]
    spec = mb.ModalSpec(gpu="H100", timeout_s=5400, retries=2, volume="vol-2", secrets=("hf-token", "wandb.key"))
    sent = mb.container_overrides(given, spec)
    assert sent[:2] == ["run_name=a", "seed=3"] and sent[2:] == spec.overrides()
    assert mb.ModalSpec.from_config(compose_config(sent).backend) == spec


def test_a_retry_resumes_unless_a_first_attempt_asked_to_overwrite(tmp_path):
    ckpt = tmp_path / "last.pt"
    assert mb.resume_overrides(["run_name=a"], ckpt, first_attempt=False) == ["run_name=a"]
    ckpt.touch()
    assert mb.resume_overrides(["run_name=a"], ckpt, first_attempt=True) == ["run_name=a", "resume=true"]
    fresh = ["run_name=a", "overwrite=true"]
    assert mb.resume_overrides(fresh, ckpt, first_attempt=True) == fresh
    assert mb.resume_overrides(fresh, ckpt, first_attempt=False) == ["run_name=a", "resume=true"]


def test_periodic_commit_commits_while_running_and_once_at_the_end_even_on_failure():
    commits: list[float] = []
    with pytest.raises(RuntimeError), mb.PeriodicCommit(lambda: commits.append(time.monotonic()), every_s=0.02):
        time.sleep(0.15)
        raise RuntimeError("container lost")
    assert len(commits) >= 3


# --- the remote entry point through .local(), on a folder standing in for the Volume -------------

REMOTE = """
import json, sys
from pathlib import Path
from training import modal_backend as mb

mb.VOLUME_MOUNT = sys.argv[1]
commits = []
mb.commit_volume = commits.append
spec = mb.ModalSpec(gpu="A10G", timeout_s=600, retries=1, volume="test-volume")
built = mb.build_app(spec)
out = []
for _ in range(2):
    r = built.train.local(mb.container_overrides(json.loads(sys.argv[2]), spec))
    out.append({"metrics": r.metrics, "run_dir": r.run_dir, "checkpoint": r.checkpoint, "error": r.error,
                "commits": list(commits)})
print(json.dumps(out))
"""

LOCAL_STORE = """
import trackio
trackio.init(project="denoising-zoo", name="local_run", config={"lr": 1}, auto_log_cpu=False, auto_log_gpu=False)
for step in range(3):
    trackio.log({"train/loss": 1.0 / (step + 1)}, step=step)
trackio.finish()
"""


@pytest.fixture(scope="module")
def remote_runs(tmp_path_factory) -> dict[str, Any]:
    """``remote_train`` run twice through ``.local()`` (trackio on), the Volume a temporary folder;
    and a local trackio store with a run of its own."""
    tmp = tmp_path_factory.mktemp("modal")
    volume = tmp / "volume"
    overrides = ["run_name=remote", *SMALL, "trackio.enabled=true"]
    out = python(REMOTE, str(volume), json.dumps(overrides), env={"TRACKIO_DIR": str(tmp / "ignored")})
    assert out.returncode == 0, out.stderr[-3000:]
    local = python(LOCAL_STORE, env={"TRACKIO_DIR": str(tmp / "local")})
    assert local.returncode == 0, local.stderr[-3000:]
    return {"volume": volume, "local": tmp / "local", "results": json.loads(out.stdout.splitlines()[-1])}


def test_remote_train_writes_every_output_to_the_volume(remote_runs):
    volume = remote_runs["volume"]
    first = remote_runs["results"][0]
    assert first["error"] is None and first["metrics"]["train/steps"] == 5.0
    assert first["checkpoint"] == str(volume / "ckpts" / "mlp" / "remote" / "last.pt")
    assert Path(first["run_dir"]).parent == volume / "runs" / "remote"
    assert (Path(first["run_dir"]) / "metrics.json").is_file()
    assert (volume / "trackio" / "remote" / f"{PROJECT}.db").is_file()
    assert first["commits"] == ["test-volume", "test-volume"]  # the call's start, and its end


def test_running_again_finds_the_checkpoint_and_resumes(remote_runs):
    second = remote_runs["results"][1]
    assert second["error"] is None and second["metrics"]["train/steps"] == 5.0  # resumed at step 5 of 5
    log = (remote_runs["volume"] / "runs" / "remote" / "EXPERIMENT_LOG.md").read_text()
    commands = [line for line in log.splitlines() if line.startswith("- command:")]
    assert len(commands) == 2 and "resume=true" not in commands[0] and "resume=true" in commands[1]
    assert "backend=modal" in commands[0] and f"paths.root={remote_runs['volume']}" in commands[0]


def test_a_bad_run_comes_back_as_an_error_instead_of_being_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(mb, "VOLUME_MOUNT", str(tmp_path))
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    spec = mb.ModalSpec.from_config(modal_cfg().backend)
    result = mb.remote_train(mb.container_overrides(["run_name=bad name", "trackio.enabled=false"], spec))
    assert result.error is not None and result.error.startswith("run_name='bad name' may hold only")
    with pytest.raises(UserError):
        result.unwrap()


@pytest.fixture
def offline_modal(tmp_path, monkeypatch) -> list[mb.ModalApp]:
    """Modal as submit_run and the sweep launcher use it, offline: a token, no connection, the
    function's .remote/.spawn running it through .local() on a folder standing in for the Volume."""
    built_apps: list[mb.ModalApp] = []
    real_build_app = mb.build_app

    def local_call(built: mb.ModalApp, overrides: list[str]) -> mb.RemoteResult:
        state = Singleton.get_state()  # a container composes its own config, outside any Hydra run here
        GlobalHydra.instance().clear()
        try:
            return built.train.local(overrides)
        finally:
            Singleton.set_state(state)

    def build_app(spec: mb.ModalSpec) -> mb.ModalApp:
        built = real_build_app(spec)
        built.train.remote = lambda overrides: local_call(built, overrides)  # type: ignore[method-assign]
        built.train.spawn = lambda overrides: DoneCall(local_call(built, overrides))  # type: ignore[method-assign]
        built_apps.append(built)
        return built

    @contextmanager
    def offline_session(app: modal.App, detach: bool = False) -> Iterator[None]:
        yield

    monkeypatch.setattr(mb, "require_modal_token", lambda: None)
    monkeypatch.setattr(mb, "build_app", build_app)
    monkeypatch.setattr(mb, "app_session", offline_session)
    monkeypatch.setattr(mb, "commit_volume", lambda name: None)
    monkeypatch.setattr(mb, "VOLUME_MOUNT", str(tmp_path / "volume"))
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # remote_train sets it; restored after the test
    return built_apps


class DoneCall:
    """A ``modal.FunctionCall`` that has finished."""

    object_id = "fc-offline"

    def __init__(self, result: mb.RemoteResult):
        self.result = result

    def get(self) -> mb.RemoteResult:
        return self.result


def test_submit_run_as_the_launcher_calls_it(offline_modal, tmp_path, capsys):
    overrides = ["run_name=sub", *SMALL, "trackio.enabled=false"]
    cfg = compose_config([*overrides, "backend=modal", "backend.gpu=L4"])
    assert mb.submit_run(cfg, overrides) == 0
    out = capsys.readouterr().out
    assert "checkpoint: ckpts/mlp/sub/last.pt  (python scripts/modal_app.py download ckpts/mlp/sub/last.pt" in out
    assert (tmp_path / "volume" / "ckpts" / "mlp" / "sub" / "last.pt").is_file()
    log = (tmp_path / "volume" / "runs" / "sub" / "EXPERIMENT_LOG.md").read_text()
    assert "backend.gpu=L4" in log  # the run's config records the backend it ran on

    detached = compose_config([*overrides, "run_name=sub2", "backend=modal", "backend.detach=true"])
    assert mb.submit_run(detached, [*overrides, "run_name=sub2"]) == 0
    assert "submitted run 'sub2' to Modal" in capsys.readouterr().out


# --- scripts/modal_app.py ---------------------------------------------------------------------


def rows(db: Path, table: str) -> list[tuple]:
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as conn:
        cols = "run_id, run_name, step, metrics, log_id" if table == "metrics" else "run_id, run_name"
        return sorted(conn.execute(f"SELECT {cols} FROM {table}").fetchall())


def test_sync_merges_the_volume_store_into_the_local_one_twice_without_duplicates(remote_runs, tmp_path):
    remote_db = remote_runs["volume"] / "trackio" / "remote" / f"{PROJECT}.db"
    local_db = tmp_path / f"{PROJECT}.db"
    local_db.write_bytes((remote_runs["local"] / f"{PROJECT}.db").read_bytes())
    before = rows(local_db, "metrics")
    volume = FolderVolume(remote_runs["volume"], chunk=4096)

    added = sync(volume, PROJECT, local_db)
    merged = rows(local_db, "metrics")
    assert added["metrics"] == len(rows(remote_db, "metrics")) > 0
    assert sorted(before + rows(remote_db, "metrics")) == merged
    assert {name for _, name in rows(local_db, "configs")} == {"local_run", "remote"}

    again = sync(volume, PROJECT, local_db)
    assert set(again.values()) == {0} and rows(local_db, "metrics") == merged

    seen = python(
        "from trackio.sqlite_storage import SQLiteStorage as S; "
        "print(sorted(S.get_runs('denoising-zoo')), len(S.get_logs('denoising-zoo', 'remote')))",
        env={"TRACKIO_DIR": str(tmp_path)},
    )
    assert seen.stdout.split("\n")[0] == f"['local_run', 'remote'] {len(rows(remote_db, 'metrics'))}", seen.stderr


def test_sync_reads_a_live_store_from_a_copy_including_its_write_ahead_log(remote_runs, tmp_path):
    """A run still writing: its newest rows are in <db>-wal; the Volume's files are left as they were."""
    live = tmp_path / "volume" / "trackio" / "live" / f"{PROJECT}.db"
    live.parent.mkdir(parents=True)
    live.write_bytes((remote_runs["volume"] / "trackio" / "remote" / f"{PROJECT}.db").read_bytes())
    writer = sqlite3.connect(live)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute(
        "INSERT INTO metrics (run_id, timestamp, run_name, step, metrics, log_id) "
        "VALUES ('live-id', '2030-01-01T00:00:00', 'live', 7, '{\"train/loss\": 0.5}', 'live-log')"
    )
    writer.commit()
    assert Path(f"{live}-wal").stat().st_size > 0
    expected = sorted(writer.execute("SELECT run_id, run_name, step, metrics, log_id FROM metrics").fetchall())
    stored = {p: p.read_bytes() for p in (live, Path(f"{live}-wal"))}
    try:
        target = tmp_path / "fresh" / f"{PROJECT}.db"
        sync(FolderVolume(tmp_path / "volume"), PROJECT, target)
        assert rows(target, "metrics") == expected
        assert ("live-id", "live", 7, '{"train/loss": 0.5}', "live-log") in expected
        assert {p: p.read_bytes() for p in stored} == stored
    finally:
        writer.close()


def test_merge_of_a_store_into_itself_adds_nothing(remote_runs, tmp_path):
    db = tmp_path / f"{PROJECT}.db"
    db.write_bytes((remote_runs["volume"] / "trackio" / "remote" / f"{PROJECT}.db").read_bytes())
    assert set(merge_trackio(db, db).values()) == {0}


def test_list_and_ckpts_read_the_volume_layout(remote_runs):
    volume = FolderVolume(remote_runs["volume"])
    runs = run_dirs(volume)
    assert [(name, done) for name, _, done in runs] == [("remote", True), ("remote", True)]
    ((path, size),) = checkpoints(volume)
    assert path == "ckpts/mlp/remote/last.pt"
    assert size == (remote_runs["volume"] / path).stat().st_size


def test_download_streams_in_chunks_to_a_temporary_file_then_renames(tmp_path):
    src = tmp_path / "volume" / "ckpts" / "unet" / "big" / "last.pt"
    src.parent.mkdir(parents=True)
    src.write_bytes(os.urandom(3 * 2**20 + 17))
    volume = FolderVolume(tmp_path / "volume", chunk=2**20)
    args = parse_args(["download", "ckpts/unet/big/last.pt", "--to", str(tmp_path / "local")])
    assert run(args, volume) == 0
    dest = tmp_path / "local" / "ckpts" / "unet" / "big" / "last.pt"
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["last.pt"]

    def broken(path: str) -> Iterator[bytes]:
        yield b"partial"
        raise ConnectionError("stream lost")

    volume.read_file = broken  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        download(volume, "ckpts/unet/big/last.pt", tmp_path / "other" / "last.pt")
    assert list((tmp_path / "other").iterdir()) == []

    with pytest.raises(UserError, match="no file 'ckpts/absent.pt' on the Volume"):
        download(FolderVolume(tmp_path / "volume"), "ckpts/absent.pt", tmp_path / "x.pt")
    with pytest.raises(UserError, match="without '..'"):
        run(parse_args(["download", "ckpts/../../x.pt", "--to", str(tmp_path / "local")]), volume)


# --- hydra/launcher=modal ---------------------------------------------------------------------


def test_the_launcher_plugin_is_discovered_and_its_config_composes():
    # Hydra loads plugin modules on its own, outside sys.modules: compare by name, not identity
    found = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}
    assert f"{ModalLauncher.__module__}.{ModalLauncher.__name__}" in found
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["run_name=s", "hydra/launcher=modal"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.modal_launcher.modal_launcher.ModalLauncher"
    assert cfg.hydra.launcher.return_metric is None


def test_a_sweep_sends_each_job_to_its_own_container_and_collects_their_metrics(offline_modal, tmp_path):
    def task(cfg):
        raise AssertionError("a Modal sweep never runs the task here")

    overrides = ["run_name=sweep", *SMALL, "trackio.enabled=false", "seed=0,1", "hydra/launcher=modal"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        batches = GlobalHydra.instance().hydra.multirun(  # type: ignore[union-attr]
            config_name="train",
            task_function=task,
            overrides=[*overrides, f"hydra.sweep.dir={tmp_path}/sweep"],
            with_log_configuration=False,
        )
    (returns,) = batches
    assert len(offline_modal) == 1 and len(returns) == 2
    for num, ret in enumerate(returns):
        assert ret.status == JobStatus.COMPLETED, ret._return_value
        assert ret.return_value["train/steps"] == 5.0
        assert f"run_name=sweep_{num}" in ret.overrides and f"seed={num}" in ret.overrides
        assert (tmp_path / "volume" / "ckpts" / "mlp" / f"sweep_{num}" / "last.pt").is_file()
