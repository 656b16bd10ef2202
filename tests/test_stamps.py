"""The synthetic stamps dataset: COCO files, exact masks that line up with the ink, determinism."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samcache.data.stamps import CATEGORIES, generate_stamps, render_page
from samcache.data.synthetic import SPLITS, split_at, split_counts, split_plan
from samcache.errors import DatasetError

N = 6


# Its own pages, not conftest's shared `stamps`: here the generator itself is under test (N, seed, summary).
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("stamps") / "ds"
    summary = generate_stamps(out, N, seed=0, progress=False)
    return out, summary


def _load(out: Path) -> dict[str, dict]:
    return {s: json.loads((out / f"{s}.json").read_text()) for s in SPLITS}


def _decode(rle: dict) -> np.ndarray:
    # pycocotools directly, so the test does not lean on the code under test.
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def _chroma(bgr: np.ndarray) -> np.ndarray:
    # Paper, print and scan noise are near gray; stamp inks are strongly coloured.
    img = bgr.astype(np.int16)
    return (img.max(axis=2) - img.min(axis=2)).astype(np.float32)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _pages(out: Path, docs: dict[str, dict]):
    for doc in docs.values():
        anns = {}
        for a in doc["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        for im in doc["images"]:
            yield im, anns.get(im["id"], []), cv2.imread(str(out / "images" / im["file_name"]), cv2.IMREAD_COLOR)


def test_files_parse_and_images_match_their_records(dataset):
    out, _ = dataset
    docs = _load(out)
    names = []
    for split, doc in docs.items():
        assert {"images", "annotations", "categories"} <= set(doc)
        assert doc["categories"] == [dict(c) for c in CATEGORIES], split
        for im in doc["images"]:
            assert "/" not in im["file_name"] and im["file_name"].startswith("page_")
            img = cv2.imread(str(out / "images" / im["file_name"]), cv2.IMREAD_COLOR)
            assert img is not None, im["file_name"]
            assert img.shape == (im["height"], im["width"], 3)
            assert 600 <= min(img.shape[:2]) <= 900 and 800 <= max(img.shape[:2]) <= 1150
            names.append(im["file_name"])
    assert sorted(names) == [f"page_{i:05d}.jpg" for i in range(N)]
    ids = [im["id"] for doc in docs.values() for im in doc["images"]]
    assert len(set(ids)) == N


def test_splits_cover_every_page_and_match_the_summary(dataset):
    out, summary = dataset
    docs = _load(out)
    counts = {s: len(d["images"]) for s, d in docs.items()}
    assert sum(counts.values()) == N and all(c >= 1 for c in counts.values())
    assert summary["images"] == N and summary["out"] == str(out)
    assert summary["objects"] == sum(len(d["annotations"]) for d in docs.values())
    for s, d in docs.items():
        assert summary["splits"][s] == {"images": len(d["images"]), "objects": len(d["annotations"])}


def test_annotations_are_valid_coco_with_exact_boxes(dataset):
    out, _ = dataset
    docs = _load(out)
    ann_ids = [a["id"] for d in docs.values() for a in d["annotations"]]
    assert len(ann_ids) == len(set(ann_ids)) >= N  # at least one stamp a page
    category_ids = {c["id"] for c in CATEGORIES}
    for im, anns, _ in _pages(out, docs):
        assert 1 <= len(anns) <= 4
        for a in anns:
            assert a["iscrowd"] == 0 and a["category_id"] in category_ids
            assert a["segmentation"]["size"] == [im["height"], im["width"]]
            m = _decode(a["segmentation"])
            assert m.shape == (im["height"], im["width"]) and m.any()
            ys, xs = np.nonzero(m)
            x0, y0 = xs.min(), ys.min()
            assert a["bbox"] == [x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0]
            assert a["area"] == int(m.sum())
            short = min(im["height"], im["width"])
            w, h = a["bbox"][2:]
            assert min(w, h) >= 75 and max(w, h) <= 0.5 * short


def test_stamps_overlap_each_other_only_slightly(dataset):
    out, _ = dataset
    for _, anns, _ in _pages(out, _load(out)):
        masks = [_decode(a["segmentation"]) for a in anns]
        for a, b in combinations(masks, 2):
            assert (a & b).sum() <= 0.1 * min(a.sum(), b.sum())


def test_masks_line_up_with_the_stamp_ink(dataset):
    out, _ = dataset
    for im, anns, img in _pages(out, _load(out)):
        chroma = _chroma(img)
        every = np.zeros(img.shape[:2], np.uint8)
        for a in anns:
            every |= _decode(a["segmentation"]).astype(np.uint8)
        for a in anns:
            m = _decode(a["segmentation"]).astype(np.uint8)
            # The outer border runs along the mask's edge: coloured just inside, plain paper just outside.
            rim_in = (m > 0) & (cv2.erode(m, _disk(3)) == 0)
            rim_out = (cv2.dilate(m, _disk(5)) > 0) & (cv2.dilate(m, _disk(1)) == 0) & (every == 0)
            inside, outside = chroma[rim_in].mean(), chroma[rim_out].mean()
            # Shifting the masks by 4 px already breaks this for a good share of the stamps.
            assert inside > outside + 15 and inside > 2 * outside, (im["file_name"], a["id"], inside, outside)
            assert chroma[m > 0].mean() > chroma[every == 0].mean() + 2, (im["file_name"], a["id"])


def test_masks_are_exact_footprints_on_the_unencoded_page():
    page = render_page(3, 1)
    assert page.masks and len(page.masks) == len(page.category_ids)
    decoded = cv2.imdecode(np.frombuffer(page.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == page.image.shape
    for m in page.masks:
        assert m.dtype == bool and m.shape == page.image.shape[:2]
        # A filled footprint: one blob without holes.
        n, _ = cv2.connectedComponents(m.astype(np.uint8))
        assert n == 2
        filled = np.zeros_like(m, np.uint8)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(filled, contours, -1, 1, -1)
        assert np.array_equal(filled > 0, m)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate_stamps(again, N, seed=0, progress=False)
    for s in SPLITS:
        assert (again / f"{s}.json").read_bytes() == (out / f"{s}.json").read_bytes()
    for i in range(N):
        name = f"page_{i:05d}.jpg"
        assert (again / "images" / name).read_bytes() == (out / "images" / name).read_bytes()
    other = tmp_path / "other"
    generate_stamps(other, 2, seed=1, progress=False)
    for i in range(2):
        name = f"page_{i:05d}.jpg"
        assert (other / "images" / name).read_bytes() != (out / "images" / name).read_bytes()


def test_a_page_does_not_depend_on_how_many_pages_are_made(dataset, tmp_path):
    out, _ = dataset
    generate_stamps(tmp_path, 2, seed=0, progress=False)
    for i in range(2):
        name = f"page_{i:05d}.jpg"
        assert (tmp_path / "images" / name).read_bytes() == (out / "images" / name).read_bytes()


def test_progress_bar_goes_to_stderr_only_when_asked(tmp_path, capsys):
    generate_stamps(tmp_path / "quiet", 1, progress=False)
    assert capsys.readouterr().err == ""
    generate_stamps(tmp_path / "loud", 1, progress=True)
    captured = capsys.readouterr()
    assert "stamps" in captured.err and captured.out == ""


@pytest.mark.parametrize(
    ("n", "fractions", "expected"),
    [
        (10, (0.7, 0.15, 0.15), [7, 2, 1]),
        (3, (0.7, 0.15, 0.15), [1, 1, 1]),
        (4, (0.7, 0.15, 0.15), [2, 1, 1]),
        (2, (0.7, 0.15, 0.15), [1, 0, 1]),
        (5, (1.0, 0.0, 0.0), [5, 0, 0]),
        (0, (0.7, 0.15, 0.15), [0, 0, 0]),
    ],
)
def test_split_counts(n, fractions, expected):
    plan = split_plan(n, 0, fractions)
    assert [plan.count(s) for s in SPLITS] == expected and plan == sorted(plan, key=SPLITS.index)
    counts = split_counts(n, 0, fractions)
    assert list(counts) == expected and [split_at(i, counts) for i in range(n)] == plan


def test_empty_dataset_writes_empty_files(tmp_path):
    summary = generate_stamps(tmp_path, 0, progress=False)
    assert summary["images"] == 0 and summary["objects"] == 0
    for s in SPLITS:
        doc = json.loads((tmp_path / f"{s}.json").read_text())
        assert doc["images"] == [] and doc["annotations"] == [] and len(doc["categories"]) == 3


@pytest.mark.parametrize(
    "kwargs",
    [{"n": -1}, {"n": 2, "seed": -3}, {"n": 2, "fractions": (0.5, 0.5)}, {"n": 2, "fractions": (0.6, 0.6, -0.2)},
     {"n": 2, "fractions": (0.5, 0.2, 0.2)}, {"n": 2, "fractions": (float("nan"), 0.5, 0.5)}],
)
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(DatasetError):
        generate_stamps(tmp_path, progress=False, **kwargs)
