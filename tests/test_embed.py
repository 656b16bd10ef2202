"""samcache embed and the cache: parity with SamPredictor, incremental runs, refusals, bad images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from segment_anything import SamPredictor

from samcache.cache.format import ImageEntry, Provenance, open_for_writing
from samcache.cache.reader import EmbeddingCache
from samcache.cache.writer import ShardWriter
from samcache.cli import main
from samcache.config import EmbedConfig
from samcache.data import masks
from samcache.data.datasets import load_dataset
from samcache.data.images import read_image
from samcache.embed.pipeline import decoding_workers, embed_dataset
from samcache.errors import CacheError
from samcache.fileio import FileIdentity
from samcache.models.weights import build_seeded, load_sam
from tests.helpers import FAST_EMBED as FAST
from tests.helpers import STAMPS_PAGES, make_coco, write_image

# `stamps` and `stamps_cache` (fp32, shards of 2) are the shared session fixtures of conftest.py.


def test_cache_holds_everything_training_needs(stamps, tiny_cache):
    stamps_cache = tiny_cache  # SAM's widths: the embedding is SAM's (256, 64, 64)
    ds = load_dataset(stamps)
    cache = EmbeddingCache(stamps_cache)
    assert len(cache) == len(ds.images) == STAMPS_PAGES
    for record in ds.images:
        info = cache.images[cache.index_of(record.name)]
        assert info.original_size == (record.height, record.width)
        assert max(info.input_size) == 1024 and info.split == record.split
        assert len(info.file.sha256) == 64 and Path(info.file.path) == record.path
        assert [o.box for o in info.objects] == [o.box for o in record.objects]
        assert [o.category for o in info.objects] == [o.category for o in record.objects]
        for cached, original in zip(info.objects, record.objects):
            np.testing.assert_array_equal(masks.decode(cached.rle), masks.decode(original.rle))
        preview = cache.preview(info.index)
        assert max(preview.shape[:2]) == 640 and preview.shape[2] == 3
        import cv2

        original = cv2.resize(read_image(record.path), preview.shape[1::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(preview.astype(int) - original).mean() < 4  # the same picture, JPEG-compressed
    emb = cache.embedding(0)
    assert emb.dtype == np.float16 and emb.shape == (256, 64, 64)
    assert cache.provenance.model_type == "tiny" and cache.provenance.embedding_dtype == "float16"
    info = cache.info()
    assert info["images"] == STAMPS_PAGES and info["objects"] == sum(len(r.objects) for r in ds.images)
    assert 2 * 2**20 <= info["bytes_per_image"] < 2.2 * 2**20  # fp16 256x64x64 = 2 MiB, plus small tables


def test_chunks_are_one_image_and_uncompressed(tiny_cache):
    stamps_cache = tiny_cache
    import h5py

    shard = sorted((stamps_cache / "shards").glob("*.h5"))[0]
    with h5py.File(shard) as f:
        assert f["embeddings"].chunks == (1, 256, 64, 64) and f["embeddings"].compression is None


def test_parity_with_sampredictor(stamps, tiny_cache):
    stamps_cache = tiny_cache  # made by the tiny: SamPredictor runs the same model
    ds = load_dataset(stamps)
    cache = EmbeddingCache(stamps_cache)
    sam = load_sam("tiny").sam  # the weights `embed --model tiny` used
    record = ds.images[0]
    image = read_image(record.path)
    reference = SamPredictor(sam)
    reference.set_image(image)
    cached = torch.from_numpy(cache.embedding(cache.index_of(record.name)).astype(np.float32))[None]
    assert torch.allclose(cached, reference.features, rtol=1e-3, atol=2e-3)  # fp16 rounding

    from_cache = SamPredictor(sam)
    from_cache.original_size, from_cache.input_size = record.height, record.width
    from_cache.original_size = (record.height, record.width)
    from_cache.input_size = cache.images[cache.index_of(record.name)].input_size
    from_cache.features, from_cache.is_image_set = cached, True
    for obj in record.objects:
        box = np.array(obj.box)
        expected, _, _ = reference.predict(box=box, multimask_output=False)
        got, _, _ = from_cache.predict(box=box, multimask_output=False)
        agreement = (expected == got).mean()
        assert agreement > 0.999, agreement


def test_rerun_is_a_noop_and_says_so(stamps, stamps_cache_copy):
    cache_copy = stamps_cache_copy
    before = sorted(p.name for p in (cache_copy / "shards").iterdir())
    result = CliRunner().invoke(main, ["embed", str(stamps), "--out", str(cache_copy), "--workers", "0", "--model",
                                       "micro"])
    assert result.exit_code == 0, result.output
    assert f"nothing to embed: all {STAMPS_PAGES} images are already in" in result.output
    assert sorted(p.name for p in (cache_copy / "shards").iterdir()) == before


def test_images_added_later_are_embedded_and_only_they(stamps_copy, tmp_path):
    dataset_dir = stamps_copy
    train = json.loads((dataset_dir / "train.json").read_text())
    later = train["images"][-1]
    train["images"] = train["images"][:-1]
    (dataset_dir / "train.json").write_text(json.dumps(train))
    first = embed_dataset(load_dataset(dataset_dir), tmp_path / "c", EmbedConfig(**FAST))
    assert first.embedded == STAMPS_PAGES - 1
    first_shards = {p: p.read_bytes() for p in (tmp_path / "c" / "shards").glob("*.h5")}

    train["images"].append(later)
    (dataset_dir / "train.json").write_text(json.dumps(train))
    second = embed_dataset(load_dataset(dataset_dir), tmp_path / "c", EmbedConfig(**FAST))
    assert (second.embedded, second.skipped) == (1, STAMPS_PAGES - 1)
    assert all(p.read_bytes() == data for p, data in first_shards.items())  # old shards untouched
    cache = EmbeddingCache(tmp_path / "c")
    assert len(cache) == STAMPS_PAGES and cache.index_of(later["file_name"]) is not None


def test_edited_annotations_are_refreshed_without_the_encoder(stamps_copy, stamps_cache_copy, monkeypatch):
    dataset_dir, cache_dir = stamps_copy, stamps_cache_copy
    test = json.loads((dataset_dir / "test.json").read_text())
    assert len(test["annotations"]) >= 2  # so keeping only the first is an edit
    test["annotations"] = test["annotations"][:1]
    (dataset_dir / "test.json").write_text(json.dumps(test))
    name = next(im["file_name"] for im in test["images"] if im["id"] == test["annotations"][0]["image_id"])
    before = EmbeddingCache(cache_dir)
    old_embedding = before.embedding(before.index_of(name))

    import samcache.embed.pipeline as embed_module

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran")

    monkeypatch.setattr(embed_module, "batch_to_model_input", no_encoder)
    summary = embed_dataset(load_dataset(dataset_dir), cache_dir, EmbedConfig(**FAST))
    assert summary.refreshed >= 1 and summary.embedded == 0
    after = EmbeddingCache(cache_dir)
    assert len(after.images[after.index_of(name)].objects) == 1
    np.testing.assert_array_equal(after.embedding(after.index_of(name)), old_embedding)
    assert after.info()["superseded_records"] == summary.refreshed


def test_other_weights_are_refused(stamps, stamps_cache_copy, tmp_path):
    other = tmp_path / "micro_seed1.pth"
    torch.save(build_seeded("micro", 1).state_dict(), other)
    cache_copy = stamps_cache_copy
    with pytest.raises(CacheError, match="weights_sha256 is .* in the cache, .* now.*cannot be mixed"):
        embed_dataset(load_dataset(stamps), cache_copy, EmbedConfig(checkpoint=other, **FAST))
    result = CliRunner().invoke(main, ["embed", str(stamps), "--out", str(cache_copy), "--intensity", "dtype",
                                       "--model", "micro"])
    assert result.exit_code == 1 and "intensity is 'percentile' in the cache, 'dtype' now" in result.output


def _dataset_with_bad_images(tmp_path: Path) -> Path:
    images = []
    for i, kind in enumerate(["good", "truncated", "zero", "garbage", "good2"]):
        path = tmp_path / "images" / f"{kind}.jpg"
        if kind.startswith("good") or kind == "truncated":
            write_image(path.with_suffix(".png"), 40, 60, seed=i)
            import cv2

            ok, data = cv2.imencode(".jpg", cv2.imread(str(path.with_suffix(".png"))))
            path.with_suffix(".png").unlink()
            path.write_bytes(data.tobytes()[: len(data) // 2] if kind == "truncated" else data.tobytes())
        elif kind == "zero":
            path.write_bytes(b"")
        else:
            path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 10)
        images.append({"id": i, "file_name": path.name, "width": 60, "height": 40})
    anns = [{"id": i, "image_id": i, "category_id": 1, "segmentation": [[5, 5, 30, 5, 30, 30, 5, 30]]}
            for i in range(5)]
    return make_coco(tmp_path, images, anns, "train.json")


def test_bad_images_are_skipped_listed_and_not_retried(tmp_path):
    dataset = _dataset_with_bad_images(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["embed", str(tmp_path), "--out", str(tmp_path / "c"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(main, ["info", str(tmp_path / "c"), "--json"]).output)
    assert info["images"] == 2
    failed = {f["name"]: f["error"] for f in info["failed"]}
    assert set(failed) == {"truncated.jpg", "zero.jpg", "garbage.jpg"}
    assert all(name in error for name, error in failed.items())
    text = runner.invoke(main, ["info", str(tmp_path / "c")]).output
    assert "3 failed image(s)" in text and "zero.jpg" in text
    again = runner.invoke(main, ["embed", str(tmp_path), "--out", str(tmp_path / "c"), "--workers", "0"])
    assert "nothing to embed: all 2 images are already in" in again.output
    assert "1 unchanged images that failed before" in again.output  # truncated.jpg; the other two are known
    assert len(list((tmp_path / "c" / "shards").glob("*.h5"))) == 1
    strict = runner.invoke(main, ["embed", str(dataset), "--out", str(tmp_path / "c2"), "--workers", "0", "--strict"])
    assert strict.exit_code == 1 and "strict" in strict.output


def test_full_disk_loses_nothing_committed(stamps, tmp_path, monkeypatch):
    import errno

    calls = {"n": 0}
    real_add = ShardWriter.add

    def add_until_full(self, entry, embedding):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, entry, embedding)

    monkeypatch.setattr(ShardWriter, "add", add_until_full)
    with pytest.raises(CacheError, match="No space left on device.*committed before this is intact"):
        embed_dataset(load_dataset(stamps), tmp_path / "c", EmbedConfig(shard_images=2, **FAST))
    assert not list((tmp_path / "c" / "shards").glob("*.tmp"))
    assert len(EmbeddingCache(tmp_path / "c")) == 2  # the first shard survived
    monkeypatch.setattr(ShardWriter, "add", real_add)
    summary = embed_dataset(load_dataset(stamps), tmp_path / "c", EmbedConfig(shard_images=2, **FAST))
    assert (summary.embedded, summary.skipped) == (STAMPS_PAGES - 2, 2)


def test_workers_give_the_same_cache(stamps, stamps_cache, tmp_path):
    embed_dataset(load_dataset(stamps), tmp_path / "c",
                  EmbedConfig(model_type="micro", workers=2, batch_size=2, progress=False, precision="fp32",
                              backend="torch"))
    a, b = EmbeddingCache(stamps_cache), EmbeddingCache(tmp_path / "c")
    assert [i.name for i in a.images] == [i.name for i in b.images]
    for i in range(len(a)):
        np.testing.assert_array_equal(a.embedding(i), b.embedding(i))


def test_decoding_workers_default_to_none_on_the_cpu_and_two_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decoding_workers(EmbedConfig(), cpu) == 0  # the encoder already uses every core
    assert decoding_workers(EmbedConfig(), cuda) == 2  # the CPU is free to decode while the GPU encodes
    assert decoding_workers(EmbedConfig(workers=3), cpu) == 3
    assert decoding_workers(EmbedConfig(workers=0), cuda) == 0


def test_fp16_overflow_is_an_error(tmp_path):
    provenance = Provenance("tiny", "x", {}, "percentile")
    open_for_writing(tmp_path / "c", provenance)
    writer = ShardWriter(tmp_path / "c", generation=1, rank=0, sequence=0, provenance=provenance)
    entry = ImageEntry(image_id=1, name="a.png", file=FileIdentity("a.png", "", 0, 0), original_size=(10, 10),
                                   split="train", objects=[], input_size=(1024, 1024), annotations_sha256="")
    big = np.zeros((256, 64, 64), np.float32)
    big[0, 0, 0] = 70000.0
    with pytest.raises(CacheError, match="float16's range"):
        writer.add(entry, big)
    writer.abandon()
    assert not list((tmp_path / "c" / "shards").iterdir())


def test_not_a_cache_and_wrong_schema(tmp_path):
    with pytest.raises(CacheError, match="not a samcache cache"):
        EmbeddingCache(tmp_path)
    (tmp_path / "cache.json").write_text(json.dumps({"schema_version": 99, "provenance": {}}))
    with pytest.raises(CacheError, match="schema version 99, this samcache reads 1"):
        EmbeddingCache(tmp_path)
    result = CliRunner().invoke(main, ["info", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "not a samcache cache" in result.output
