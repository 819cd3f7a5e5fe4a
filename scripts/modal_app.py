"""Read back the Modal Volume that ``backend=modal`` runs write to (``training/modal_backend.py``).

    python scripts/modal_app.py sync                      # merge the runs' trackio data into the local store
    python scripts/modal_app.py list                      # runs on the Volume
    python scripts/modal_app.py ckpts                     # checkpoints, with sizes
    python scripts/modal_app.py download ckpts/mlp/NAME/last.pt [--to DIR]   # to DIR/ckpts/... (default outputs/)

``sync`` is safe while a run is live and idempotent: each store is copied to a temporary folder
first and read read-only, and rows already in the local store are not added again.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import modal
from modal.types import FileEntry, FileEntryType
from omegaconf import OmegaConf

from training.errors import UserError
from training.modal_backend import require_modal_token

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VOLUME = str(OmegaConf.load(ROOT / "configs" / "backend" / "modal.yaml").volume)
DEFAULT_PROJECT = "denoising-zoo"


class VolumeReader(Protocol):
    """The read side of ``modal.Volume`` that this script uses (a local folder stands in for it in tests)."""

    def listdir(self, path: str, *, recursive: bool = False) -> list[FileEntry]: ...

    def read_file(self, path: str) -> Iterator[bytes]: ...


# --- trackio merge ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A trackio table merged by ``merge_trackio``: ``key`` identifies a row across stores (compared
    NULL-safe); ``update`` columns of an existing row take the source's value (a resumed run rewrites
    its config row)."""

    name: str
    key: tuple[str, ...]
    update: tuple[str, ...] = ()


TABLES = (
    Table("configs", ("run_id",), update=("run_name", "config", "created_at")),
    Table("metrics", ("run_id", "step", "timestamp", "log_id")),
    Table("system_metrics", ("run_id", "timestamp", "log_id")),
    Table("alerts", ("run_id", "timestamp", "title", "alert_id")),
    Table("traces", ("id",)),
)


def _columns(conn: sqlite3.Connection, schema: str, table: str) -> list[str]:
    """The table's columns, less an INTEGER PRIMARY KEY (a row id local to each store)."""
    rows = conn.execute(f"PRAGMA {schema}.table_info({table})").fetchall()
    return [name for _, name, kind, _, _, pk in rows if not (pk and kind.upper() == "INTEGER")]


def _create_like(conn: sqlite3.Connection, table: str) -> None:
    """Create ``table`` and its indexes in main as the source store defines them."""
    for (sql,) in conn.execute(
        "SELECT sql FROM src.sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL ORDER BY type = 'index'", (table,)
    ):
        conn.execute(sql)


def merge_trackio(source: Path, target: Path) -> dict[str, int]:
    """Add the runs and rows of the trackio store ``source`` (opened read-only) to ``target``
    (created if missing); returns the rows added or changed per table. Merging again adds nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    changed: dict[str, int] = {}
    with sqlite3.connect(target, timeout=30) as conn:
        conn.execute("ATTACH DATABASE ? AS src", (f"{source.resolve().as_uri()}?mode=ro",))
        have = {r[0] for r in conn.execute("SELECT name FROM main.sqlite_master WHERE type = 'table'")}
        theirs = {r[0] for r in conn.execute("SELECT name FROM src.sqlite_master WHERE type = 'table'")}
        for table in TABLES:
            if table.name not in theirs:
                continue
            if table.name not in have:
                _create_like(conn, table.name)
            cols = [c for c in _columns(conn, "src", table.name) if c in _columns(conn, "main", table.name)]
            names = ", ".join(cols)
            same = " AND ".join(f"m.{k} IS s.{k}" for k in table.key)
            before = conn.total_changes
            conn.execute(
                f"INSERT INTO main.{table.name} ({names}) SELECT {names} FROM src.{table.name} AS s "
                f"WHERE NOT EXISTS (SELECT 1 FROM main.{table.name} AS m WHERE {same})"
            )
            for col in table.update:
                conn.execute(
                    f"UPDATE main.{table.name} AS m SET {col} = s.{col} FROM src.{table.name} AS s "
                    f"WHERE {same} AND m.{col} IS NOT s.{col}"
                )
            changed[table.name] = conn.total_changes - before
    conn.close()
    return changed


# --- Volume access ----------------------------------------------------------------------------


def download(volume: VolumeReader, path: str, dest: Path) -> int:
    """Stream the Volume file ``path`` to ``dest`` chunk by chunk (checkpoints of hundreds of MB),
    through a temporary file renamed at the end: ``dest`` is never half written. Returns the bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in volume.read_file(path):
                f.write(chunk)
                size += len(chunk)
        os.replace(tmp, dest)
    except FileNotFoundError as e:
        raise UserError(f"no file '{path}' on the Volume (python scripts/modal_app.py ckpts lists them)") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return size


def files(volume: VolumeReader, path: str) -> list[FileEntry]:
    """The files (not folders) under ``path`` on the Volume, at any depth; none if it is absent."""
    try:
        entries = volume.listdir(path, recursive=True)
    except FileNotFoundError:
        return []
    return [e for e in entries if e.type == FileEntryType.FILE]


def sync(volume: VolumeReader, project: str, local_db: Path) -> dict[str, int]:
    """Merge the trackio store of every run on the Volume (``trackio/<run_name>/<project>.db``) into
    ``local_db``; returns the rows added per table."""
    paths = {e.path for e in files(volume, "trackio")}
    stores = sorted(p for p in paths if PurePosixPath(p).name == f"{project}.db")
    total: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="modal-trackio-") as tmp:
        for store in stores:
            copy = Path(tmp) / PurePosixPath(store).parent.name / PurePosixPath(store).name
            for part in (store, store + "-wal"):  # a live store in WAL mode keeps its newest rows in -wal
                if part in paths:
                    download(volume, part, copy.with_name(PurePosixPath(part).name))
            for table, n in merge_trackio(copy, local_db).items():
                total[table] = total.get(table, 0) + n
    return total


def run_dirs(volume: VolumeReader) -> list[tuple[str, str, bool]]:
    """(run_name, time, completed) of each run directory ``runs/<run_name>/<time>/`` on the Volume."""
    found: dict[tuple[str, str], bool] = {}
    for entry in files(volume, "runs"):
        parts = PurePosixPath(entry.path).parts
        if len(parts) >= 4 and parts[0] == "runs":
            key = (parts[1], parts[2])
            found[key] = found.get(key, False) or parts[3] == "metrics.json"
    return [(name, time, done) for (name, time), done in sorted(found.items())]


def checkpoints(volume: VolumeReader) -> list[tuple[str, int]]:
    """(path, bytes) of every checkpoint under ``ckpts/`` on the Volume."""
    return sorted((e.path, e.size) for e in files(volume, "ckpts") if e.path.endswith(".pt"))


def human(size: int) -> str:
    scaled, unit = float(size), "B"
    for larger in ("KB", "MB", "GB"):
        if scaled < 1024:
            break
        scaled, unit = scaled / 1024, larger
    return f"{size} B" if unit == "B" else f"{scaled:.1f} {unit}"


def local_trackio_db(project: str) -> Path:
    """The local store trackio itself would write: under ``$TRACKIO_DIR``, else ``$HF_HOME/trackio``."""
    from trackio.sqlite_storage import SQLiteStorage

    return SQLiteStorage.get_project_db_path(project)


def open_volume(name: str) -> VolumeReader:
    require_modal_token()
    return modal.Volume.from_name(name)


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Read back the Modal Volume of backend=modal runs.")
    p.add_argument("--volume", default=DEFAULT_VOLUME, help=f"Modal Volume name (default: {DEFAULT_VOLUME})")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sync", help="merge the runs' trackio data into the local trackio store")
    s.add_argument("--project", default=DEFAULT_PROJECT, help=f"trackio project (default: {DEFAULT_PROJECT})")
    sub.add_parser("list", help="runs on the Volume")
    sub.add_parser("ckpts", help="checkpoints on the Volume, with sizes")
    d = sub.add_parser("download", help="stream one file of the Volume to DIR/PATH")
    d.add_argument("path", metavar="PATH", help="a path on the Volume, as ckpts/list print it")
    d.add_argument("--to", type=Path, default=Path("outputs"), help="local root (default: outputs)")
    return p.parse_args(argv)


def run(args: argparse.Namespace, volume: VolumeReader) -> int:
    if args.command == "sync":
        db = local_trackio_db(args.project)
        added = sync(volume, args.project, db)
        news = ", ".join(f"{n} {table} rows" for table, n in added.items() if n)
        print(f"merged the Volume's trackio data into {db}: {news or 'nothing new'}")
    elif args.command == "list":
        for name, time, done in run_dirs(volume):
            print(f"{name:30} {time}  {'completed' if done else 'running or failed'}")
    elif args.command == "ckpts":
        for path, size in checkpoints(volume):
            print(f"{human(size):>10}  {path}")
    else:
        wanted = PurePosixPath(args.path.lstrip("/"))
        if ".." in wanted.parts:
            raise UserError(f"PATH must lie inside the Volume, without '..': {args.path}")
        dest = args.to / wanted
        size = download(volume, str(wanted), dest)
        print(f"{dest} ({human(size)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args, open_volume(args.volume))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
