"""One writer per run: an exclusive lock on the run's checkpoint folder for the run's lifetime.

``fcntl.flock`` on ``<ckpt_dir>/.lock``: the kernel releases it when the holder exits in any way
(kill -9 included), so a crashed run never leaves a stale lock behind; the file records who holds
it (pid, host, start time, command) so a refused second run can name the holder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import IO

from training.errors import UserError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, folder: Path, run_name: str):
        self.folder = folder
        self.run_name = run_name
        self.created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if left empty
        self._file: IO[str] | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise a one-line ``UserError`` naming the live holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        f = (self.folder / LOCK_FILE).open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise UserError(
                f"run '{self.run_name}' is being written by another process ({holder}); wait for it to finish, "
                f"stop it, or choose another run_name (lock: {self.folder / LOCK_FILE})"
            ) from None
        f.seek(0)
        f.truncate()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": f"{datetime.now():%Y-%m-%d %H:%M:%S}",
                  "command": " ".join(sys.argv)}  # fmt: skip
        f.write(json.dumps(me) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Unlock; for a run refused before it wrote anything, remove the folders ``acquire`` created."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None
        if self.created and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
            (self.folder / LOCK_FILE).unlink()
            for folder in self.created:
                if any(folder.iterdir()):
                    break
                folder.rmdir()


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "holder unknown"
