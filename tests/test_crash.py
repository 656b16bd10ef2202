"""Crash safety: SIGKILL `samcache embed` at many moments, re-run it, and get an uninterrupted run's cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from samcache.cache.reader import EmbeddingCache
from tests.helpers import STAMPS_PAGES

pytestmark = pytest.mark.slow

# Each moment is a crash point inside samcache (cache.crash_point) and the pass at which it fires.
KILL_MOMENTS = [
    "shard-row-written:1",  # the very first embedding is in the shard being built
    "shard-row-written:2",  # mid-shard: a shard holds one row of two
    "shard-before-close:1",  # the shard's bytes are in NAME.h5.tmp, not yet flushed or fsynced
    "shard-before-rename:1",  # written and fsynced, not yet renamed: still invisible
    "shard-committed:1",  # just after the rename, before the run goes on
    "batch-done:2",  # between two batches
]


def _embed(dataset: Path, cache: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("SAMCACHE_CRASH_AT", None)
    if crash_at:
        env["SAMCACHE_CRASH_AT"] = crash_at
    command = [sys.executable, "-m", "samcache", "embed", str(dataset), "--out", str(cache),
               "--batch-size", "1", "--shard-images", "2", "--workers", "1"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def _snapshot(cache_dir: Path) -> dict:
    cache = EmbeddingCache(cache_dir)
    return {
        info.name: (cache.embedding(info.index), info.original_size, info.input_size, info.split, info.file.sha256,
                    [(o.object_id, o.box, o.category, o.rle["counts"]) for o in info.objects])
        for info in cache.images
    }


def test_sigkill_at_many_moments_then_rerun_equals_uninterrupted(stamps, tmp_path):
    dataset = stamps  # the shared data set, only read: the killed runs write their own caches under tmp_path
    reference = _embed(dataset, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    expected = _snapshot(tmp_path / "reference")
    assert len(expected) == STAMPS_PAGES

    cache = tmp_path / "killed"
    committed_before = 0
    for moment in KILL_MOMENTS:
        run = _embed(dataset, cache, crash_at=moment)
        assert run.returncode == -signal.SIGKILL, (moment, run.returncode, run.stderr[-2000:])
        # After every kill the cache opens, and holds only complete, correct images.
        if (cache / "cache.json").exists():
            partial = _snapshot(cache)
            assert len(partial) >= committed_before, moment
            committed_before = len(partial)
            for name, value in partial.items():
                np.testing.assert_array_equal(value[0], expected[name][0])
                assert value[1:] == expected[name][1:]

    # An outside kill at a moment nobody chose: once a shard is committed, kill -9 the process.
    process = subprocess.Popen([sys.executable, "-m", "samcache", "embed", str(dataset), "--out", str(cache),
                                "--batch-size", "1", "--shard-images", "1", "--workers", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards_before = len(list((cache / "shards").glob("*.h5")))
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if len(list((cache / "shards").glob("*.h5"))) > shards_before:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()

    final = _embed(dataset, cache)
    assert final.returncode == 0, final.stderr
    assert not list((cache / "shards").glob("*.tmp"))
    got = _snapshot(cache)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name][0], expected[name][0])
        assert got[name][1:] == expected[name][1:], name
    # Nothing committed was embedded twice: every image is in exactly one shard.
    assert EmbeddingCache(cache).superseded == 0
    again = _embed(dataset, cache)
    assert f"nothing to embed: all {STAMPS_PAGES} images are already in" in again.stdout
