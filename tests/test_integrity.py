"""A cache checks what it reads, and follows its dataset: damaged embeddings are
errors naming shard and image, `verify` takes them out, `embed` embeds them again; removed images
leave the cache's view."""

from __future__ import annotations

import json

import h5py
import numpy as np
from click.testing import CliRunner

from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from tests.helpers import EMBED_FLAGS


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _damage(cache_dir, name: str) -> str:
    """Random bytes over the stored chunk of `name`'s embedding (below HDF5, as a bad disk would)."""
    cache = EmbeddingCache(cache_dir)
    index = cache.index_of(name)
    shard, row = cache.location(index)
    with h5py.File(shard, "r") as f:
        info = f["embeddings"].id.get_chunk_info(row)
    with open(shard, "r+b") as f:
        f.seek(info.byte_offset + 1000)
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return shard.name


def test_a_damaged_embedding_is_found_named_taken_out_and_embedded_again(stamps, stamps_cache_copy, tmp_path):
    cache = EmbeddingCache(stamps_cache_copy)
    victim = cache.images[cache.annotated_indices("test")[0]].name
    shard = _damage(stamps_cache_copy, victim)

    scored = _run("eval", stamps_cache_copy, "--out", tmp_path / "report")
    assert scored.exit_code == 1 and "Traceback" not in scored.output
    assert f"the embedding of {victim} in shard {shard} is damaged (checksum mismatch" in scored.output

    checked = _run("verify", stamps_cache_copy, "--check-only")
    assert checked.exit_code == 1 and f"{victim} in {shard}: checksum mismatch" in checked.output
    assert len(EmbeddingCache(stamps_cache_copy)) == len(cache)  # --check-only changes nothing
    verified = _run("verify", stamps_cache_copy)
    assert verified.exit_code == 1 and "they are out of the cache now" in verified.output
    assert EmbeddingCache(stamps_cache_copy).index_of(victim) is None

    again = _run("embed", stamps, "--out", stamps_cache_copy, *EMBED_FLAGS)
    assert again.exit_code == 0 and "embedded 1 images" in again.output, again.output
    assert _run("verify", stamps_cache_copy).exit_code == 0
    assert _run("eval", stamps_cache_copy, "--out", tmp_path / "report2").exit_code == 0


def test_images_removed_from_the_dataset_leave_the_cache(stamps_copy, stamps_cache_copy):
    train = json.loads((stamps_copy / "train.json").read_text())
    dropped = train["images"].pop(0)
    train["annotations"] = [a for a in train["annotations"] if a["image_id"] != dropped["id"]]
    (stamps_copy / "train.json").write_text(json.dumps(train))
    (stamps_copy / "images" / dropped["file_name"]).unlink()
    before = len(EmbeddingCache(stamps_cache_copy))
    shards_before = {p.name: p.read_bytes() for p in (stamps_cache_copy / "shards").glob("*.h5")}

    result = _run("embed", stamps_copy, "--out", stamps_cache_copy, *EMBED_FLAGS)
    assert result.exit_code == 0 and "dropped 1 no longer in the dataset" in result.output, result.output
    after = EmbeddingCache(stamps_cache_copy)
    assert len(after) == before - 1 and after.index_of(dropped["file_name"]) is None
    assert all((stamps_cache_copy / "shards" / n).read_bytes() == b for n, b in shards_before.items())  # append-only
    info = _run("info", stamps_cache_copy)
    assert "1 image(s) taken out" in info.output
    assert "nothing to embed" in _run("embed", stamps_copy, "--out", stamps_cache_copy, *EMBED_FLAGS).output
