"""Corrections saved into a COCO dataset (serve/corrections.py): each edit read back with plain json
and by the dataset reader, the previous version kept, stale versions and bad edits refused with
nothing written, and the next `samcache embed` taking the edit without running the encoder."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from samcache.data import masks
from samcache.data.datasets import load_dataset
from samcache.errors import DatasetError, OutputError
from samcache.serve import corrections
from samcache.serve.corrections import LOCK_NAME, Annotations, CorrectionError, StaleVersionError, previous_path
from tests.helpers import EMBED_FLAGS, rect_mask, tree_fingerprint


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _page(dataset: Path, split: str = "train") -> tuple[dict, list[dict], dict]:
    """The first image of SPLIT.json with objects, its annotations, and the whole document."""
    doc = json.loads((dataset / f"{split}.json").read_text())
    for image in doc["images"]:
        anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
        if anns:
            return image, anns, doc
    raise AssertionError(f"no image with objects in {split}.json")


def _record(dataset: Path, name: str):
    return next(im for im in load_dataset(dataset).images if im.name == name)


def _category(doc: dict, category_id) -> str:
    return next(c["name"] for c in doc["categories"] if c["id"] == category_id)


def _all_annotation_ids(dataset: Path) -> list[int]:
    return [a["id"] for split in ("train", "val", "test")
            for a in json.loads((dataset / f"{split}.json").read_text())["annotations"]]


def _files_but_the_lock(dataset: Path) -> dict[str, str]:
    return {k: v for k, v in tree_fingerprint(dataset).items() if Path(k).name != LOCK_NAME}


def test_add_object_saves_an_rle_object_the_dataset_reads(stamps_copy):
    image, _, _ = _page(stamps_copy)
    name, h, w = image["file_name"], image["height"], image["width"]
    others = {s: (stamps_copy / f"{s}.json").read_bytes() for s in ("val", "test")}
    before = (stamps_copy / "train.json").read_bytes()
    fresh = max(_all_annotation_ids(stamps_copy)) + 1
    listed = [p.name for p in stamps_copy.iterdir()]
    annotations = Annotations(stamps_copy)
    version = annotations.version(name)
    assert version == _sha(before)

    mask = rect_mask(h, w, 30, 40, 130, 90)
    saved = annotations.add_object(name, mask, "oval_stamp", version=version)

    after = (stamps_copy / "train.json").read_bytes()
    assert saved.object_id == fresh and saved.file == stamps_copy / "train.json"
    assert saved.version == _sha(after) == annotations.version(name)
    assert saved.previous == stamps_copy / "train.json.previous" and saved.previous.read_bytes() == before
    doc = json.loads(after)
    added = doc["annotations"][-1]
    assert list(added) == ["id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"]
    assert added["id"] == fresh and added["image_id"] == image["id"] and added["iscrowd"] == 0
    assert _category(doc, added["category_id"]) == "oval_stamp"
    assert isinstance(added["segmentation"]["counts"], str) and added["segmentation"]["size"] == [h, w]
    assert np.array_equal(masks.decode(added["segmentation"]), mask)
    assert added["bbox"] == [30, 40, 100, 50] and added["area"] == 100 * 50
    assert doc == {**json.loads(before), "annotations": json.loads(before)["annotations"] + [added]}
    assert after == json.dumps(doc).encode()  # the generator's layout, byte for byte

    record = _record(stamps_copy, name)
    obj = next(o for o in record.objects if o.object_id == fresh)
    assert obj.category == "oval_stamp" and obj.box == (30.0, 40.0, 130.0, 90.0)
    assert np.array_equal(masks.decode(obj.rle), mask)
    assert {s: (stamps_copy / f"{s}.json").read_bytes() for s in ("val", "test")} == others

    # A category no one has yet: appended with the next free id.
    saved = annotations.add_object(name, mask, "seal", version=saved.version)
    doc = json.loads((stamps_copy / "train.json").read_text())
    assert doc["categories"][-1] == {"id": max(c["id"] for c in json.loads(before)["categories"]) + 1, "name": "seal"}
    assert doc["annotations"][-1]["category_id"] == doc["categories"][-1]["id"]
    assert saved.previous.read_bytes() == after  # one previous version: the file before this save
    assert next(o for o in _record(stamps_copy, name).objects if o.object_id == saved.object_id).category == "seal"
    assert sorted(p.name for p in stamps_copy.iterdir()) == sorted(listed + ["train.json.previous", LOCK_NAME])


def test_replace_delete_and_set_category_keep_everything_else(stamps_copy):
    image, anns, original = _page(stamps_copy)
    name, h, w = image["file_name"], image["height"], image["width"]
    target, other_ids = anns[0], [a["id"] for a in anns[1:]]
    annotations = Annotations(stamps_copy)
    listed = annotations.objects(name)
    assert sorted(o["id"] for o in listed) == sorted(a["id"] for a in anns)
    shown = next(o for o in listed if o["id"] == target["id"])
    assert shown["category"] == _category(original, target["category_id"])
    assert np.array_equal(masks.decode(shown["segmentation"]), masks.decode(target["segmentation"]))

    before = (stamps_copy / "train.json").read_bytes()
    mask = rect_mask(h, w, 5, 7, 25, 47)
    loaded = annotations.load(name).to_json()
    assert loaded["version"] == _sha(before) and (loaded["height"], loaded["width"]) == (h, w)
    # The mask as `samcache serve` predicts it: a COCO RLE.
    saved = annotations.replace_object(name, target["id"], masks.encode(mask), version=loaded["version"])
    assert saved.to_json() == {"version": _sha((stamps_copy / "train.json").read_bytes()), "object_id": target["id"]}
    doc = json.loads((stamps_copy / "train.json").read_text())
    replaced = next(a for a in doc["annotations"] if a["id"] == target["id"])
    assert list(replaced) == list(target)  # same fields, same order
    assert replaced["category_id"] == target["category_id"] and replaced["bbox"] == [5, 7, 20, 40]
    assert replaced["area"] == 800 and np.array_equal(masks.decode(replaced["segmentation"]), mask)
    assert [a for a in doc["annotations"] if a["id"] != target["id"]] == [
        a for a in original["annotations"] if a["id"] != target["id"]]
    assert saved.previous.read_bytes() == before
    obj = next(o for o in _record(stamps_copy, name).objects if o.object_id == target["id"])
    assert obj.box == (5.0, 7.0, 25.0, 47.0) and np.array_equal(masks.decode(obj.rle), mask)

    before = (stamps_copy / "train.json").read_bytes()
    new_category = next(c for c in original["categories"] if c["id"] != target["category_id"])
    saved = annotations.set_category(name, target["id"], new_category["name"], version=saved.version)
    expected = json.loads(before)
    next(a for a in expected["annotations"] if a["id"] == target["id"])["category_id"] = new_category["id"]
    assert (stamps_copy / "train.json").read_bytes() == json.dumps(expected).encode()
    assert saved.previous.read_bytes() == before
    assert next(o for o in _record(stamps_copy, name).objects
                if o.object_id == target["id"]).category == new_category["name"]

    before = (stamps_copy / "train.json").read_bytes()
    saved = annotations.delete_object(name, target["id"], version=saved.version)
    doc = json.loads((stamps_copy / "train.json").read_text())
    assert target["id"] not in [a["id"] for a in doc["annotations"]]
    assert len(doc["annotations"]) == len(original["annotations"]) - 1 and doc["categories"] == original["categories"]
    assert saved.previous.read_bytes() == before
    assert sorted(o.object_id for o in _record(stamps_copy, name).objects) == sorted(other_ids)
    assert sorted(o["id"] for o in annotations.objects(name)) == sorted(other_ids)


def test_the_file_keeps_its_layout_and_unknown_fields(coco_dir):
    path = coco_dir / "train.json"
    doc = json.loads(path.read_text())
    doc = {"info": {"by": "Zoé"}, **doc, "licenses": [{"id": 1}]}
    doc["annotations"][0]["attributes"] = {"occluded": True}
    path.write_text(json.dumps(doc, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")

    annotations = Annotations(path)  # a single JSON file
    annotations.set_category("im0.png", 1, "seal", version=annotations.version("im0.png"))
    doc["annotations"][0]["category_id"] = 2
    assert path.read_text(encoding="utf-8") == json.dumps(doc, indent=4, ensure_ascii=False) + "\n"
    assert previous_path(path).is_file() and not (coco_dir / "val.json.previous").exists()


def test_an_edit_on_a_stale_version_is_refused_and_nothing_is_written(stamps_copy):
    image, anns, _ = _page(stamps_copy)
    name = image["file_name"]
    mine, theirs = Annotations(stamps_copy), Annotations(stamps_copy)
    loaded = mine.version(name)
    saved = theirs.delete_object(name, anns[0]["id"], version=theirs.version(name))
    files = _files_but_the_lock(stamps_copy)
    with pytest.raises(StaleVersionError, match="changed since image .* was loaded") as refused:
        mine.set_category(name, anns[-1]["id"], "seal", version=loaded)
    assert refused.value.status == 409
    assert _files_but_the_lock(stamps_copy) == files  # the other editor's save and its previous, as they were

    # An edit by hand: one space more is another version.
    path = stamps_copy / "train.json"
    path.write_bytes(path.read_bytes().replace(b'{"info": ', b'{"info":  ', 1))
    files = _files_but_the_lock(stamps_copy)
    with pytest.raises(StaleVersionError):
        theirs.add_object(name, rect_mask(image["height"], image["width"], 0, 0, 9, 9), "seal", version=saved.version)
    assert _files_but_the_lock(stamps_copy) == files


def test_two_threads_editing_one_version_save_once(stamps_copy, monkeypatch):
    image, anns, _ = _page(stamps_copy)
    annotations = Annotations(stamps_copy)
    write = corrections.atomic_write_bytes

    def slow_write(path, data):  # a wide window between checking the version and replacing the file
        time.sleep(0.05)
        write(path, data)

    monkeypatch.setattr(corrections, "atomic_write_bytes", slow_write)
    version = annotations.version(image["file_name"])
    outcomes = []

    def edit(category: str) -> None:
        try:
            outcomes.append(annotations.set_category(image["file_name"], anns[0]["id"], category, version=version))
        except StaleVersionError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=edit, args=(c,)) for c in ("seal", "round_stamp", "rect_stamp", "oval_stamp")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    saved = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(saved) == 1 and len(outcomes) == 4
    assert saved[0].version == _sha((stamps_copy / "train.json").read_bytes())
    assert saved[0].previous.read_bytes() != (stamps_copy / "train.json").read_bytes()


def test_a_failed_save_leaves_the_file_as_it_was(stamps_copy, monkeypatch):
    image, anns, _ = _page(stamps_copy)
    path = stamps_copy / "train.json"
    before = path.read_bytes()
    write = corrections.atomic_write_bytes

    def full_disk(target, data):
        if Path(target) == path:
            raise OutputError(f"could not write {target}: No space left on device")
        write(target, data)

    monkeypatch.setattr(corrections, "atomic_write_bytes", full_disk)
    annotations = Annotations(stamps_copy)
    with pytest.raises(OutputError, match="No space left"):
        annotations.delete_object(image["file_name"], anns[0]["id"], version=_sha(before))
    assert path.read_bytes() == before and previous_path(path).read_bytes() == before
    assert annotations.version(image["file_name"]) == _sha(before)


def test_a_second_server_holding_the_lock_turns_an_edit_away(stamps_copy, monkeypatch):
    image, anns, _ = _page(stamps_copy)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
         "lock.acquire(); print('held', flush=True); sys.stdin.read()", str(stamps_copy / LOCK_NAME)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(corrections, "LOCK_WAIT_SECONDS", 0.2)
        annotations = Annotations(stamps_copy)
        version = annotations.version(image["file_name"])
        files = _files_but_the_lock(stamps_copy)
        with pytest.raises(CorrectionError, match="while saving annotations; try again") as busy:
            annotations.delete_object(image["file_name"], anns[0]["id"], version=version)
        assert busy.value.status == 503 and _files_but_the_lock(stamps_copy) == files
    finally:
        holder.communicate("", timeout=30)
    annotations.delete_object(image["file_name"], anns[0]["id"], version=version)  # the lock given back: saved


def test_bad_edits_are_refused_and_nothing_is_written(stamps_copy):
    image, anns, doc = _page(stamps_copy)
    name, h, w = image["file_name"], image["height"], image["width"]
    elsewhere = next(a for a in doc["annotations"] if a["image_id"] != image["id"])
    owner = next(i["file_name"] for i in doc["images"] if i["id"] == elsewhere["image_id"])
    annotations = Annotations(stamps_copy)
    version = annotations.version(name)
    good = rect_mask(h, w, 0, 0, 10, 10)
    files = _files_but_the_lock(stamps_copy)
    refusals = [
        (lambda: annotations.delete_object(name, elsewhere["id"], version=version), 404,
         f"object {elsewhere['id']} belongs to image '{owner}', not '{name}'"),
        (lambda: annotations.replace_object(name, 10**9, good, version=version), 404, f"has no object {10**9}"),
        (lambda: annotations.add_object("no_such_page.jpg", good, "seal", version=version), 404,
         "no image 'no_such_page.jpg'"),
        (lambda: annotations.add_object(name, np.zeros((h, w), bool), "seal", version=version), 400,
         "the mask is empty"),
        (lambda: annotations.replace_object(name, anns[0]["id"], np.ones((h, w + 1), bool), version=version), 400,
         f"the mask is {h}x{w + 1} but the image is {h}x{w}"),
        (lambda: annotations.add_object(name, masks.encode(np.ones((h - 1, w), bool)), "seal", version=version), 400,
         f"the mask is {h - 1}x{w} but the image is {h}x{w}"),
        (lambda: annotations.add_object(name, {"size": [h, w], "counts": "0"}, "seal", version=version), 400,
         "the mask is not a valid COCO RLE"),
        (lambda: annotations.set_category(name, anns[0]["id"], " ", version=version), 400, "non-empty name"),
        (lambda: annotations.set_category(name, anns[0]["id"], "seal", version=""), 400, "names the version"),
    ]
    for edit, status, message in refusals:
        with pytest.raises(CorrectionError) as refused:
            edit()
        assert refused.value.status == status and message in str(refused.value)
        assert "\n" not in str(refused.value)
    assert _files_but_the_lock(stamps_copy) == files


def test_a_mask_folder_dataset_is_refused(tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / "masks_ds" / folder).mkdir(parents=True)
    with pytest.raises(DatasetError, match="mask-folder dataset: corrections are saved into COCO annotations"):
        Annotations(tmp_path / "masks_ds")
    with pytest.raises(DatasetError, match="does not exist"):
        Annotations(tmp_path / "nowhere")
    assert sorted(p.name for p in (tmp_path / "masks_ds").iterdir()) == ["images", "masks"]


def test_embed_takes_an_edit_without_running_the_encoder(stamps_copy, stamps_cache_copy, monkeypatch):
    image, anns, doc = _page(stamps_copy)
    name, h, w = image["file_name"], image["height"], image["width"]
    annotations = Annotations.of_cache(stamps_cache_copy)  # the dataset the cache follows: the copy
    mask = rect_mask(h, w, 12, 14, 72, 64)
    saved = annotations.replace_object(name, anns[0]["id"], mask, version=annotations.version(name))
    saved = annotations.delete_object(name, anns[-1]["id"], version=saved.version) if len(anns) > 1 else saved
    added = annotations.add_object(name, rect_mask(h, w, 100, 100, 140, 160), "seal", version=saved.version)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran for an annotation-only change")

    monkeypatch.setattr("samcache.embed.pipeline.open_encoder", no_encoder)
    result = CliRunner().invoke(main, ["embed", str(stamps_copy), "--out", str(stamps_cache_copy), *EMBED_FLAGS])
    assert result.exit_code == 0, result.output
    assert "embedded 0 images" in result.output and "refreshed annotations of 1" in result.output, result.output

    cache = EmbeddingCache(stamps_cache_copy)
    cached = {o.object_id: o for o in cache.images[cache.index_of(name)].objects}
    expected = {o["id"]: o for o in annotations.objects(name)}
    assert set(cached) == set(expected) and added.object_id in cached and anns[0]["id"] in cached
    assert (len(anns) == 1) or anns[-1]["id"] not in cached
    for object_id, obj in cached.items():
        assert obj.category == expected[object_id]["category"]
        assert np.array_equal(masks.decode(obj.rle), masks.decode(expected[object_id]["segmentation"]))
    assert np.array_equal(masks.decode(cached[anns[0]["id"]].rle), mask) and cached[added.object_id].category == "seal"
