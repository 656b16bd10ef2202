"""Datasets a careless user makes: JPEG or blurred binary masks, label images with bright labels,
two files for one name, COCO ids, splits, sizes, boxes and categories that pass a glance but not
the cache, absurd split fractions and page counts. Each is read right or reported, through the CLI."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from pycocotools import mask as mask_utils

from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from samcache.data import masks
from samcache.data.datasets import load_dataset
from tests.helpers import EMBED_FLAGS, make_coco, rect_mask, write_image

H, W = 96, 128


def _run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _check(dataset: Path, *args) -> dict:
    """`samcache data check DATASET --json` as a dict (the command must succeed)."""
    result = _run("data", "check", dataset, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _messages(summary: dict, record: str) -> list[str]:
    return [p["message"] for p in summary["problems"] if p["record"] == record]


# ------------------------------------------------------------------------ A: reading mask files
def _random_shape(rng: np.random.Generator, near: np.ndarray | None = None) -> np.ndarray:
    """A filled rectangle or ellipse, 14-40 px across; with `near`, one that overlaps it (they touch)."""
    mask = np.zeros((H, W), np.uint8)
    w, h = (int(v) for v in rng.integers(14, 41, 2))
    if near is None:
        x, y = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
    else:  # start inside `near`'s box, so the two shapes share pixels
        ys, xs = np.nonzero(near)
        x, y = int(np.clip(xs.max() - 4, 0, W - w)), int(np.clip(ys.max() - 4, 0, H - h))
    if rng.random() < 0.5:
        mask[y:y + h, x:x + w] = 1
    else:
        cv2.ellipse(mask, (x + w // 2, y + h // 2), (w // 2, h // 2), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def _binary_objects(rng: np.random.Generator) -> list[np.ndarray]:
    """1-3 random shapes as the objects a binary mask holds: touching shapes are one object, apart
    ones are at least 6 px apart (so JPEG noise neither joins nor splits them)."""
    while True:
        shapes = [_random_shape(rng)]
        for _ in range(int(rng.integers(0, 3))):
            shapes.append(_random_shape(rng, near=shapes[-1] if rng.random() < 0.4 else None))
        union = np.any(shapes, axis=0).astype(np.uint8)
        count, labels = cv2.connectedComponents(union, connectivity=8)
        objects = [labels == k for k in range(1, count)]
        grown = [cv2.dilate(o.astype(np.uint8), np.ones((13, 13), np.uint8)) > 0 for o in objects]
        if all(not (grown[i] & objects[j]).any() for i in range(len(objects)) for j in range(len(objects)) if i != j):
            return objects


def _label_objects(rng: np.random.Generator, k: int) -> list[np.ndarray]:
    """k random shapes (later ones over earlier ones, touching allowed), each keeping 60 pixels or more."""
    while True:
        labels = np.zeros((H, W), np.int32)
        for i in range(k):
            labels[_random_shape(rng)] = i + 1
        objects = [labels == i + 1 for i in range(k)]
        if all(o.sum() >= 60 for o in objects):
            return objects


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _write_maskdir_cases(root: Path, seed: int) -> dict[str, list[np.ndarray]]:
    """Random binary masks saved as JPEG at several qualities and label images saved as PNG with
    labels 1..k, 28*i, 255//k*i and 1000*i (16-bit); returns {image name: the objects drawn}."""
    rng = np.random.default_rng(seed)
    drawn: dict[str, list[np.ndarray]] = {}
    for case in range(25):
        objects = _binary_objects(rng)
        quality = [50, 70, 85, 95, 100][case % 5]
        binary = (np.any(objects, axis=0) * 255).astype(np.uint8)
        name = f"jpeg{case:02d}_q{quality}"
        assert cv2.imwrite(str(root / "masks" / f"{name}.jpg"), binary, [cv2.IMWRITE_JPEG_QUALITY, quality])
        drawn[f"{name}.png"] = objects
    for case in range(20):
        k = int(rng.integers(2, 10))
        objects = _label_objects(rng, k)
        step = [1, 28, 255 // k, 1000][case % 4]
        labels = np.zeros((H, W), np.uint16 if step * k > 255 else np.uint8)
        for i, obj in enumerate(objects):
            labels[obj] = step * (i + 1)
        name = f"labels{case:02d}_k{k}_step{step}"
        assert cv2.imwrite(str(root / "masks" / f"{name}.png"), labels)
        drawn[f"{name}.png"] = objects
    for name in drawn:
        write_image(root / "images" / name, H, W)
    return drawn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_jpeg_binary_masks_and_png_label_images_give_the_objects_drawn(tmp_path, seed):
    (tmp_path / "masks").mkdir()
    drawn = _write_maskdir_cases(tmp_path, seed)
    summary = _check(tmp_path)
    assert summary["images"] == len(drawn)
    assert summary["objects"] == sum(len(objects) for objects in drawn.values())
    # Every JPEG is read as binary with a warning; no label image is taken for a blurred mask.
    assert all(p["dropped"] == "nothing" and p["file"].endswith(".jpg") and "JPEG mask" in p["message"]
               for p in summary["problems"]), summary["problems"]
    for image in load_dataset(tmp_path).images:
        want = drawn[image.name]
        got = [masks.decode(o.rle) for o in image.objects]
        assert len(got) == len(want), image.name
        for obj in want:
            assert max(_iou(obj, g) for g in got) > 0.9, image.name


def _two_rectangles() -> np.ndarray:
    binary = np.zeros((60, 80), np.uint8)
    binary[5:25, 5:30] = 255
    binary[35:55, 40:75] = 255
    return binary


@pytest.mark.parametrize("quality", [70, 95, 100])
@pytest.mark.parametrize("extension", [".jpg", ".png"])  # a JPEG is known by its bytes, not its name
def test_a_binary_mask_saved_as_jpeg_is_two_objects_with_a_warning(tmp_path, quality, extension):
    write_image(tmp_path / "images" / "a.png", 60, 80)
    ok, data = cv2.imencode(".jpg", _two_rectangles(), [cv2.IMWRITE_JPEG_QUALITY, quality])
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / f"a{extension}").write_bytes(data.tobytes())
    summary = _check(tmp_path)
    assert summary["objects"] == 2
    (warning,) = _messages(summary, "image a.png")
    assert "JPEG mask (lossy, so read as binary)" in warning and "thresholded at 128" in warning
    boxes = sorted(o.box for o in load_dataset(tmp_path).images[0].objects)
    assert boxes == [(5, 5, 30, 25), (40, 35, 75, 55)]


def test_a_label_image_with_labels_spaced_by_28_keeps_all_nine_objects(tmp_path):
    write_image(tmp_path / "images" / "l.png", 60, 90)
    labels = np.zeros((60, 90), np.uint8)
    for k in range(8):  # 28, 56, ..., 224: small objects, two of them touching
        labels[2:12, k * 11: k * 11 + 9 + (k == 3) * 2] = 28 * (k + 1)
    labels[20:58, 5:85] = 252  # the brightest label on the largest object, as a blurred mask's plateau would be
    (tmp_path / "masks").mkdir()
    assert cv2.imwrite(str(tmp_path / "masks" / "l.png"), labels)
    summary = _check(tmp_path)
    assert summary["objects"] == 9 and summary["problems"] == []


def test_forced_modes_read_a_jpeg_as_binary_too_and_labels_warns(tmp_path):
    write_image(tmp_path / "images" / "a.png", 60, 80)
    (tmp_path / "masks").mkdir()
    assert cv2.imwrite(str(tmp_path / "masks" / "a.jpg"), _two_rectangles(), [cv2.IMWRITE_JPEG_QUALITY, 50])
    assert _check(tmp_path, "--mask-mode", "components")["objects"] == 2
    single = _check(tmp_path, "--mask-mode", "single")
    assert single["objects"] == 1 and "kept as one object" in _messages(single, "image a.png")[0]
    labels = _check(tmp_path, "--mask-mode", "labels")
    assert "JPEG label image" in _messages(labels, "image a.png")[0]


# ----------------------------------------------------------------- B: one name, two files
def test_two_masks_or_two_images_with_one_name_are_refused(tmp_path):
    mask = (rect_mask(30, 40, 5, 5, 20, 20) * 255).astype(np.uint8)
    for name in ("a.png", "b.png", "b.jpg", "c.png"):
        write_image(tmp_path / "images" / name, 30, 40)
    (tmp_path / "masks").mkdir()
    for name in ("a.png", "a.jpg", "b.png", "c.png"):
        assert cv2.imwrite(str(tmp_path / "masks" / name), mask)
    summary = _check(tmp_path)
    assert summary["images"] == 1 and summary["objects"] == 1  # only c.png is unambiguous
    (two_masks,) = _messages(summary, "image a.png")
    assert "2 masks for one image (a.jpg, a.png)" in two_masks and "keep one" in two_masks
    for record in ("image b.jpg", "image b.png"):
        (message,) = _messages(summary, record)
        assert "images b.jpg, b.png share the name 'b'" in message
    strict = _run("data", "check", tmp_path, "--strict")
    assert strict.exit_code == 1 and "3 problem(s)" in strict.output


# ----------------------------------------------------------------------------------- C: COCO
def _coco(root: Path, images: list[dict], annotations: list[dict], **kwargs) -> Path:
    """A single-file COCO data set: every image 40x50, written under root/images."""
    for image in images:
        write_image(root / "images" / image["file_name"], 40, 50)
    return make_coco(root, images, annotations, "all.json", **kwargs)


def _ann(ann_id, image_id, **overrides) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [5, 5, 10, 10],
            "segmentation": masks.encode(rect_mask(40, 50, 5, 5, 15, 15)), **overrides}


def _image(image_id, name, **overrides) -> dict:
    return {"id": image_id, "file_name": name, "width": 50, "height": 40, **overrides}


@pytest.mark.parametrize("bad_id", [2**63, 2**64, -(2**63) - 1])
def test_ids_that_do_not_fit_in_64_bits_are_reported_by_name(tmp_path, bad_id):
    path = _coco(tmp_path, [_image(1, "ok.png"), _image(bad_id, "big.png")],
                 [_ann(1, 1), _ann(bad_id, 1), _ann(2, bad_id)])
    summary = _check(path)
    assert summary["images"] == 1 and summary["objects"] == 1
    (image_problem,) = _messages(summary, f"image id {bad_id} (big.png)")
    assert f"image id {bad_id} does not fit in 64 bits" in image_problem
    (ann_problem,) = _messages(summary, f"annotation id {bad_id}")
    assert f"annotation id {bad_id} does not fit in 64 bits" in ann_problem


@pytest.mark.parametrize("split", ["TRAIN", "holdout", 123, ""])
def test_a_split_field_other_than_train_val_test_is_reported(tmp_path, split):
    path = _coco(tmp_path, [_image(1, "ok.png", split="val"), _image(2, "odd.png", split=split)],
                 [_ann(1, 1), _ann(2, 2)])
    summary = _check(path)
    assert summary["splits"] == {"val": {"images": 1, "objects": 1}}
    (message,) = _messages(summary, "image id 2 (odd.png)")
    assert f"split {split!r} is not one of train, val, test" in message


def test_embed_finishes_on_a_dataset_with_huge_ids_and_bad_splits(tmp_path):
    path = _coco(tmp_path, [_image(1, "ok.png"), _image(2**63, "big.png"), _image(3, "odd.png", split="TRAIN")],
                 [_ann(1, 1), _ann(2**64, 1), _ann(2, 2**63), _ann(3, 3)])
    result = _run("embed", path, "--out", tmp_path / "cache", *EMBED_FLAGS)
    assert result.exit_code == 0, result.output
    assert "image id 9223372036854775808 (big.png): image id 9223372036854775808 does not fit" in result.output
    assert "annotation id 18446744073709551616" in result.output and "split 'TRAIN'" in result.output
    cache = EmbeddingCache(tmp_path / "cache")
    assert len(cache) == 1 and cache.images[0].name == "ok.png"


@pytest.mark.parametrize("overrides, message", [
    ({"width": "50"}, "width is the string '50', not an integer"),
    ({"height": 40.0}, "height is the number 40.0, not an integer"),
    ({"height": True}, "height is true, not an integer"),
    ({"width": [50]}, "width is a list, not an integer"),
    ({"width": 51}, "declared size 40x51 but the file is 40x50"),
    ({"width": None, "height": 41}, "declared size 41x? but the file is 40x50"),
])
def test_a_declared_size_of_the_wrong_type_says_what_is_wrong(tmp_path, overrides, message):
    path = _coco(tmp_path, [_image(1, "ok.png", **overrides)], [_ann(1, 1)])
    summary = _check(path)
    assert summary["images"] == 0 and _messages(summary, "image id 1 (ok.png)") == [message]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_bbox_values_are_reported_by_annotation_id(tmp_path, bad):
    path = _coco(tmp_path, [_image(1, "ok.png")], [_ann(1, 1), _ann(17, 1, bbox=[5, bad, 10, 10])])
    summary = _check(path)  # json writes NaN / Infinity, which Python's and most COCO tools' readers accept
    assert summary["objects"] == 1
    (message,) = _messages(summary, "annotation id 17 (image ok.png)")
    assert "holds NaN or infinity" in message


def test_duplicate_category_ids_are_reported_with_both_names(tmp_path):
    categories = [{"id": 1, "name": "stamp"}, {"id": 2, "name": "seal"}, {"id": 1, "name": "signature"},
                  {"id": 2, "name": "seal"}]
    path = _coco(tmp_path, [_image(1, "ok.png")], [_ann(1, 1), _ann(2, 1), _ann(3, 1, category_id=2)],
                 categories=categories)
    summary = _check(path)
    assert summary["categories"] == {"seal": 1}  # the objects of id 1 could be stamps or signatures
    (ambiguous,) = _messages(summary, "category id 1")
    assert "category id 1 is given to 'stamp' and 'signature'" in ambiguous and "2 object(s)" in ambiguous
    assert _messages(summary, "category id 2") == ["category 'seal' is listed twice"]
    assert [p["dropped"] for p in summary["problems"]] == ["nothing", "object"]


def test_unhashable_category_ids_are_problems_not_crashes(tmp_path):
    path = _coco(tmp_path, [_image(1, "ok.png")], [_ann(1, 1), _ann(2, 1, category_id=[1])],
                 categories=[{"id": 1, "name": "stamp"}, {"id": [2], "name": "seal"}])
    result = _run("data", "check", path, "--json")
    assert result.exit_code == 0 and "Traceback" not in result.output
    summary = json.loads(result.output)
    assert summary["objects"] == 1 and len(summary["problems"]) == 2


# ----------------------------------------------------------------------- D: split fractions
@pytest.mark.parametrize("fractions", ["nan,0.5,0.5", "0.5,nan,0.5", "inf,0,0", "0,0,0", "-1,1,1"])
def test_split_fractions_must_be_finite_non_negative_and_sum_to_one(coco_dir, tmp_path, fractions):
    for dataset in (coco_dir, coco_dir / "train.json"):  # splits from files, and from the hash
        result = _run("data", "check", dataset, "--split-fractions", fractions)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "split fractions (train, val, test) must be three finite, non-negative numbers summing to 1" \
            in result.output
        assert repr(tuple(float(v) for v in fractions.split(","))) in result.output
    embed = _run("embed", coco_dir, "--out", tmp_path / "cache", "--split-fractions", fractions, *EMBED_FLAGS)
    assert embed.exit_code == 1 and "split fractions" in embed.output and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------ F: stamps --n
@pytest.mark.parametrize("n", ["999999999999", "1000001"])
def test_data_stamps_refuses_absurd_page_counts_before_writing(tmp_path, n):
    out = tmp_path / "stamps"
    result = _run("data", "stamps", "--out", out, "--n", n)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"must be at most 1,000,000 images, got {int(n):,}" in result.output
    assert not out.exists()


def test_data_stamps_writes_page_by_page_without_a_plan_of_every_page(tmp_path, monkeypatch):
    from samcache.data import stamps
    from samcache.errors import SamcacheError

    first = stamps.render_page(0, 0)
    rendered = []

    def render(seed, index):  # two real pages, then a stop: what was written by then shows the order
        if len(rendered) == 2:
            raise SamcacheError("stop here")
        rendered.append(index)
        return first

    monkeypatch.setattr(stamps, "render_page", render)
    _run("data", "stamps", "--out", tmp_path / "warm-up", "--n", "3")  # imports and caches, outside the count
    rendered.clear()
    tracemalloc.start()
    try:
        result = _run("data", "stamps", "--out", tmp_path / "big", "--n", "1000000")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.exit_code == 1 and "stop here" in result.output
    assert sorted(p.name for p in (tmp_path / "big" / "images").iterdir()) == ["page_00000.jpg", "page_00001.jpg"]
    # A list of a million splits alone takes 8 MB; one page's masks and JSON take far less than 4.
    assert peak < 4e6, f"{peak / 1e6:.1f} MB allocated for a million pages before the first was written"


@pytest.mark.parametrize("spool_bytes", [None, 100])  # entries in memory, or spilled to disk after 100 bytes
def test_generated_coco_files_are_plain_json_dumps(tmp_path, monkeypatch, spool_bytes):
    if spool_bytes:
        monkeypatch.setattr("samcache.data.synthetic._SPOOL_BYTES", spool_bytes)
    result = _run("data", "stamps", "--out", tmp_path / "s", "--n", "4", "--seed", "5")
    assert result.exit_code == 0, result.output
    for split in ("train", "val", "test"):
        text = (tmp_path / "s" / f"{split}.json").read_text()
        doc = json.loads(text)
        assert json.dumps(doc) == text and doc["images"]  # the same bytes as dumping the whole document at once
        for ann in doc["annotations"]:
            rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
            assert int(mask_utils.area(rle)) == ann["area"]
