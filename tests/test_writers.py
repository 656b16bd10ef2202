"""One writer at a time: a second embed or train into the same folder is refused, naming
the first; readers say the cache is being written; shard names never collide."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from samcache.cache.format import Provenance, is_cache, open_for_writing
from samcache.cache.reader import EmbeddingCache
from samcache.cache.writer import ShardWriter
from samcache.locks import HOLDER_NAME, LOCK_NAME, FolderBusyError, WriterLock, holder_of
from samcache.train.runs import RunFolder
from tests.helpers import micro_weights, tree_fingerprint

EMBED = ["--workers", "0", "--batch-size", "1", "--shard-images", "1", "--precision", "fp32"]
TRAIN = ["--epochs", "1", "--batch-size", "1", "--objects-per-image", "1", "--workers", "0"]


def _samcache(*args: str, hold_at: str | None = None, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAMCACHE_CRASH", "SAMCACHE_HOLD"))}
    if hold_at:
        env["SAMCACHE_HOLD_AT"] = hold_at  # "point:FILE": waits at the point while FILE exists
    command = [sys.executable, "-m", "samcache", *args]
    if wait:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_the_lock_names_its_holder_and_goes_with_it(tmp_path):
    folder = tmp_path / "cache"
    with WriterLock(folder, what="cache"):
        holder = holder_of(folder)
        assert holder["pid"] == os.getpid() and holder["command"]
        with pytest.raises(FolderBusyError, match=rf"being written by another samcache process \(.*pid {os.getpid()}"):
            with WriterLock(folder, what="cache"):
                pass
    assert holder_of(folder) is None and not (folder / HOLDER_NAME).exists()
    assert not folder.exists()  # it made the folder and nothing else was written: gone again
    folder.mkdir()
    (folder / HOLDER_NAME).write_text('{"pid": 1}')  # left by a killed writer: the OS lock decides
    assert holder_of(folder) is None
    with WriterLock(folder, what="cache"):
        assert holder_of(folder)["pid"] == os.getpid()
    assert folder.exists() and not (folder / HOLDER_NAME).exists()


@pytest.mark.slow
def test_a_second_embed_into_the_same_cache_is_refused_and_readers_are_told(stamps, tmp_path):
    cache, hold = tmp_path / "cache", tmp_path / "hold"
    hold.touch()  # the first writer stops after its first image until this file goes
    first = _samcache("embed", str(stamps), "--out", str(cache), *EMBED, hold_at=f"batch-done:{hold}", wait=False)
    _wait_for(cache / HOLDER_NAME, first)
    _wait_for(cache / "cache.json", first)  # written once the weights have loaded
    second = _samcache("embed", str(stamps), "--out", str(cache), *EMBED)
    assert second.returncode == 1
    assert f"pid {first.pid}" in second.stderr and "one writer at a time per cache" in second.stderr
    info = _samcache("info", str(cache))
    assert info.returncode == 0 and "is being written" in info.stderr and f"pid {first.pid}" in info.stderr
    hold.unlink()
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    done = EmbeddingCache(cache)
    assert len(done) == len(list((stamps / "images").iterdir())) and done.superseded == 0
    again = _samcache("embed", str(stamps), "--out", str(cache), *EMBED)
    assert again.returncode == 0 and "nothing to embed" in again.stdout
    assert "is being written" not in _samcache("info", str(cache)).stderr


@pytest.mark.slow
def test_a_second_train_into_the_same_run_folder_is_refused(stamps_cache, tmp_path):
    run, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()
    first = _samcache("train", str(stamps_cache), "--out", str(run), *TRAIN, hold_at=f"train-step:{hold}", wait=False)
    _wait_for(run / HOLDER_NAME, first)
    second = _samcache("train", str(stamps_cache), "--out", str(run), *TRAIN, "--lr", "5e-3")
    assert second.returncode == 1 and f"pid {first.pid}" in second.stderr
    assert "one writer at a time per run folder" in second.stderr
    hold.unlink()
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    config = RunFolder(run).saved_config()
    assert config["lr"] == 0.0001  # the first run's, not the refused one's
    assert RunFolder(run).read_checkpoint("best").config == RunFolder(run).read_checkpoint("last").config == config


def test_shard_names_differ_even_for_the_same_generation_rank_and_sequence(tmp_path):
    provenance = Provenance("tiny", "x", {}, "percentile")
    open_for_writing(tmp_path / "c", provenance)
    writers = [ShardWriter(tmp_path / "c", generation=1, rank=0, sequence=0, provenance=provenance)
               for _ in range(2)]
    assert writers[0].final_path != writers[1].final_path
    for writer in writers:
        writer.abandon()


def test_stray_files_that_look_like_shards_are_not_read(stamps_cache_copy):
    shards = sorted((stamps_cache_copy / "shards").glob("*.h5"))
    before = EmbeddingCache(stamps_cache_copy)
    (stamps_cache_copy / "shards" / f"{shards[0].stem} (copy).h5").write_bytes(shards[0].read_bytes())
    (stamps_cache_copy / "shards" / "x.h5").write_bytes(b"not hdf5")
    after = EmbeddingCache(stamps_cache_copy)
    assert after.shards == before.shards and len(after) == len(before) and after.superseded == 0


def test_a_fresh_cache_folder_with_only_a_lock_is_still_a_new_cache(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("")
    open_for_writing(folder, Provenance("tiny", "x", {}, "percentile"))
    assert is_cache(folder)
    assert tree_fingerprint(folder)  # header written


def test_a_shard_from_a_cache_of_other_weights_is_refused_by_name(stamps, stamps_cache_copy, tmp_path):
    from click.testing import CliRunner

    from samcache.cli import main
    from tests.helpers import embed

    embed(stamps, tmp_path / "other", checkpoint=micro_weights(tmp_path, seed=1))
    stray = sorted((tmp_path / "other" / "shards").glob("*.h5"))[0]
    (stamps_cache_copy / "shards" / stray.name).write_bytes(stray.read_bytes())
    result = CliRunner().invoke(main, ["info", str(stamps_cache_copy)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert stray.name in result.output and "weights_sha256 is" in result.output and "in the shard" in result.output


@pytest.mark.parametrize("change, message", [
    (lambda p: {**p, "colour": "red"}, "unknown colour"),
    (lambda p: {k: v for k, v in p.items() if k != "intensity"}, "missing intensity"),
])
def test_a_header_with_missing_or_extra_keys_is_a_message(stamps_cache_copy, change, message):
    import json

    from click.testing import CliRunner

    from samcache.cli import main

    header_path = stamps_cache_copy / "cache.json"
    header = json.loads(header_path.read_text())
    header["provenance"] = change(header["provenance"])
    header_path.write_text(json.dumps(header))
    result = CliRunner().invoke(main, ["info", str(stamps_cache_copy)])
    assert result.exit_code == 1 and message in result.output and "cache.json" in result.output
    assert "Traceback" not in result.output


def test_out_pointing_at_a_file_is_a_message(stamps, stamps_cache, tmp_path):
    from click.testing import CliRunner

    from samcache.cli import main

    target = tmp_path / "a_file"
    target.write_text("mine")
    for argv in (["embed", str(stamps), "--out", str(target)],
                 ["train", str(stamps_cache), "--out", str(target), "--epochs", "1"]):
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 1 and "is a file" in result.output
        assert "must be a folder" in result.output or "goes into a folder" in result.output
        assert target.read_text() == "mine"
