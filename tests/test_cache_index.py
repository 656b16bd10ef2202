"""The columnar index: opening from index.npz gives exactly the view the shards give,
whatever happened since it was written (new shards, shards taken out, a damaged index)."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from samcache.cache import index as cache_index
from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from tests.helpers import EMBED_FLAGS


def _view(cache_dir) -> dict:
    cache = EmbeddingCache(cache_dir)
    images = [(i.name, i.split, i.image_id, i.original_size, i.input_size, i.file, i.annotations_sha256,
               [(o.object_id, o.box, o.category, o.rle["counts"]) for o in i.objects]) for i in cache.images]
    return {"images": images, "failed": cache.failed, "removed": cache.removed, "superseded": cache.superseded,
            "splits": cache.splits, "info": {k: v for k, v in cache.info().items() if k != "cache"}}


def test_embed_writes_the_index_and_it_gives_the_shards_view(stamps_cache_copy):
    index = stamps_cache_copy / cache_index.INDEX_NAME
    assert index.is_file()
    assert EmbeddingCache(stamps_cache_copy).shards_outside_index == 0
    with_index = _view(stamps_cache_copy)
    index.unlink()
    assert EmbeddingCache(stamps_cache_copy).shards_outside_index == len(list((stamps_cache_copy / "shards").iterdir()))
    assert _view(stamps_cache_copy) == with_index
    index.write_bytes(b"PK\x03\x04 not really a zip")  # damaged: ignored, never an error
    assert _view(stamps_cache_copy) == with_index


def test_a_stale_index_is_completed_from_the_shards(stamps_copy, stamps_cache_copy):
    # An annotation edit gives a new shard (a refresh record), an image removal another record;
    # then the index is put back as it was before both.
    old_index = (stamps_cache_copy / cache_index.INDEX_NAME).read_bytes()
    test = json.loads((stamps_copy / "test.json").read_text())
    test["annotations"].pop(0)
    (stamps_copy / "test.json").write_text(json.dumps(test))
    train = json.loads((stamps_copy / "train.json").read_text())
    dropped = train["images"].pop(0)
    train["annotations"] = [a for a in train["annotations"] if a["image_id"] != dropped["id"]]
    (stamps_copy / "train.json").write_text(json.dumps(train))
    result = CliRunner().invoke(main, ["embed", str(stamps_copy), "--out", str(stamps_cache_copy), *EMBED_FLAGS])
    assert result.exit_code == 0 and "refreshed annotations of 1" in result.output, result.output
    expected = _view(stamps_cache_copy)
    assert expected["superseded"] >= 2 and dropped["file_name"] in expected["removed"]

    (stamps_cache_copy / cache_index.INDEX_NAME).write_bytes(old_index)
    stale = EmbeddingCache(stamps_cache_copy)
    assert stale.shards_outside_index == 1  # the new shard; the others come from the index
    assert _view(stamps_cache_copy) == expected

    # A shard the index covers taken out by hand: its rows leave the view as they would without an index.
    first = sorted((stamps_cache_copy / "shards").glob("*.h5"))[0]
    first.rename(stamps_cache_copy / "moved-away.h5")
    from_index = _view(stamps_cache_copy)
    (stamps_cache_copy / cache_index.INDEX_NAME).unlink()
    assert from_index == _view(stamps_cache_copy)
    assert len(from_index["images"]) < len(expected["images"])


def _tables(rows: list[tuple[str, str, int]]) -> cache_index.Tables:
    """Tables of records (kind, name, shard); images without objects."""
    t = cache_index.empty_tables()
    images = [(n, s) for k, n, s in rows if k == "image"]
    failed = [(n, s) for k, n, s in rows if k == "failed"]
    removed = [(n, s) for k, n, s in rows if k == "removed"]
    b = cache_index.as_bytes
    n = len(images)
    t.name, t.path, t.sha256 = b([x for x, _ in images]), b(["p"] * n), b([f"{s}" for _, s in images])
    t.split, t.annotations_sha256 = b(["train"] * n), b([""] * n)
    t.file_size = t.file_mtime_ns = t.image_id = np.zeros(n, np.int64)
    t.original_size = t.input_size = np.ones((n, 2), np.int32)
    t.object_start = t.object_count = np.zeros(n, np.int64)
    t.image_shard, t.image_row = np.array([s for _, s in images], np.int32), np.arange(n)
    t.failed_name, t.failed_shard = b([x for x, _ in failed]), np.array([s for _, s in failed], np.int32)
    t.failed_path = t.failed_sha256 = t.failed_error = b([""] * len(failed))
    t.failed_file_size = t.failed_file_mtime_ns = np.zeros(len(failed), np.int64)
    t.removed_name, t.removed_shard = b([x for x, _ in removed]), np.array([s for _, s in removed], np.int32)
    t.removed_reason = b(["gone"] * len(removed))
    return t


def test_the_latest_record_wins_as_the_shard_protocol_says():
    t = _tables([
        ("image", "a", 0), ("image", "a", 1),  # a later shard replaces an image
        ("image", "b", 0), ("removed", "b", 1),  # then it is taken out
        ("removed", "c", 1), ("image", "c", 1),  # within a shard removals come first: c is back
        ("image", "d", 0), ("failed", "d", 0),  # within a shard a failure follows the images
        ("failed", "e", 0), ("image", "e", 2),  # an image that failed before, embedded now
        ("removed", "f", 0),  # a removal of something never there
    ])
    view = cache_index.resolve(t)
    names = [t.name[r].decode() for r in view.image]
    assert names == ["a", "c", "e"]
    assert [t.image_shard[r] for r in view.image] == [1, 1, 2]
    assert [t.failed_name[r].decode() for r in view.failed] == ["d"]
    assert [t.removed_name[r].decode() for r in view.removed] == ["b", "f"]
    assert view.superseded == 4  # a (shard 0), b, d's image, e's failure
