"""Output folders samcache owns: where a command may write, and what `--overwrite` may replace.

A command that writes a folder of results (`train`'s run, `eval`'s report, `predict`'s masks,
`data stamps`' pages) takes a folder that is new, empty, or samcache's own output of the same kind.
Ownership is a marker file, `.samcache-output.json`, written before anything else:

    {"kind": "evaluation report", "samcache_version": "...", "complete": false, "kept": [...]}

`kept` names what the folder held that samcache did not write (only a folder samcache already owns
may hold such files: a user's notes beside a report); `complete` turns true, with `files` listing
what the command wrote, when it finished. So a failed command leaves a folder marked incomplete
(`samcache` retries into it without `--overwrite`), and `--overwrite` removes exactly the files the
earlier run listed before writing the new ones: an overwritten folder holds only the new run's
files and whatever the user put there, never a file samcache did not write.

A folder without the marker that holds anything is refused, naming the first foreign file; a cache
(its `cache.json`) and another kind of output are refused by name. Folders written before the
marker existed are recognised by their own files (the `legacy` argument of `claim`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

from samcache import __version__
from samcache.errors import OutputError
from samcache.fileio import atomic_write_json

MARKER_NAME = ".samcache-output.json"
_CACHE_HEADER = "cache.json"  # cache/format.HEADER_NAME: a cache is never another command's output


def is_samcache_file(name: str) -> bool:
    """Names samcache keeps in any folder it writes (its marker, its lock, its temporary files)."""
    return name.startswith(".samcache") or (name.startswith(".") and name.endswith(".tmp"))


def read_marker(folder: str | Path) -> Optional[dict]:
    """The marker of `folder`, or None when it has none (or an unreadable one: then it is not ours)."""
    try:
        marker = json.loads((Path(folder) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not is_samcache_file(p.name))


def _relative_files(folder: Path) -> list[str]:
    """Every file under `folder` (paths relative to it), samcache's own bookkeeping left out."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in files:
            if not is_samcache_file(name):
                out.append(str((Path(root) / name).relative_to(folder)))
    return sorted(out)


class OutputFolder:
    """A folder a command writes, claimed for it (see the module docstring).

    Arguments:
      path: the folder (`--out`).
      kind: what it holds, in words: "run", "evaluation report", "predictions", "stamps dataset".
    """

    def __init__(self, path: str | Path, kind: str):
        self.path, self.kind = Path(path), kind
        self._kept: list[str] = []

    def check(self, *, overwrite: bool = False, again: bool = False,
              legacy: Optional[Callable[[Path], bool]] = None) -> None:
        """Refuses a folder this command may not write into; writes nothing.

        Arguments:
          overwrite: a complete earlier output of this kind may be replaced.
          again: an earlier output of this kind is continued or replaced by the caller's own rules
            (a run folder: resume, or start over when nothing was saved).
          legacy: recognises this kind's folders written before the marker existed.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise OutputError(f"--out {path} is a file; the {self.kind} goes into a folder: choose a new or empty one")
        if not path.exists():
            return
        entries = _entries(path)
        marker = read_marker(path)
        if marker is None:
            if not entries:
                return
            if (path / _CACHE_HEADER).is_file():
                raise OutputError(f"--out {path} is a samcache cache, not a folder for output of this kind "
                                  f"({self.kind}): choose another --out")
            if legacy is not None and legacy(path):
                marker = {"kind": self.kind, "complete": True}
            else:
                raise OutputError(
                    f"--out {path} holds files samcache did not write ({entries[0]}"
                    f"{f' and {len(entries) - 1} more' if len(entries) > 1 else ''}): samcache writes only into "
                    f"a new or empty folder, or its own earlier output of this kind ({self.kind}); "
                    "choose another --out")
        if marker["kind"] != self.kind:
            raise OutputError(f"--out {path} holds samcache output of another kind ({marker['kind']}, not "
                              f"{self.kind}): choose another --out")
        if marker.get("complete") and not (overwrite or again):
            raise OutputError(f"--out {path} already holds samcache output ({self.kind}); pass --overwrite to "
                              "replace it, or choose another --out")

    def claim(self, *, overwrite: bool = False, again: bool = False,
              legacy: Optional[Callable[[Path], bool]] = None, inputs: Iterable[str | Path] = ()) -> "OutputFolder":
        """Checks the folder (`check`), removes what an earlier output of this kind wrote (every file
        it listed, or, when it did not finish, every file it added), and marks the folder as this
        command's, incomplete. `inputs`: files this command reads, never removed."""
        self.check(overwrite=overwrite, again=again, legacy=legacy)
        self.path.mkdir(parents=True, exist_ok=True)
        marker = read_marker(self.path)
        earlier = self._earlier_files(marker)
        protected = [Path(p) for p in inputs if Path(p).exists()]
        for name in earlier:
            target = self.path / name
            if any(_same_file(target, p) for p in protected):
                raise OutputError(f"{target} is an input of this command, and a file of samcache's earlier output "
                                  f"({self.kind}) in --out {self.path}, which --overwrite would remove: "
                                  "choose another --out")
        for name in earlier:
            (self.path / name).unlink(missing_ok=True)
        _remove_emptied_folders(self.path, earlier)
        self._kept = _relative_files(self.path)
        self._write_marker(complete=False)
        return self

    def mark(self) -> "OutputFolder":
        """Marks the folder as samcache's output of this kind without removing anything: for kinds
        that continue in place (a run folder is resumed)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if read_marker(self.path) is None:
            atomic_write_json(self.path / MARKER_NAME, {"kind": self.kind, "samcache_version": __version__})
        return self

    def _earlier_files(self, marker: Optional[dict]) -> list[str]:
        """The files an earlier output of this kind wrote here."""
        if marker is None:  # new, empty, or written before the marker: the new files replace theirs by name
            return []
        if marker.get("complete"):
            listed = marker.get("files", [])
        else:  # stopped before it could list them: whatever appeared since it claimed the folder
            kept = set(marker.get("kept", []))
            listed = [name for name in _relative_files(self.path) if name not in kept]
        return [name for name in listed if isinstance(name, str) and _inside(self.path, name)]

    def files(self) -> list[str]:
        """What this command wrote so far: the folder's files less those it found there."""
        kept = set(self._kept)
        return [name for name in _relative_files(self.path) if name not in kept]

    def complete(self) -> None:
        """Marks the output finished, listing its files (what a later --overwrite removes)."""
        self._write_marker(complete=True)

    def _write_marker(self, *, complete: bool) -> None:
        marker = {"kind": self.kind, "samcache_version": __version__, "complete": complete, "kept": self._kept}
        if complete:
            marker["files"] = self.files()
        atomic_write_json(self.path / MARKER_NAME, marker)


def refuse_inputs_as_outputs(outputs: Iterable[Path], inputs: Iterable[str | Path], *, out_dir: Path) -> None:
    """Raises when a file the command is about to write is one it reads."""
    existing = [Path(p) for p in inputs if Path(p).exists()]
    for output in outputs:
        if output.exists() and any(_same_file(output, p) for p in existing):
            raise OutputError(f"{output} is an input of this command, and writing into --out {out_dir} would "
                              "replace it: choose another --out")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(folder: Path, name: str) -> bool:
    target = (folder / name).resolve()
    return target != folder.resolve() and folder.resolve() in target.parents


def _remove_emptied_folders(folder: Path, removed: list[str]) -> None:
    """Removes the subfolders that held removed files and are empty now (deepest first)."""
    parents = {parent for name in removed for parent in (folder / name).parents
               if parent != folder and folder in parent.parents}
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        try:
            parent.rmdir()
        except OSError:  # not empty: something else is in it
            pass
