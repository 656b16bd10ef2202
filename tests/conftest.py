"""Shared fixtures: random-weight vit_b and SAM 2.1 Hiera-T checkpoints, a small COCO data set, and
the shared synthetic stamps data set, its caches (tiny; Hiera-T) and runs trained on them.

The session-scoped stamps fixtures are built once and are read-only: a test that edits a data
set or a cache, adds or deletes files, or kills a writer takes a copy (stamps_copy,
stamps_cache_copy, stamps_run_copy), and each shared folder is checked unchanged at the end.
Plain helper functions live in tests/helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from samcache.data import masks
from tests.helpers import (
    RUN_TRAIN,
    SAM2_PAGES,
    SHARED_EMBED,
    STAMPS_PAGES,
    STAMPS_SEED,
    TINY_EMBED,
    copy_tree,
    embed,
    follow,
    left_unchanged,
    make_coco,
    rect_mask,
    train_run,
    write_image,
)


@pytest.fixture(scope="session")
def _session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("samcache_home_session")


@pytest.fixture(scope="session", autouse=True)
def _isolated_home_for_session(_session_home):
    """Session fixtures (built before any test's own home is set) do not touch the real weights folder either."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAMCACHE_HOME", str(_session_home))
        yield


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch, _session_home):
    """No test reads or writes the user's real weights folder. The encoders converted to OpenVINO
    are shared by all tests (one conversion of tiny per session, not one per test); a test that
    converts afresh sets its own SAMCACHE_HOME."""
    home = tmp_path_factory.mktemp("samcache_home")
    (_session_home / "openvino").mkdir(exist_ok=True)
    (home / "openvino").symlink_to(_session_home / "openvino", target_is_directory=True)
    monkeypatch.setenv("SAMCACHE_HOME", str(home))


@pytest.fixture(scope="session")
def vit_b_checkpoint(tmp_path_factory) -> Path:
    """A random-weight vit_b state dict saved like Meta's file: a plain dict of tensors, official keys."""
    from samcache.models.weights import build_sam

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "sam_vit_b_random.pth"
    torch.save(build_sam("vit_b").state_dict(), path)
    return path


@pytest.fixture(scope="session")
def hiera_t_checkpoint(tmp_path_factory) -> Path:
    """A random-weight SAM 2.1 Hiera-T saved as Meta's sam2.1_hiera_tiny.pt is: {"model": state dict}."""
    from samcache.models.weights import build_sam

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "sam2.1_hiera_tiny_random.pt"
    torch.save({"model": build_sam("sam2.1_hiera_t").model.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def sam2_stamps(tmp_path_factory) -> Path:
    """The first SAM2_PAGES pages of `stamps`, one a split: a Hiera-T embeds a page in seconds on one
    thread, where the micro model takes a fraction of a second."""
    out = _shared_stamps(tmp_path_factory, "sam2_stamps", SAM2_PAGES, fractions=(1 / 3, 1 / 3, 1 / 3))
    with left_unchanged(out, "SAM 2.1 stamps data set"):
        yield out


@pytest.fixture(scope="session")
def sam2_cache(sam2_stamps, hiera_t_checkpoint, tmp_path_factory) -> Path:
    """`sam2_stamps` embedded by the random Hiera-T, fp32 (stored fp16), shards of 2 images."""
    out = tmp_path_factory.mktemp("shared") / "sam2_cache"
    embed(sam2_stamps, out, **{**SHARED_EMBED, "model_type": "sam2.1_hiera_t", "checkpoint": hiera_t_checkpoint})
    with left_unchanged(out, "SAM 2.1 stamps cache"):
        yield out


@pytest.fixture(scope="session")
def sam2_run(sam2_cache, tmp_path_factory) -> Path:
    """A run trained one epoch on `sam2_cache` (helpers.RUN_TRAIN)."""
    out = tmp_path_factory.mktemp("shared") / "sam2_run"
    train_run(sam2_cache, out, **RUN_TRAIN)
    with left_unchanged(out, "SAM 2.1 stamps run"):
        yield out


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


# ----------------------------------------------------------------- the shared stamps data (read-only)
@pytest.fixture(scope="session")
def stamps(tmp_path_factory) -> Path:
    """The synthetic stamps data set: STAMPS_PAGES pages (seed STAMPS_SEED), COCO train/val/test."""
    out = _shared_stamps(tmp_path_factory, "stamps", STAMPS_PAGES)
    with left_unchanged(out, "stamps data set"):
        yield out


def _shared_stamps(tmp_path_factory, name: str, pages: int, **options) -> Path:
    """`pages` stamps pages of seed STAMPS_SEED in a new shared folder `name`; every split has objects."""
    from samcache.data.stamps import generate_stamps

    out = tmp_path_factory.mktemp("shared") / name
    summary = generate_stamps(out, pages, seed=STAMPS_SEED, progress=False, **options)
    assert all(split["objects"] > 0 for split in summary["splits"].values()), summary["splits"]
    return out


@pytest.fixture(scope="session")
def stamps_cache(stamps, tmp_path_factory) -> Path:
    """`stamps` embedded by the micro model: fp32, shards of 2 images (helpers.SHARED_EMBED)."""
    out = tmp_path_factory.mktemp("shared") / "cache"
    embed(stamps, out, **SHARED_EMBED)
    with left_unchanged(out, "stamps cache"):
        yield out


@pytest.fixture(scope="session")
def tiny_cache(stamps, tmp_path_factory) -> Path:
    """`stamps` embedded by the tiny model (SAM's widths), for tests against SAM's own code and ONNX."""
    out = tmp_path_factory.mktemp("shared") / "tiny_cache"
    embed(stamps, out, **TINY_EMBED)
    with left_unchanged(out, "tiny stamps cache"):
        yield out


@pytest.fixture(scope="session")
def tiny_run(tiny_cache, tmp_path_factory) -> Path:
    """A run trained one epoch on `tiny_cache` (helpers.RUN_TRAIN)."""
    out = tmp_path_factory.mktemp("shared") / "tiny_run"
    train_run(tiny_cache, out, **RUN_TRAIN)
    with left_unchanged(out, "tiny stamps run"):
        yield out


@pytest.fixture(scope="session")
def stamps_run(stamps_cache, tmp_path_factory) -> Path:
    """A run trained one epoch on `stamps_cache` (helpers.RUN_TRAIN): best.pt, last.pt, run.json..."""
    out = tmp_path_factory.mktemp("shared") / "run"
    train_run(stamps_cache, out, **RUN_TRAIN)
    with left_unchanged(out, "stamps run"):
        yield out


@pytest.fixture(scope="session")
def vit_b_run(vit_b_checkpoint, tmp_path_factory) -> Path:
    """2 stamps pages (train and val) embedded by the random vit_b (torch, fp32) and a run trained one
    epoch on them: ROOT/ds, ROOT/cache, ROOT/run. vit_b embeds cost seconds a page on a CPU, so the
    tests of real-checkpoint compatibility share it."""
    from samcache.config import EmbedConfig, TrainConfig
    from samcache.data.datasets import load_dataset
    from samcache.data.stamps import generate_stamps
    from samcache.embed.pipeline import embed_dataset
    from samcache.train.trainer import train

    root = tmp_path_factory.mktemp("vit_b")
    generate_stamps(root / "ds", 2, seed=2, progress=False, fractions=(0.5, 0.5, 0.0))
    # torch: converting vit_b to OpenVINO takes minutes (the backends' equality is tested on tiny)
    config = EmbedConfig(model_type="vit_b", checkpoint=vit_b_checkpoint, workers=0, progress=False, batch_size=1,
                         precision="fp32", backend="torch")
    embed_dataset(load_dataset(root / "ds"), root / "cache", config)
    train(root / "cache", root / "run", TrainConfig(**RUN_TRAIN, checkpoint=str(vit_b_checkpoint)), progress=False)
    with left_unchanged(root, "vit_b run"):
        yield root


# ------------------------------------------------------------- private copies, for tests that write
@pytest.fixture
def stamps_copy(stamps, tmp_path) -> Path:
    """This test's own copy of the stamps data set (file times kept)."""
    return copy_tree(stamps, tmp_path / "stamps_copy")


@pytest.fixture
def stamps_cache_copy(stamps_cache, tmp_path, request) -> Path:
    """This test's own copy of the stamps cache; with `stamps_copy` in the same test, the pair was
    copied together: the cache follows the copied data set."""
    copy = copy_tree(stamps_cache, tmp_path / "cache_copy")
    if "stamps_copy" in request.fixturenames:
        follow(copy, request.getfixturevalue("stamps_copy"))
    return copy


@pytest.fixture
def stamps_run_copy(stamps_run, tmp_path) -> Path:
    """This test's own copy of the trained run."""
    return copy_tree(stamps_run, tmp_path / "run_copy")
