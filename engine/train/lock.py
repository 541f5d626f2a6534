"""One training run per output folder, enforced by an operating-system file lock.

Two runs into one `--out` delete each other's checkpoints (each clears the stale temporary folders it finds, and
prunes old checkpoints), and can both report success while one result is lost. `RunLock` takes an exclusive
lock on `<out>/.lora-lab-run.lock` (flock on POSIX, msvcrt.locking on Windows) and writes its PID there; a second
run is refused at once, naming the folder and that PID. The OS drops the lock when the process ends however it
ends (kill -9 included), so a crash never leaves the folder locked; the file itself stays, holding no lock.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from engine.errors import UserError

LOCK_FILE = ".lora-lab-run.lock"


class RunFolderBusy(UserError):
    """Another live process is training into this folder."""


class RunLock:
    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self._handle = None
        self._created = False

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> "RunLock":
        if self._handle is not None:
            return self
        self._created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # "a+" neither truncates (the holder's PID stays readable) nor fails when the file exists.
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            _lock(handle)
        except OSError:
            try:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
            except OSError:        # Windows: the holder's locked byte cannot be read
                holder = "unknown"
            handle.close()
            raise RunFolderBusy(f"{self.out_dir} is in use by another training run (process {holder}); wait for it "
                                "to finish, stop it, or choose another output folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                _unlock(handle)
            finally:
                handle.close()     # closing drops the lock too; the explicit unlock is for clarity on Windows

    def abandon(self) -> None:
        """Release after a start that failed: a folder this lock created and nothing else wrote to is removed
        again, so a refused run leaves no trace."""
        created, self._created = self._created, False
        if created and self._handle is not None and [p.name for p in self.out_dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink(missing_ok=True)
            self.release()
            try:
                self.out_dir.rmdir()
            except OSError:
                pass
        self.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


if sys.platform == "win32":
    import msvcrt

    def _lock(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)   # byte 0; raises OSError when another holds it

    def _unlock(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)   # BlockingIOError (an OSError) when held

    def _unlock(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
