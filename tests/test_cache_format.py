"""docs/cache-format.md is the contract: a reader with only h5py, numpy and pycocotools gets it all."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers import SHARED_EMBED, copy_tree, embed, follow, split_counts

DOC = Path(__file__).resolve().parents[1] / "docs" / "cache-format.md"


@pytest.fixture(scope="module")
def cache_with_history(stamps, stamps_cache, tmp_path_factory) -> tuple[Path, Path, int]:
    """A cache written in two runs, where the second rewrote one image (its annotations changed).

    Its own copies (the second run edits the data set and adds a shard): the first run is the
    shared stamps cache (shards of 2 images), copied; returns (data, cache, first run's shards)."""
    root = tmp_path_factory.mktemp("history")
    data, cache = copy_tree(stamps, root / "stamps"), copy_tree(stamps_cache, root / "cache")
    first_run_shards = len(list((cache / "shards").glob("*.h5")))
    train = json.loads((data / "train.json").read_text())
    train["annotations"] = train["annotations"][:-1]
    # ... and one image left the data set: a removal record takes it out of the view.
    gone = next(im for im in train["images"] if all(a["image_id"] != im["id"] for a in train["annotations"][-1:]))
    train["images"].remove(gone)
    train["annotations"] = [a for a in train["annotations"] if a["image_id"] != gone["id"]]
    (data / "train.json").write_text(json.dumps(train))
    follow(cache, data)  # the pair was copied together
    summary = embed(data, cache, **SHARED_EMBED)
    assert summary.refreshed == 1 and summary.dropped == 1
    return data, cache, first_run_shards


def test_documented_recipe_reads_the_cache(cache_with_history):
    data, cache, _ = cache_with_history
    recipe = re.search(r"## Reading a cache with h5py only\n\n```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(recipe.replace('"CACHE/', f'"{cache}/'), namespace)  # the doc's code, run as written
    assert namespace["header"]["schema_version"] == 1
    names = sorted(n for n, where in namespace["latest"].items() if where)
    assert len(names) == sum(split["images"] for split in split_counts(data).values())


def test_documented_recipe_reads_a_sam2_cache_with_its_three_maps(sam2_cache):
    from samcache.cache.reader import EmbeddingCache
    from samcache.models.feature_layout import pack_sam2

    recipe = re.search(r"## Reading a cache with h5py only\n\n```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(recipe.replace('"CACHE/', f'"{sam2_cache}/'), namespace)
    assert namespace["header"]["schema_version"] == 2
    cache = EmbeddingCache(sam2_cache)
    last = cache.index_of(namespace["name"])  # the recipe's loop leaves its last image's maps behind
    s0, s1 = namespace["high_res"]
    packed = pack_sam2({"image_embed": namespace["embedding"], "high_res_s1": s1, "high_res_s0": s0})
    np.testing.assert_array_equal(packed, cache.embedding(last))


def test_plain_h5py_reader_agrees_with_samcache(cache_with_history):
    from pycocotools import mask as mask_utils

    from samcache.cache.reader import EmbeddingCache

    data, cache, first_run_shards = cache_with_history
    header = json.loads((cache / "cache.json").read_text())
    assert header["schema_version"] == 1 and header["provenance"]["embedding_dtype"] == "float16"
    shards = sorted(glob.glob(str(cache / "shards" / "g*-r*-s*.h5")))
    assert first_run_shards >= 2  # the reader gathers the images of several shards
    assert len(shards) == first_run_shards + 1  # those of the first run, one of the second
    latest = {}
    for shard in shards:
        with h5py.File(shard, "r") as f:
            assert f.attrs["schema_version"] == 1
            assert json.loads(f.attrs["provenance"])["model_type"] == "micro"
            for name in (f["removed/name"].asstr()[()] if "removed" in f else []):
                latest.pop(name)
            for row, name in enumerate(f["images/name"].asstr()[()]):
                latest[name] = (shard, row)
    reference = EmbeddingCache(cache)
    assert sorted(latest) == [info.name for info in reference.images] and len(reference.removed) == 1
    for name, (shard, row) in latest.items():
        info = reference.images[reference.index_of(name)]
        with h5py.File(shard, "r") as f:
            np.testing.assert_array_equal(f["embeddings"][row], reference.embedding(info.index))
            assert tuple(f["images/original_size"][row]) == info.original_size
            assert tuple(f["images/input_size"][row]) == info.input_size
            assert f["images/split"].asstr()[row] == info.split
            start, count = f["images/object_start"][row], f["images/object_count"][row]
            boxes = f["objects/box"][start : start + count]
            assert (f["objects/image_row"][start : start + count] == row).all()
            np.testing.assert_allclose(boxes, np.reshape([o.box for o in info.objects], (-1, 4)))
            for j, obj in zip(range(start, start + count), info.objects):
                h, w = info.original_size
                mask = mask_utils.decode({"size": [h, w], "counts": f["objects/rle_counts"].asstr()[j].encode()})
                x0, y0, x1, y1 = boxes[j - start]
                ys, xs = np.nonzero(mask)
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
                assert f["objects/category"].asstr()[j] == obj.category
