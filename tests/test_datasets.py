"""COCO and mask-folder readers: valid layouts, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from samcache.data import masks
from samcache.data.datasets import hash_split, load_dataset
from samcache.errors import DatasetError
from tests.helpers import make_coco, rect_mask, write_image


# ------------------------------------------------------------------------------------ COCO
def test_coco_per_split_files(coco_dir):
    ds = load_dataset(coco_dir)
    assert ds.format == "coco" and not ds.problems
    summary = ds.summary()
    assert summary["images"] == 4 and summary["objects"] == 5
    assert summary["splits"] == {
        "test": {"images": 1, "objects": 1}, "train": {"images": 2, "objects": 3}, "val": {"images": 1, "objects": 1}
    }
    assert summary["categories"] == {"seal": 2, "stamp": 3}
    assert summary["ignored_crowd"] == 1
    by_id = {o.object_id: o for im in ds.images for o in im.objects}
    assert by_id[1].box == (10, 10, 30, 40)  # compressed RLE: the mask's tight box, XYXY pixel edges
    assert by_id[2].box == (5, 0, 8, 60)  # uncompressed RLE: columns 5..7, all rows
    np.testing.assert_array_equal(masks.decode(by_id[2].rle), rect_mask(60, 80, 5, 0, 8, 60))
    poly = masks.decode(by_id[3].rle)  # polygon 40..60 x 20..40
    assert poly[30, 50] and not poly[10, 10] and abs(int(poly.sum()) - 400) <= 45
    assert by_id[1].category == "stamp" and by_id[2].category == "seal"
    train = ds.split("train")
    assert {im.name for im in train} == {"im0.png", "im1.png"} and train[0].height == 60 and train[0].width == 80


def test_coco_single_file_uses_split_field_then_hash(tmp_path):
    for i in range(20):
        write_image(tmp_path / "images" / f"a{i}.png", 20, 20, seed=i)
    images = [{"id": i, "file_name": f"a{i}.png", "width": 20, "height": 20} for i in range(20)]
    images[0]["split"] = "test"
    anns = [{"id": i, "image_id": i, "category_id": 1, "segmentation": masks.encode(rect_mask(20, 20, 2, 2, 9, 9))}
            for i in range(20)]
    path = make_coco(tmp_path, images, anns, "all.json")
    ds = load_dataset(path, fractions=(0.5, 0.25, 0.25))
    splits = {im.name: im.split for im in ds.images}
    assert splits["a0.png"] == "test"
    assert all(splits[f"a{i}.png"] == hash_split(f"a{i}.png", (0.5, 0.25, 0.25)) for i in range(1, 20))
    assert set(splits.values()) == {"train", "val", "test"}
    assert load_dataset(path, fractions=(0.5, 0.25, 0.25)).summary() == ds.summary()  # deterministic


def test_hash_split_is_stable_and_follows_fractions():
    names = [f"img_{i}.png" for i in range(4000)]
    counts = {s: sum(hash_split(n) == s for n in names) for s in ("train", "val", "test")}
    assert abs(counts["train"] / 4000 - 0.8) < 0.03 and abs(counts["val"] / 4000 - 0.1) < 0.02
    assert hash_split("x.png") == hash_split("x.png")
    with pytest.raises(DatasetError, match="fractions"):
        hash_split("x", (0.5, 0.5, 0.5))


def _one_image_coco(tmp_path: Path, ann_overrides: dict | None = None, image_overrides: dict | None = None,
                    extra_anns: list | None = None, extra_images: list | None = None):
    write_image(tmp_path / "images" / "ok.png", 40, 50)
    image = {"id": 1, "file_name": "ok.png", "width": 50, "height": 40, **(image_overrides or {})}
    ann = {"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0,
           "segmentation": masks.encode(rect_mask(40, 50, 5, 5, 15, 15)), **(ann_overrides or {})}
    return make_coco(tmp_path, [image] + (extra_images or []), [ann] + (extra_anns or []))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"bbox": [60, 5, 10, 10]}, "outside the 50x40 image"),
        ({"bbox": [5, 5, 0, 10]}, "zero area"),
        ({"segmentation": {"size": [40, 50], "counts": "garbage~~"}}, "invalid segmentation"),
        ({"segmentation": {"size": [40, 50], "counts": "PP1"}}, "invalid segmentation: compressed RLE runs cover"),
        ({"segmentation": {"size": [40, 50], "counts": [5, 5]}}, "invalid segmentation: uncompressed RLE"),
        ({"segmentation": masks.encode(rect_mask(41, 50, 5, 5, 15, 15))}, "differs from the image size"),
        ({"segmentation": masks.encode(np.zeros((40, 50), bool))}, "empty mask"),
        ({"segmentation": [[1, 2, 3]]}, "invalid segmentation: polygon"),
        ({"category_id": 99}, "category_id 99"),
        ({"image_id": 7}, "image_id 7"),
    ],
)
def test_bad_annotation_is_skipped_reported_and_strict_fails(tmp_path, overrides, message):
    path = _one_image_coco(tmp_path, overrides)
    ds = load_dataset(path)
    assert len(ds.problems) == 1
    problem = ds.problems[0]
    assert message in problem.message and problem.dropped == "object"
    assert problem.file == str(path) and "annotation id 10" in problem.record
    assert ds.summary()["objects"] == 0 and ds.summary()["problems"][0]["message"] == problem.message
    with pytest.raises(DatasetError, match="annotation id 10"):
        load_dataset(path, strict=True)


@pytest.mark.parametrize(
    "image_overrides, message",
    [
        ({"file_name": "missing.png"}, "is missing"),
        ({"file_name": "../ok.png"}, "escapes"),
        ({"file_name": "/etc/passwd"}, "escapes"),
        ({"width": 51}, "declared size 40x51 but the file is 40x50"),
    ],
)
def test_bad_image_entry_drops_the_image(tmp_path, image_overrides, message):
    path = _one_image_coco(tmp_path, image_overrides=image_overrides)
    ds = load_dataset(path)
    image_problems = [p for p in ds.problems if p.dropped == "image"]
    assert len(image_problems) == 1 and message in image_problems[0].message
    assert ds.images == []


def test_duplicate_ids(tmp_path):
    write_image(tmp_path / "images" / "two.png", 40, 50)
    dup_ann = {"id": 10, "image_id": 1, "category_id": 1, "segmentation": masks.encode(rect_mask(40, 50, 1, 1, 4, 4))}
    dup_image = {"id": 1, "file_name": "two.png", "width": 50, "height": 40}
    ds = load_dataset(_one_image_coco(tmp_path, extra_anns=[dup_ann], extra_images=[dup_image]))
    messages = sorted(p.message for p in ds.problems)
    assert messages[0].startswith("duplicate annotation id") and messages[1] == "duplicate image id"
    assert len(ds.images) == 1 and len(ds.images[0].objects) == 1 and ds.images[0].objects[0].box == (5, 5, 15, 15)


def test_corrupt_image_file_is_a_problem(tmp_path):
    path = _one_image_coco(tmp_path)
    (tmp_path / "images" / "ok.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = load_dataset(path)
    assert ds.images == [] and "ok.png" in ds.problems[0].message


def test_unreadable_json_and_unknown_layout_fail_clearly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(DatasetError, match="bad.json: not a readable JSON"):
        load_dataset(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is not a dataset samcache reads"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- mask folders
def _write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask)


def test_maskdir_label_images_8_and_16_bit(tmp_path):
    write_image(tmp_path / "images" / "a.png", 30, 40)
    write_image(tmp_path / "images" / "b.jpg", 30, 40)
    labels8 = np.zeros((30, 40), np.uint8)
    labels8[2:10, 2:10], labels8[15:25, 20:35] = 1, 7
    labels16 = np.zeros((30, 40), np.uint16)
    labels16[0:5, 0:5], labels16[10:20, 10:20], labels16[25:30, 30:40] = 300, 1000, 65535
    _write_mask(tmp_path / "masks" / "a.png", labels8)
    _write_mask(tmp_path / "masks" / "b.png", labels16)
    ds = load_dataset(tmp_path)
    assert ds.format == "maskdir" and not ds.problems
    boxes = {im.name: sorted(o.box for o in im.objects) for im in ds.images}
    assert boxes["a.png"] == [(2, 2, 10, 10), (20, 15, 35, 25)]
    assert boxes["b.jpg"] == [(0, 0, 5, 5), (10, 10, 20, 20), (30, 25, 40, 30)]
    assert {im.split for im in ds.images} <= {"train", "val", "test"}


def test_maskdir_binary_components_or_single(tmp_path):
    write_image(tmp_path / "train" / "images" / "c.png", 30, 40)
    binary = np.zeros((30, 40), np.uint8)
    binary[2:8, 2:8] = 255
    binary[20:28, 30:38] = 255
    _write_mask(tmp_path / "train" / "masks" / "c.png", binary)
    ds = load_dataset(tmp_path)
    assert [im.split for im in ds.images] == ["train"] and len(ds.images[0].objects) == 2
    single = load_dataset(tmp_path, mask_mode="single")
    assert len(single.images[0].objects) == 1 and single.images[0].objects[0].box == (2, 2, 38, 28)


def test_maskdir_problems(tmp_path):
    write_image(tmp_path / "images" / "nomask.png", 30, 40)
    write_image(tmp_path / "images" / "size.png", 30, 40)
    write_image(tmp_path / "images" / "empty.png", 30, 40)
    _write_mask(tmp_path / "masks" / "size.png", np.ones((31, 40), np.uint8))
    _write_mask(tmp_path / "masks" / "empty.png", np.zeros((30, 40), np.uint8))
    ds = load_dataset(tmp_path)
    found = {p.record: p for p in ds.problems}
    assert ds.images == [] and len(ds.problems) == 3
    assert "no mask named nomask" in found["image nomask.png"].message
    assert "31x40 differs from the image's 30x40" in found["image size.png"].message
    assert found["image size.png"].file == str(tmp_path / "masks" / "size.png")
    assert "empty mask" in found["image empty.png"].message
    with pytest.raises(DatasetError, match="3 problem"):
        load_dataset(tmp_path, strict=True)


def test_summary_is_json_serialisable(coco_dir):
    json.dumps(load_dataset(coco_dir).summary())


@pytest.mark.parametrize("polygon, message", [
    ([5, 5, float("nan"), 5, 15, 15], "must be finite"),
    ([5, 5, float("inf"), 5, 15, 15], "must be finite"),
    ([5, 5, 1e30, 5, 15, 15], "far outside the 50x40 image"),
    ([5, 5, "15", 5, 15, 15], "must be numbers"),
])
def test_bad_polygon_coordinates_are_problems_not_crashes(tmp_path, polygon, message):
    path = _one_image_coco(tmp_path, {"segmentation": [polygon]})  # json writes NaN/Infinity tokens
    ds = load_dataset(path)
    assert len(ds.problems) == 1 and message in ds.problems[0].message and ds.summary()["objects"] == 0


@pytest.mark.parametrize("bad_id", ["7", 7.5, [7], True])
def test_ids_that_are_not_integers_are_reported(tmp_path, bad_id):
    ann_path = _one_image_coco(tmp_path / "ann", {"id": bad_id})
    ds = load_dataset(ann_path)
    assert [p.dropped for p in ds.problems] == ["object"] and "annotation id must be an integer" in ds.problems[0].message
    image_path = _one_image_coco(tmp_path / "img", {"image_id": bad_id}, {"id": bad_id})
    ds = load_dataset(image_path)
    assert ds.images == [] and any("image id must be an integer" in p.message for p in ds.problems)
    assert not any("Traceback" in p.message for p in ds.problems)


def test_one_file_under_two_names_in_two_splits_is_reported(tmp_path):
    write_image(tmp_path / "images" / "page.png", 40, 50)
    rle = masks.encode(rect_mask(40, 50, 5, 5, 15, 15))
    for split, name, ann_id in (("train", "page.png", 1), ("test", "./page.png", 2)):
        make_coco(tmp_path, [{"id": ann_id, "file_name": name, "width": 50, "height": 40}],
                  [{"id": ann_id, "image_id": ann_id, "category_id": 1, "segmentation": rle}], f"{split}.json")
    ds = load_dataset(tmp_path)
    assert [im.split for im in ds.images] == ["train"]
    assert len(ds.problems) == 1 and "the same image file as 'page.png'" in ds.problems[0].message
    assert ds.problems[0].file.endswith("test.json")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_anti_aliased_or_jpeg_binary_masks_are_thresholded_with_a_warning(tmp_path, suffix):
    write_image(tmp_path / "images" / "s.png", 60, 80)
    binary = np.zeros((60, 80), np.uint8)
    binary[5:25, 5:30] = 255
    binary[35:55, 40:75] = 255
    soft = cv2.GaussianBlur(binary, (5, 5), 1.5)  # grey fringes, as anti-aliasing draws them
    _write_mask(tmp_path / "masks" / f"s{suffix}", soft)
    ds = load_dataset(tmp_path)
    assert len(np.unique(soft)) > 10  # in `labels` mode each grey level would be an "object"
    assert len(ds.images[0].objects) == 2
    boxes = sorted(o.box for o in ds.images[0].objects)
    assert all(abs(a - b) <= 2 for box, want in zip(boxes, [(5, 5, 30, 25), (40, 35, 75, 55)])
               for a, b in zip(box, want))
    assert [p.dropped for p in ds.problems] == ["nothing"] and "thresholded at 128" in ds.problems[0].message


def test_a_label_image_with_many_bright_labels_is_still_labels(tmp_path):
    write_image(tmp_path / "images" / "l.png", 60, 80)
    labels = np.zeros((60, 80), np.uint8)
    for k in range(12):  # values 20, 40, ..., 240: most pixels above half the range, none dominant
        labels[(k // 4) * 20 : (k // 4) * 20 + 15, (k % 4) * 20 : (k % 4) * 20 + 15] = 20 * (k + 1)
    _write_mask(tmp_path / "masks" / "l.png", labels)
    ds = load_dataset(tmp_path)
    assert not ds.problems and len(ds.images[0].objects) == 12
