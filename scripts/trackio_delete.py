"""List or delete runs in the local trackio store: ``$TRACKIO_DIR``, else ``$HF_HOME/trackio``.

    python scripts/trackio_delete.py --list
    python scripts/trackio_delete.py 'sweep_.*' --dry-run
    python scripts/trackio_delete.py 'smoke|test_[0-9]+' --yes

Runs are deleted by id, so every run of a name goes (trackio keeps one run per ``init``, and a run
started again with ``overwrite=true`` adds a second run of the same name).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.cli import exit_code
from training.errors import UserError

if TYPE_CHECKING:
    from trackio.sqlite_storage import SQLiteStorage

DEFAULT_PROJECT = "denoising-zoo"


@dataclass(frozen=True)
class Run:
    name: str
    id: str | None
    created_at: str | None

    def __str__(self) -> str:
        return f"{self.name}  (created {self.created_at or '?'}, id {self.id or '?'})"


def storage() -> type[SQLiteStorage]:
    """trackio's store, imported on first use: trackio fixes its folder from TRACKIO_DIR when it is
    imported, so importing this module (e.g. in tests) must not import it."""
    from trackio.sqlite_storage import SQLiteStorage

    return SQLiteStorage


def list_runs(project: str) -> list[Run]:
    """Every run of ``project``, oldest first; a project with no database is a user error."""
    store = storage()
    db = store.get_project_db_path(project)
    if not db.exists():
        known = ", ".join(store.get_projects()) or "none"
        raise UserError(
            f"no trackio project '{project}' in {db.parent}; projects there: {known} "
            "(set TRACKIO_DIR or pass --project)"
        )
    return [Run(str(r["name"]), r.get("id"), r.get("created_at")) for r in store.get_run_records(project)]


def matching_runs(pattern: str, runs: Iterable[Run]) -> list[Run]:
    """The runs whose whole name matches the regular expression ``pattern``."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise UserError(f"invalid regular expression {pattern!r}: {e}") from e
    return [run for run in runs if regex.fullmatch(run.name)]


def delete_runs(project: str, runs: Iterable[Run]) -> tuple[list[Run], list[Run]]:
    """Delete each run (by id where it has one); returns (deleted, failed)."""
    deleted: list[Run] = []
    failed: list[Run] = []
    for run in runs:
        ok = storage().delete_run(project, run.name, run_id=run.id)
        (deleted if ok else failed).append(run)
    return deleted, failed


def confirm(question: str, ask: Callable[[str], str] = input) -> bool:
    """Yes only on an explicit y/yes; end of input counts as no."""
    try:
        return ask(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="List the runs of a local trackio project, or delete those whose name matches a regex.",
        epilog="PATTERN must match the whole run name (re.fullmatch): 'sweep' matches only "
        "'sweep', 'sweep.*' every run starting with it. Exit status: 0 done; 1 nothing matched, "
        "the answer was no, or a deletion failed; 2 bad input (invalid regex, unknown project).",
    )
    p.add_argument("pattern", nargs="?", metavar="PATTERN", help="Python regex matched against whole run names")
    p.add_argument(
        "--list",
        action="store_true",
        help="list the runs (those matching PATTERN if given) and exit",
    )
    p.add_argument("--project", default=DEFAULT_PROJECT, help=f"trackio project (default: {DEFAULT_PROJECT})")
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    p.add_argument("-y", "--yes", action="store_true", help="delete without asking")
    args = p.parse_args(argv)
    if args.pattern is None and not args.list:
        p.error("give a PATTERN of runs to delete, or --list")
    return args


def run(args: argparse.Namespace) -> int:
    runs = list_runs(args.project)
    if args.pattern is not None:
        runs = matching_runs(args.pattern, runs)
    if args.list:
        print(f"{len(runs)} runs in '{args.project}'" + (f" matching {args.pattern!r}" if args.pattern else "") + ":")
        for r in runs:
            print(f"  {r}")
        return 0
    if not runs:
        print(f"no run in '{args.project}' matches {args.pattern!r} (whole name); nothing deleted")
        return 1
    print(f"{len(runs)} runs in '{args.project}' match {args.pattern!r}:")
    for r in runs:
        print(f"  {r}")
    if args.dry_run:
        print("dry run: nothing deleted")
        return 0
    if not args.yes and not confirm(f"Delete {len(runs)} runs?"):
        print("nothing deleted")
        return 1
    deleted, failed = delete_runs(args.project, runs)
    for r in deleted:
        print(f"deleted {r}")
    for r in failed:
        print(f"could not delete {r}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
