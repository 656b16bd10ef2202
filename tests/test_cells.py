"""The synthetic cells dataset: 16-bit low-contrast images, disjoint exact masks, touching nuclei, determinism."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from pycocotools import mask as mask_utils

from samcache.cli import main
from samcache.data.cells import CATEGORIES, generate_cells, render_image
from samcache.data.datasets import load_dataset
from samcache.data.images import read_image
from samcache.data.synthetic import SPLITS
from samcache.errors import OutputError

N = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cells") / "ds"
    summary = generate_cells(out, N, seed=0, progress=False)
    return out, summary


def _load(out: Path) -> dict[str, dict]:
    return {s: json.loads((out / f"{s}.json").read_text()) for s in SPLITS}


def _decode(rle: dict) -> np.ndarray:
    # pycocotools directly, so the test does not lean on the code under test.
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def _images(out: Path):
    """(image record, its masks, its pixels as stored) for every image of every split."""
    for doc in _load(out).values():
        for im in doc["images"]:
            anns = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
            pixels = cv2.imread(str(out / "images" / im["file_name"]), cv2.IMREAD_UNCHANGED)
            yield im, anns, pixels


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def test_images_are_16_bit_gray_and_low_contrast(dataset):
    out, summary = dataset
    names = []
    for im, anns, pixels in _images(out):
        names.append(im["file_name"])
        assert pixels.dtype == np.uint16 and pixels.shape == (im["height"], im["width"]), im["file_name"]
        assert 512 <= min(pixels.shape) and max(pixels.shape) <= 768
        # A dim image: a small part of the 16-bit range, well above zero, far from saturation.
        low, high = int(pixels.min()), int(pixels.max())
        assert 0.03 * 65535 <= high - low <= 0.25 * 65535 and high <= 0.3 * 65535, (im["file_name"], low, high)
        # Nuclei only slightly brighter than the background around them (not counting the debris).
        every = np.zeros(pixels.shape, np.uint8)
        for a in anns:
            every |= _decode(a["segmentation"]).astype(np.uint8)
        background = cv2.dilate(every, _disk(6)) == 0
        ratio = pixels[every > 0].mean() / np.median(pixels[background])
        assert 1.02 < ratio < 1.5, (im["file_name"], ratio)
    assert sorted(names) == [f"cell_{i:05d}.png" for i in range(N)]
    assert summary["images"] == N and summary["out"] == str(out)


def test_masks_are_disjoint_exact_and_many_nuclei_touch(dataset):
    out, summary = dataset
    objects = touching = 0
    for im, anns, pixels in _images(out):
        assert 8 <= len(anns) <= 30, im["file_name"]
        masks = [_decode(a["segmentation"]) for a in anns]
        for a, m in zip(anns, masks):
            assert a["category_id"] == CATEGORIES[0]["id"] and a["iscrowd"] == 0
            ys, xs = np.nonzero(m)
            x0, y0 = xs.min(), ys.min()
            assert a["bbox"] == [x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0] and a["area"] == int(m.sum())
            # A visible part is one piece.
            assert cv2.connectedComponents(m.astype(np.uint8), connectivity=4)[0] == 2, (im["file_name"], a["id"])
        for a, b in combinations(masks, 2):
            assert not (a & b).any(), im["file_name"]
        every = np.any(masks, axis=0)
        for m in masks:
            grown = cv2.dilate(m.astype(np.uint8), _disk(2)) > 0
            touching += bool((grown & every & ~m).any())
            # The nucleus is brighter than the background just outside its outline.
            ring = (cv2.dilate(m.astype(np.uint8), _disk(7)) > 0) & ~(cv2.dilate(m.astype(np.uint8), _disk(2)) > 0)
            ring &= ~(cv2.dilate(every.astype(np.uint8), _disk(2)) > 0)
            if ring.sum() > 50:
                assert pixels[m].mean() > pixels[ring].mean(), (im["file_name"])
        objects += len(masks)
    assert objects == summary["objects"]
    assert touching >= 0.3 * objects, (touching, objects)


def test_read_image_stretches_the_16_bit_images_so_the_nuclei_show(dataset):
    out, _ = dataset
    im, anns, pixels = next(_images(out))
    rgb = read_image(out / "images" / im["file_name"])
    assert rgb.dtype == np.uint8 and rgb.shape == (*pixels.shape, 3)
    every = np.any([_decode(a["segmentation"]) for a in anns], axis=0)
    # The percentile mapping turns a few percent of the range into a visible difference.
    assert rgb[..., 0][every].mean() > rgb[..., 0][~every].mean() + 25
    assert int(rgb.max()) - int(rgb.min()) == 255


def test_the_dataset_loader_reads_every_object(dataset):
    out, summary = dataset
    ds = load_dataset(out, strict=True)
    assert len(ds.images) == N and sum(len(r.objects) for r in ds.images) == summary["objects"]
    check = CliRunner().invoke(main, ["data", "check", str(out), "--json", "--strict"])
    assert check.exit_code == 0, check.output
    report = json.loads(check.output)
    assert report["objects"] == summary["objects"] and report["categories"] == {"cell": summary["objects"]}


def test_same_seed_gives_identical_bytes_and_an_image_does_not_depend_on_n(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate_cells(again, N, seed=0, progress=False)
    for s in SPLITS:
        assert (again / f"{s}.json").read_bytes() == (out / f"{s}.json").read_bytes()
    for i in range(N):
        name = f"cell_{i:05d}.png"
        assert (again / "images" / name).read_bytes() == (out / "images" / name).read_bytes()
    assert render_image(0, 1).png == (out / "images" / "cell_00001.png").read_bytes()
    assert render_image(1, 1).png != render_image(0, 1).png


def test_overwrite_replaces_only_samcache_cells_output(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=r"holds files samcache did not write \(notes.txt\)"):
            generate_cells(foreign, 1, progress=False, overwrite=overwrite)
        assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    out = tmp_path / "cells"
    generate_cells(out, 3, seed=1, progress=False)
    with pytest.raises(OutputError, match="pass --overwrite"):
        generate_cells(out, 1, progress=False)
    generate_cells(out, 1, seed=1, progress=False, overwrite=True)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["cell_00000.png"]


def test_the_cli_writes_a_set_that_data_check_accepts_and_refuses_a_stamps_folder(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cells"
    result = runner.invoke(main, ["data", "cells", "--out", str(out), "--n", "3", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 images with" in result.output
    assert len(list((out / "images").glob("cell_*.png"))) == 3
    again = runner.invoke(main, ["data", "cells", "--out", str(out), "--n", "3", "--seed", "2"])
    assert again.exit_code == 1 and "pass --overwrite" in again.output
    (out / ".samcache-output.json").write_text(json.dumps({"kind": "stamps dataset", "complete": True}))
    other = runner.invoke(main, ["data", "cells", "--out", str(out), "--n", "3", "--overwrite"])
    assert other.exit_code == 1 and "another kind (stamps dataset, not cells dataset)" in other.output
