"""When the machine says no: a full disk, a read-only folder, a shard with bad values.
Each is a one-line message and exit code 1; nothing already written is lost; the same command
finishes the job once the cause is gone. Through the command line, in real subprocesses.

A full disk is made two ways: a file-size limit (RLIMIT_FSIZE, any user, any machine: writes fail
with EFBIG, like ENOSPC an ordinary OSError) and, where this process may mount one, a small tmpfs
that really fills up (ENOSPC: the case that used to crash HDF5 at exit)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from tests.helpers import EMBED_FLAGS, STAMPS_PAGES, TINY_EMBED_FLAGS, copy_tree, tree_fingerprint

TRAIN = ["--epochs", "1", "--batch-size", "2", "--objects-per-image", "2", "--workers", "0"]


def _samcache(*args, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAMCACHE_CRASH", "SAMCACHE_HOLD"))}
    return subprocess.run([sys.executable, "-m", "samcache", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600, preexec_fn=limit if file_size_limit else None)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])  # not a crash (139), not a bug
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@contextmanager
def _small_tmpfs(size: str):
    """A tmpfs of `size` mounted at a fresh folder (skips where mounting is not allowed)."""
    folder = Path(f"/tmp/samcache-tmpfs-{os.getpid()}")
    folder.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True) if shutil.which("mount") and os.geteuid() == 0 else None
    if mounted is None or mounted.returncode != 0:
        folder.rmdir()
        pytest.skip("this machine does not let the tests mount a tmpfs; the file-size limit case covers it")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a handle may still be closing
        folder.rmdir()


def _keep_first_shards(cache: Path, keep: int) -> list[str]:
    """Takes all but the first `keep` shards out, so that `embed` has images left to write."""
    for shard in sorted((cache / "shards").glob("*.h5"))[keep:]:
        shard.unlink()
    return [info.name for info in EmbeddingCache(cache).images]


@contextmanager
def _full_disk(kind: str, cache: Path):
    """(cache, file-size limit for the run, a function that makes space) for a cache whose next
    shard (2 images, 4.2 MB) cannot be written."""
    if kind == "file-size limit":
        yield cache, 3 << 20, lambda: None
        return
    with _small_tmpfs("6m") as mount:  # one shard (4.2 MB) fits, the next does not
        shutil.copytree(cache, mount / "cache", copy_function=shutil.copy2)
        yield mount / "cache", None, lambda: subprocess.run(["mount", "-o", "remount,size=64m", str(mount)],
                                                            check=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file-size limit", "tmpfs"])
def test_embed_on_a_full_disk_keeps_what_it_committed_and_the_same_command_finishes(stamps, tiny_cache, tmp_path, kind):
    stamps_cache_copy = copy_tree(tiny_cache, tmp_path / "cache")  # the tiny's 2 MiB embeddings fill the disk
    _keep_first_shards(stamps_cache_copy, 2 if kind == "file-size limit" else 1)
    with _full_disk(kind, stamps_cache_copy) as (cache, file_size_limit, make_space):
        kept = [info.name for info in EmbeddingCache(cache).images]
        before = tree_fingerprint(cache / "shards")
        failed = _samcache("embed", stamps, "--out", cache, *TINY_EMBED_FLAGS, file_size_limit=file_size_limit)
        message = _one_error_line(failed)
        assert f"could not write to {cache}: " in message and "Every shard committed before this is intact" in message
        assert ("File too large" if file_size_limit else "No space left on device") in message
        assert tree_fingerprint(cache / "shards") == before  # committed shards untouched, no .tmp left behind
        assert [info.name for info in EmbeddingCache(cache).images] == kept

        make_space()
        again = _samcache("embed", stamps, "--out", cache, *TINY_EMBED_FLAGS)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"embedded {STAMPS_PAGES - len(kept)} images" in again.stdout, again.stdout
        assert _samcache("verify", cache).returncode == 0
        assert len(EmbeddingCache(cache)) == STAMPS_PAGES


@pytest.mark.slow
def test_train_on_a_full_disk_says_what_is_kept_and_runs_again(tiny_cache, tmp_path):
    stamps_cache = tiny_cache  # the tiny's checkpoints (about 16 MB) exceed the limit
    run = tmp_path / "run"
    failed = _samcache("train", stamps_cache, "--out", run, *TRAIN, file_size_limit=8 << 20)  # best.pt is larger
    message = _one_error_line(failed)
    assert f"could not write {run / 'best.pt'}: File too large. Training stopped" in message
    assert f"No checkpoint was saved yet: free space, then run the same command again (it starts over in {run})" \
        in message
    assert not list(run.glob("*.pt")) and not list(run.glob(".*.tmp"))
    again = _samcache("train", stamps_cache, "--out", run, *TRAIN)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "last.pt").is_file()


def test_outputs_that_cannot_be_written_are_messages(stamps, stamps_run, tmp_path):
    """eval, export and predict writing where no file may be written (EACCES/EROFS/ENOSPC are what
    users meet; a folder path that is a file makes the same OSError class for any user)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    image = sorted((stamps / "images").iterdir())[0]
    runner = CliRunner()
    export = runner.invoke(main, ["export", "--run", str(stamps_run), "--out", str(blocker / "w.pth")])
    assert export.exit_code == 1 and f"could not write {blocker / 'w.pth'}" in export.output, export.output
    predict = runner.invoke(main, ["predict", str(image), "--box", "10,10,60,60", "--run", str(stamps_run),
                                   "--out", str(blocker / "pred")])
    assert predict.exit_code == 1 and "Traceback" not in predict.output, predict.output
    assert str(blocker) in predict.output


@contextmanager
def _read_only(folder: Path):
    """`folder` (already filled) made read-only for this process: chmod for a normal user, a
    read-only tmpfs for root (which ignores permissions); skips where neither is possible."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield folder
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    with _small_tmpfs("256m") as mount:
        shutil.copytree(folder, mount / folder.name, copy_function=shutil.copy2)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount / folder.name


def test_read_only_folders_are_messages_and_reading_them_works(stamps, stamps_cache, stamps_run, tmp_path):
    holder = tmp_path / "holder"
    shutil.copytree(stamps_cache, holder / "cache")
    shutil.copytree(stamps_run, holder / "run")
    with _read_only(holder) as ro:
        runner = CliRunner()
        into = runner.invoke(main, ["embed", str(stamps), "--out", str(ro / "new-cache"), *EMBED_FLAGS])
        assert into.exit_code == 1 and f"cannot write to the cache {ro / 'new-cache'}" in into.output, into.output
        verify = runner.invoke(main, ["verify", str(ro / "cache")])
        assert verify.exit_code == 1 and "--check-only` only reads" in verify.output, verify.output
        assert runner.invoke(main, ["verify", str(ro / "cache"), "--check-only"]).exit_code == 0
        trained = runner.invoke(main, ["train", str(ro / "cache"), "--out", str(tmp_path / "run"), *TRAIN])
        assert trained.exit_code == 0, trained.output  # a read-only cache is read as any other
        scored = runner.invoke(main, ["eval", str(ro / "cache"), "--run", str(ro / "run"),
                                      "--out", str(tmp_path / "report")])
        assert scored.exit_code == 0 and "could not record this evaluation in the run folder" in scored.output
        assert (tmp_path / "report" / "summary.json").is_file()


def _edit_first_shard(cache: Path, column: str, edit) -> tuple[str, str]:
    shard = sorted((cache / "shards").glob("*.h5"))[0]
    with h5py.File(shard, "r+") as f:
        values = f[column][()]
        del f[column]
        f.create_dataset(column, data=edit(values))
        first = f["images/name"][0].decode()
    return shard.name, first


@pytest.mark.parametrize("column, edit, why", [
    ("images/original_size", lambda v: np.where(np.arange(v.size).reshape(v.shape) == 0, 0, v), "a side below 1"),
    ("images/input_size", lambda v: v * 4, "outside 1..1024"),
    ("images/object_start", lambda v: v + 1000, "outside the"),
    ("images/object_count", lambda v: -v, "negative"),
    ("objects/box", lambda v: np.full_like(v, np.nan), "not a finite box"),
    ("images/split", lambda v: np.array([b"everything"] * len(v), dtype=object), "not one of train, val, test"),
    ("objects/rle_counts", lambda v: np.array([b""] * len(v), dtype=object), "an empty mask encoding"),
    ("images/image_id", lambda v: v[:-1], "columns of different lengths"),
])
def test_bad_values_in_a_shards_tables_are_a_message_naming_shard_column_and_image(
        stamps_cache_copy, tmp_path, column, edit, why):
    shard, first = _edit_first_shard(stamps_cache_copy, column, edit)
    for command in (["info", str(stamps_cache_copy)],
                    ["train", str(stamps_cache_copy), "--out", str(tmp_path / "run"), *TRAIN]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert shard in result.output and why in result.output, result.output
        if "different lengths" not in why:
            assert column in result.output
        if column.startswith("images/") and "different lengths" not in why:
            assert repr(first) in result.output
    assert not (tmp_path / "run").exists()
