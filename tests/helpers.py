"""Plain helpers the tests share (fixtures live in conftest.py): small files on disk, the quick
embed and train settings, copies of shared data, and counts to compute expected values from."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch

# The shared synthetic stamps data set (conftest.stamps): 7 pages, seed 31 -> train 5 pages
# (9 objects), val 1 page (3 objects), test 1 page (2 objects); every split has objects.
STAMPS_PAGES = 7
STAMPS_SEED = 31
# The SAM 2.1 cache's data set (conftest.sam2_stamps): the first 3 of those pages, one a split.
SAM2_PAGES = 3

# Embedding settings of the shared cache: the micro model (SAM's prompt encoder and mask decoder
# classes at width 32: the pipeline's tests do not need SAM's widths, and a decoder pass costs a
# fraction of the tiny's; tests of parity with SAM's own code use `tiny_cache` and the real widths),
# fp32 (the same numbers on CPUs with and without native bf16), torch (no OpenVINO conversion for
# each set of weights a test makes: the backends' equality is tests/test_encoders.py's), no
# worker processes, and shards of 2 images so every reader meets a cache of several shards.
# Tests through the command line without these flags run the default backend.
FAST_EMBED = dict(model_type="micro", workers=0, progress=False, batch_size=2, precision="fp32", backend="torch")
SHARED_EMBED = dict(FAST_EMBED, shard_images=2)
# The same settings as `samcache embed` flags, for tests through the command line.
EMBED_FLAGS = ["--model", "micro", "--workers", "0", "--batch-size", "2", "--precision", "fp32", "--backend", "torch",
               "--shard-images", "2"]
# The tiny (SAM's widths) for the tests that compare with SAM's own code, export to ONNX or need
# SAM-sized files (a full disk).
TINY_EMBED = dict(SHARED_EMBED, model_type="tiny")
TINY_EMBED_FLAGS = ["--model", "tiny", *EMBED_FLAGS[2:]]

# One quick epoch of training.
QUICK_TRAIN = dict(epochs=1, batch_size=2, objects_per_image=2, workers=0, save_every=None)
# The shared trained run (conftest.stamps_run).
RUN_TRAIN = dict(QUICK_TRAIN, lr=1e-3)
# A key projection's bias shifts every score of a query by the same amount, which the softmax cancels:
# the stock modules give it a gradient of rounding noise, the folded cross-attentions none.
CANCELLED_BY_SOFTMAX = "k_proj.bias"


def demo_train_flags() -> list[str]:
    """`make demo`'s training flags: the Makefile's DEMO_TRAIN."""
    makefile = Path(__file__).resolve().parents[1] / "Makefile"
    return shlex.split(re.search(r"^DEMO_TRAIN := (.*)$", makefile.read_text(), re.M).group(1))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| (Frobenius norms), `got` in any precision against an fp32 `want`."""
    return float((got.float() - want).norm() / want.norm())


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


def embed(dataset_dir: Path, cache_dir: Path, **overrides):
    """`embed_dataset` of the COCO data set in `dataset_dir` with FAST_EMBED (plus `overrides`)."""
    from samcache.config import EmbedConfig
    from samcache.data.datasets import load_dataset
    from samcache.embed.pipeline import embed_dataset

    return embed_dataset(load_dataset(dataset_dir), cache_dir, EmbedConfig(**{**FAST_EMBED, **overrides}))


def follow(cache_dir: Path, dataset_dir: Path) -> None:
    """Makes the cache follow `dataset_dir`, as when a user moves a data set and its cache together."""
    from samcache.cache.format import DATASET_NAME

    followed = json.loads((cache_dir / DATASET_NAME).read_text())
    (cache_dir / DATASET_NAME).write_text(json.dumps({**followed, "path": str(dataset_dir.resolve())}))


def micro_weights(folder: Path, seed: int) -> Path:
    """A weights file of the micro model with the random weights of `seed` (another encoder than seed 0's)."""
    import torch

    from samcache.models.weights import build_seeded

    path = folder / f"micro_seed{seed}.pth"
    torch.save(build_seeded("micro", seed).state_dict(), path)
    return path


def train_run(cache_dir: Path, run_dir: Path, **overrides):
    """`train` of `cache_dir` into `run_dir` with QUICK_TRAIN (plus `overrides`), quietly."""
    from samcache.config import TrainConfig
    from samcache.train.trainer import train

    return train(cache_dir, run_dir, TrainConfig(**{**QUICK_TRAIN, **overrides}), progress=False)


def train_process(cache_dir: Path, run_dir: Path, args: list[str], *,
                  crash_at: str | None = None) -> subprocess.CompletedProcess:
    """`python -m samcache train CACHE --out RUN ARGS` in a subprocess; `crash_at` kills it there
    (SAMCACHE_CRASH_AT, cache.crash_point)."""
    env = dict(os.environ)
    env.pop("SAMCACHE_CRASH_AT", None)
    if crash_at:
        env["SAMCACHE_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "samcache", "train", str(cache_dir), "--out", str(run_dir), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def copy_tree(src: Path, dst: Path) -> Path:
    """A full copy of `src` at `dst` (file times kept, so a cache still sees copied images as unchanged)."""
    shutil.copytree(src, dst)
    return dst


def split_counts(dataset_dir: Path) -> dict[str, dict[str, int]]:
    """{split: {"images", "objects"}} read from the COCO SPLIT.json files of a data set."""
    counts = {}
    for path in sorted(p for p in Path(dataset_dir).glob("*.json") if not p.name.startswith(".")):
        doc = json.loads(path.read_text())
        counts[path.stem] = {"images": len(doc["images"]), "objects": len(doc["annotations"])}
    return counts


def tree_fingerprint(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path) and the SHA-256 of its bytes."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@contextmanager
def left_unchanged(root: Path, what: str):
    """Fails when the files under `root` differ on exit: shared fixtures are read-only."""
    before = tree_fingerprint(root)
    yield
    after = tree_fingerprint(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test modified the shared {what} at {root} (copy it first): {changed[:10]}"


def assert_same_last_checkpoint(expected_run: Path, got_run: Path):
    """The two runs' last.pt hold bit-identical weights and the same validation history; returns got's."""
    from samcache.train.runs import RunCheckpoint

    expected = RunCheckpoint.read(expected_run / "last.pt")
    got = RunCheckpoint.read(got_run / "last.pt")
    for key, tensor in expected.state_dict.items():
        assert torch.equal(got.state_dict[key], tensor), key
    assert got.state.history == expected.state.history
    return got


def small_vit(seed: int = 0, *, img_size: int = 128):
    """segment_anything's ViT at toy width: 8 x 8 tokens (img_size 128), windows of 3 (padded to 9 x 9)
    in blocks 0 and 2, global attention in block 1; every parameter moved off its initial value (SAM's
    relative positions start at zero, which would hide them)."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    torch.manual_seed(seed)
    vit = ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=32, depth=3, num_heads=2, out_chans=16,
                          use_rel_pos=True, window_size=3, global_attn_indexes=(1,)).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return vit
