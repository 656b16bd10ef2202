"""A damaged cache is a one-line message naming what is damaged and saying to run `samcache verify`,
in any command and in a DataLoader worker too; `verify` finds damaged mask encodings, previews and
unreadable shards, takes the images out and moves the shards into CACHE/damaged/, and then every
command works on the rest and `embed` embeds what was lost again."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from samcache.cache import index as cache_index
from samcache.cache.reader import DamagedImageError, EmbeddingCache
from samcache.cli import main
from samcache.data import masks
from tests.helpers import EMBED_FLAGS

TRAIN = ["--epochs", "1", "--batch-size", "2", "--workers", "1"]  # one DataLoader worker process


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _refused(result, *words: str) -> None:
    """The command stopped with one line (no traceback, from any process) that holds `words`."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output and "Caught" not in result.output, result.output
    for word in words:
        assert str(word) in errors[0], (word, errors[0])


def _train_image(cache_dir: Path) -> tuple[str, Path, int]:
    """A training image with objects: its name, its shard and its row there."""
    cache = EmbeddingCache(cache_dir)
    index = cache.annotated_indices("train")[0]
    shard, row = cache.location(index)
    return cache.name_of(index), shard, row


def _set_first_mask(shard: Path, row: int, counts: str) -> int:
    """Writes `counts` as the mask encoding of the first object of image `row`; returns its row in the objects table."""
    with h5py.File(shard, "r+") as f:
        first = int(f["images/object_start"][row])
        f["objects/rle_counts"][first] = counts
    return first


@pytest.mark.parametrize("counts, why", [
    ("abc", "end inside a number"),  # pycocotools refuses it where it is decoded
    (masks.encode(np.ones((10, 10), bool))["counts"], "runs cover 100 pixels"),  # decodes, to a mask of another size
], ids=["not-an-rle", "another-size"])
def test_a_damaged_mask_encoding_is_one_line_from_a_worker_and_verify_takes_its_image_out(
        stamps_cache_copy, tmp_path, counts, why):
    name, shard, row = _train_image(stamps_cache_copy)
    object_row = _set_first_mask(shard, row, counts)

    workers_before = set(multiprocessing.active_children())
    trained = _run("train", stamps_cache_copy, "--out", tmp_path / "run", *TRAIN)
    _refused(trained, shard.name, f"objects/rle_counts row {object_row}", name, why,
             f"samcache verify {stamps_cache_copy}")
    # The failed epoch's DataLoader worker ended with the command, not at some later garbage collection.
    assert set(multiprocessing.active_children()) <= workers_before

    checked = _run("verify", stamps_cache_copy, "--check-only")
    assert checked.exit_code == 1 and f"{name} in {shard.name}: objects/rle_counts row {object_row}" in checked.output
    verified = _run("verify", stamps_cache_copy)
    assert verified.exit_code == 1 and "they are out of the cache now" in verified.output, verified.output
    assert EmbeddingCache(stamps_cache_copy).index_of(name) is None
    again = _run("train", stamps_cache_copy, "--out", tmp_path / "run2", *TRAIN)
    assert again.exit_code == 0, again.output


def test_verify_finds_a_preview_that_is_not_a_whole_jpeg(stamps, stamps_cache_copy, tmp_path):
    name, shard, row = _train_image(stamps_cache_copy)
    with h5py.File(shard, "r+") as f:
        jpeg = f["images/preview_jpeg"][row]
        f["images/preview_jpeg"][row] = jpeg[: len(jpeg) // 2]  # cut short: libjpeg would fill in grey

    checked = _run("verify", stamps_cache_copy, "--check-only")
    assert checked.exit_code == 1 and f"{name} in {shard.name}: images/preview_jpeg row {row}" in checked.output
    assert "not a whole JPEG" in checked.output
    assert _run("verify", stamps_cache_copy).exit_code == 1
    embedded = _run("embed", stamps, "--out", stamps_cache_copy, *EMBED_FLAGS)
    assert embedded.exit_code == 0 and "embedded 1 images" in embedded.output, embedded.output
    cache = EmbeddingCache(stamps_cache_copy)
    assert cache.preview(cache.index_of(name)).shape[2] == 3
    assert _run("verify", stamps_cache_copy).exit_code == 0


def _truncate(shard: Path) -> None:
    os.truncate(shard, shard.stat().st_size // 2)


def _zero_header(shard: Path) -> None:
    with open(shard, "r+b") as f:
        f.write(bytes(512))


@pytest.mark.parametrize("damage", [_truncate, _zero_header])
def test_an_unreadable_shard_is_named_and_verify_moves_it_aside_then_embed_embeds_its_images(
        stamps, stamps_cache_copy, tmp_path, damage):
    cache = EmbeddingCache(stamps_cache_copy)
    images = len(cache)
    shard = cache.shards[1]
    held = sorted(cache.name_of(i) for i in range(len(cache)) if cache.location(i)[0] == shard)
    assert held
    damage(shard)
    damaged_bytes = shard.read_bytes()

    for command in (["info", stamps_cache_copy], ["train", stamps_cache_copy, "--out", tmp_path / "run", *TRAIN],
                    ["eval", stamps_cache_copy, "--out", tmp_path / "report"],
                    ["embed", stamps, "--out", stamps_cache_copy, *EMBED_FLAGS]):
        _refused(_run(*command), shard, "is unreadable", f"samcache verify {stamps_cache_copy}")

    checked = _run("verify", stamps_cache_copy, "--check-only")
    assert checked.exit_code == 1 and shard.read_bytes() == damaged_bytes  # --check-only changes nothing
    assert all(f"{name} in {shard.name}: the shard is unreadable" in checked.output for name in held), checked.output
    assert f"verified {images - len(held)} images" in checked.output  # the other shards are checked all the same

    verified = _run("verify", stamps_cache_copy)
    moved = stamps_cache_copy / "damaged" / shard.name
    assert verified.exit_code == 1 and all(f"{name} in {shard.name}" in verified.output for name in held)
    assert f"moved to {moved}" in verified.output, verified.output
    assert not shard.exists() and moved.read_bytes() == damaged_bytes  # moved as it was, never deleted
    assert shard.name not in cache_index.load(stamps_cache_copy).shards

    info = _run("info", stamps_cache_copy, "--json")
    assert info.exit_code == 0 and json.loads(info.output)["images"] == images - len(held), info.output
    assert _run("train", stamps_cache_copy, "--out", tmp_path / "run", *TRAIN).exit_code == 0
    assert _run("verify", stamps_cache_copy).exit_code == 0
    embedded = _run("embed", stamps, "--out", stamps_cache_copy, *EMBED_FLAGS)
    assert embedded.exit_code == 0 and f"embedded {len(held)} images" in embedded.output, embedded.output
    after = EmbeddingCache(stamps_cache_copy)
    assert len(after) == images and all(after.index_of(name) is not None for name in held)


def test_a_shard_damaged_in_place_is_named_from_a_worker_and_found_by_verify(stamps_cache_copy, tmp_path):
    # Damage that keeps the file's size and time: index.npz still describes the shard, so it opens
    # from the index and the damage shows only when the shard itself is read.
    name, shard, _ = _train_image(stamps_cache_copy)
    stat = shard.stat()
    _zero_header(shard)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    trained = _run("train", stamps_cache_copy, "--out", tmp_path / "run", *TRAIN, "--cache-in-memory", "no")
    _refused(trained, shard, "is unreadable", f"samcache verify {stamps_cache_copy}")
    verified = _run("verify", stamps_cache_copy)
    assert verified.exit_code == 1 and f"{name} in {shard.name}: the shard is unreadable" in verified.output
    assert (stamps_cache_copy / "damaged" / shard.name).is_file()
    again = _run("train", stamps_cache_copy, "--out", tmp_path / "run2", *TRAIN, "--cache-in-memory", "no")
    assert again.exit_code == 0, again.output


def test_verify_moves_a_shard_aside_even_when_what_it_held_is_unknown(stamps_cache_copy):
    shard = sorted((stamps_cache_copy / "shards").glob("*.h5"))[0]
    (stamps_cache_copy / cache_index.INDEX_NAME).unlink()  # the only other record of what it held
    _zero_header(shard)
    earlier = stamps_cache_copy / "damaged" / shard.name  # a shard of that name moved there before
    earlier.parent.mkdir()
    earlier.write_bytes(b"moved before")
    damaged_bytes = shard.read_bytes()

    verified = _run("verify", stamps_cache_copy)
    assert verified.exit_code == 1 and f"(images not known) in {shard.name}" in verified.output, verified.output
    assert not shard.exists() and earlier.read_bytes() == b"moved before"  # never replaced
    assert sorted(p.read_bytes() for p in earlier.parent.iterdir()) == sorted([b"moved before", damaged_bytes])
    assert _run("info", stamps_cache_copy).exit_code == 0


def test_a_damaged_embedding_read_in_a_worker_is_one_line(stamps_cache_copy, tmp_path):
    name, shard, row = _train_image(stamps_cache_copy)
    with h5py.File(shard, "r") as f:
        chunk = f["embeddings"].id.get_chunk_info(row)
    with open(shard, "r+b") as f:  # below HDF5, as a bad disk would: the checksum no longer matches
        f.seek(chunk.byte_offset + 100)
        f.write(bytes(256))

    trained = _run("train", stamps_cache_copy, "--out", tmp_path / "run", *TRAIN, "--cache-in-memory", "no")
    _refused(trained, f"the embedding of {name} in shard {shard.name} is damaged (checksum mismatch",
             f"samcache verify {stamps_cache_copy}")


@pytest.mark.parametrize("version, said", [
    ("1", "the string '1'"), (True, "the boolean true"), (1.0, "the number 1.0"),
])
def test_a_schema_version_of_another_type_says_so(stamps_cache_copy, version, said):
    header = json.loads((stamps_cache_copy / "cache.json").read_text())
    header["schema_version"] = version
    (stamps_cache_copy / "cache.json").write_text(json.dumps(header))
    _refused(_run("info", stamps_cache_copy), stamps_cache_copy / "cache.json",
             f"schema_version is {said}, not an integer")


def test_a_reader_checks_an_images_mask_encodings_once_within_its_bound(stamps_cache_copy, monkeypatch):
    """Training reads each image's objects every epoch: one reader reads and checks them once (its
    shards do not change under it), up to reader.CHECKED_MASKS_CHARS characters; past that bound
    they are read and checked on each access, as a fresh reader does."""
    from samcache.cache import reader

    name, shard, row = _train_image(stamps_cache_copy)
    kept = EmbeddingCache(stamps_cache_copy)
    monkeypatch.setattr(reader, "CHECKED_MASKS_CHARS", 0)
    unkept = EmbeddingCache(stamps_cache_copy)
    index = kept.index_of(name)
    first = kept.images[index].objects
    assert unkept.images[index].objects == first
    kept.close()
    unkept.close()
    _set_first_mask(shard, row, "abc")

    assert kept.images[index].objects == first  # checked before, by this reader
    for fresh in (unkept, EmbeddingCache(stamps_cache_copy)):
        with pytest.raises(DamagedImageError, match="end inside a number"):
            fresh.images[index]
