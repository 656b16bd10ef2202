"""Small file helpers: a file's identity (content hash, size, mtime) and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from samcache.errors import OutputError, SamcacheError


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileIdentity:
    """Which file, with which content: what the cache records of every image it saw.

    Arguments:
      path: the file's path as the dataset gave it.
      sha256: SHA-256 of its bytes ("" when it could not be read).
      size: its size in bytes; mtime_ns: its modification time (0 or -1 when it could not be read).
    """

    path: str
    sha256: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | Path) -> "FileIdentity":
        """Stats and hashes `path` (OSError when it cannot be read)."""
        stat = os.stat(path)
        return cls(str(path), sha256_file(path), stat.st_size, stat.st_mtime_ns)

    def unchanged(self, path: str | Path) -> bool:
        """True when `path` still has this content: size and mtime agree, or, when only the mtime
        moved (a copy, a touch), the SHA-256 does."""
        try:
            stat = os.stat(path)
        except OSError:
            return False
        if stat.st_size != self.size:
            return False
        return stat.st_mtime_ns == self.mtime_ns or (bool(self.sha256) and sha256_file(path) == self.sha256)


def refuse_to_replace(path: str | Path, *, overwrite: bool, flag: str = "--overwrite") -> None:
    """Raises when `path` is an existing file, or a folder with anything in it, unless `overwrite`:
    outputs never replace what the user did not ask to replace."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    kind = "folder with files in it" if path.is_dir() else "file"
    raise SamcacheError(f"{path} already exists (a {kind}); pass {flag} to replace it, or choose another --out")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` so that readers (and a crash) see either the old file or the new one.
    A failed write (disk full, read-only folder) raises OutputError and leaves the old file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would surprise users sharing a cache
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failure(path, exc) from exc
        raise


def append_text(path: str | Path, text: str) -> None:
    """Appends `text` to a log file; a failed write raises OutputError."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise write_failure(path, exc) from exc


def write_failure(path: str | Path, exc: OSError) -> OutputError:
    """The one-line error for an output that could not be written."""
    return OutputError(f"could not write {path}: {exc.strerror or exc}")


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_json_mapping(path: str | Path) -> dict:
    """A JSON object read from `path`; {} when the file is missing, unreadable or holds no object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
