"""Shared fixtures: tiny models, random-weight vit_b checkpoints, small datasets written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from samcache import masks


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's real weights folder."""
    monkeypatch.setenv("SAMCACHE_HOME", str(tmp_path_factory.mktemp("samcache_home")))


@pytest.fixture(scope="session")
def vit_b_checkpoint(tmp_path_factory) -> Path:
    """A random-weight vit_b state dict saved like Meta's file: a plain dict of tensors, official keys."""
    from samcache.models import build_sam

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "sam_vit_b_random.pth"
    torch.save(build_sam("vit_b").state_dict(), path)
    return path


def write_image(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random RGB PNG (lossless, so tests can compare pixels) and the array written."""
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rgb[..., ::-1])
    return rgb


def rect_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def make_coco(root: Path, images: list[dict], annotations: list[dict], name: str = "train.json",
              categories=({"id": 1, "name": "stamp"}, {"id": 2, "name": "seal"})) -> Path:
    """Writes a COCO JSON under `root` (images are expected in root/images)."""
    path = root / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return path


@pytest.fixture
def coco_dir(tmp_path) -> Path:
    """A valid 3-split COCO dataset: polygons, compressed and uncompressed RLE, a crowd region."""
    h, w = 60, 80
    for i in range(4):
        write_image(tmp_path / "images" / f"im{i}.png", h, w, seed=i)
    rle = masks.encode(rect_mask(h, w, 10, 10, 30, 40))
    uncompressed = {"size": [h, w], "counts": [h * 5, h * 3, h * (w - 8)]}  # columns 5..7 (column-major runs)
    train_images = [{"id": i, "file_name": f"im{i}.png", "width": w, "height": h} for i in (0, 1)]
    train_anns = [
        {"id": 1, "image_id": 0, "category_id": 1, "bbox": [10, 10, 20, 30], "iscrowd": 0, "segmentation": rle},
        {"id": 2, "image_id": 0, "category_id": 2, "bbox": [5, 0, 3, 60], "iscrowd": 0, "segmentation": uncompressed},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [40, 20, 20, 20], "iscrowd": 0,
         "segmentation": [[40, 20, 60, 20, 60, 40, 40, 40]]},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1,
         "segmentation": masks.encode(rect_mask(h, w, 0, 0, 5, 5))},
    ]
    make_coco(tmp_path, train_images, train_anns, "train.json")
    make_coco(tmp_path, [{"id": 2, "file_name": "im2.png", "width": w, "height": h}],
              [{"id": 5, "image_id": 2, "category_id": 2, "bbox": [10, 10, 20, 30], "segmentation": rle}], "val.json")
    make_coco(tmp_path, [{"id": 3, "file_name": "im3.png", "width": w, "height": h}],
              [{"id": 6, "image_id": 3, "category_id": 1, "bbox": [10, 10, 20, 30], "segmentation": rle}], "test.json")
    return tmp_path
