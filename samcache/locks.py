"""One writer at a time: a lock per cache folder and per run folder, and who holds it.

A writer (`samcache embed` into a cache, `samcache train` into a run folder) holds an
exclusive lock on FOLDER/.samcache.lock for as long as it writes. The lock is the operating
system's (filelock: flock on POSIX), so it goes when its process goes, however it ends: a
killed writer never leaves a stale lock, and the next run simply takes it. Beside it,
FOLDER/.samcache-writer.json says who holds it (command, pid, host, start time), so a second
writer is refused with a message naming the holder, and a reader can say that what it reads
is still being written. Under torchrun the job is one writer: rank 0 holds the lock for all
ranks.

Readers probe the lock by trying to take it for an instant; writers therefore wait a moment
(`WAIT_SECONDS`) before they give up, so that a probe never turns a writer away.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from filelock import FileLock, Timeout

from samcache.errors import SamcacheError
from samcache.fileio import atomic_write_json, read_json_mapping

LOCK_NAME = ".samcache.lock"
HOLDER_NAME = ".samcache-writer.json"
WAIT_SECONDS = 2.0


class FolderBusyError(SamcacheError):
    """Another process is writing the folder."""


class WriterLock:
    """`with WriterLock(folder, what="cache"):` makes this process the folder's one writer.

    Arguments:
      folder: the cache or run folder (created when missing).
      what: what the folder is, for messages ("cache", "run folder").
      enabled: False makes it a no-op (ranks other than 0 under torchrun).
      hint: what the user can do instead when the folder cannot be written, for the message.
    """

    def __init__(self, folder: str | Path, *, what: str, enabled: bool = True, hint: str = ""):
        self.folder, self.what, self.enabled, self.hint = Path(folder), what, enabled, hint
        self._lock: Optional[FileLock] = None
        self._created = False

    def __enter__(self) -> "WriterLock":
        if not self.enabled:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise SamcacheError(f"{self.folder} is a file; the {self.what} must be a folder: choose another --out")
        try:
            self._created = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.folder / LOCK_NAME))
            lock.acquire(timeout=WAIT_SECONDS)
        except Timeout:
            holder = holder_of(self.folder, probe=False)
            raise FolderBusyError(
                f"{self.folder} is being written by another samcache process ({describe(holder)}): one writer at a "
                f"time per {self.what}. Wait for it to finish, or stop it, and run this again"
            ) from None
        except OSError as exc:
            hint = f"; {self.hint}" if self.hint else ""
            raise SamcacheError(f"cannot write to the {self.what} {self.folder} ({exc.strerror or exc}){hint}") from exc
        self._lock = lock
        atomic_write_json(self.folder / HOLDER_NAME, {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python",
            "pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        })
        return self

    def __exit__(self, *exc_info) -> None:
        if self._lock is None:
            return
        (self.folder / HOLDER_NAME).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None
        # A run refused before it wrote anything leaves no folder behind that it made.
        if self._created and {p.name for p in self.folder.iterdir()} <= {LOCK_NAME}:
            (self.folder / LOCK_NAME).unlink(missing_ok=True)
            self.folder.rmdir()


def holder_of(folder: str | Path, *, probe: bool = True) -> Optional[dict]:
    """Who is writing `folder` right now ({"command", "pid", "host", "since"}), or None when no one is.

    With `probe`, the lock itself decides (a holder file left by a killed writer means nothing);
    a folder this process cannot lock (read-only) counts as not being written.
    """
    folder = Path(folder)
    if probe:
        if not (folder / LOCK_NAME).exists():
            return None
        try:
            lock = FileLock(str(folder / LOCK_NAME))
            lock.acquire(timeout=0)
        except Timeout:
            pass
        except OSError:
            return None
        else:
            lock.release()
            return None
    return read_json_mapping(folder / HOLDER_NAME)


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "holder unknown"
    return (f"`{holder.get('command', '?')}`, pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')}")
