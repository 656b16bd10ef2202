"""SAM 2.1 models: weights load safely and strictly, and the batched preprocessing and features equal
what SAM2ImagePredictor.set_image computes, for a random Hiera-T saved in Meta's checkpoint layout (no
download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samcache.data.images import read_image
from samcache.errors import CheckpointError
from samcache.models.sam2 import Sam2AsSam, image_features, preprocess
from samcache.models.specs import OFFICIAL_WEIGHTS, SAM2_FEATURE_SHAPES, SAM2_MODEL_TYPES
from samcache.models.weights import load_sam


@pytest.mark.slow
def test_preprocessing_and_features_equal_sam2_image_predictor(stamps, hiera_t_checkpoint):
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    from sam2.utils.transforms import SAM2Transforms

    loaded = load_sam("sam2.1_hiera_t", hiera_t_checkpoint)
    assert isinstance(loaded.sam, Sam2AsSam)
    images = [read_image(p) for p in sorted((stamps / "images").glob("*.jpg"))[:2]]
    assert images[0].shape != images[1].shape  # two sizes, one batch
    batch = preprocess(images)
    stock = SAM2Transforms(resolution=1024, mask_threshold=0.0)
    for row, image in zip(batch, images):
        torch.testing.assert_close(row, stock(image), atol=1e-5, rtol=0)
    ours = image_features(loaded.sam.model, batch)
    predictor = SAM2ImagePredictor(loaded.sam.model)
    for k, image in enumerate(images):
        predictor.set_image(image)
        theirs = {"image_embed": predictor._features["image_embed"],
                  "high_res_s0": predictor._features["high_res_feats"][0],
                  "high_res_s1": predictor._features["high_res_feats"][1]}
        for name, shape in SAM2_FEATURE_SHAPES.items():
            assert ours[name][k].shape == shape
            torch.testing.assert_close(ours[name][k : k + 1], theirs[name], atol=1e-4, rtol=1e-4)


def test_weights_load_strictly_and_safely(hiera_t_checkpoint, tmp_path):
    loaded = load_sam("sam2.1_hiera_t", hiera_t_checkpoint)
    saved = torch.load(hiera_t_checkpoint, weights_only=True)["model"]
    for key, value in loaded.sam.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert len(loaded.weights_sha256) == 64
    with pytest.raises(CheckpointError, match="does not fit the sam2.1_hiera_s model; it looks like a sam2.1_hiera_t"):
        load_sam("sam2.1_hiera_s", hiera_t_checkpoint)

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, evil)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_sam("sam2.1_hiera_t", evil)
    with pytest.raises(CheckpointError, match="unknown model type"):
        load_sam("sam2.1_hiera_xl")
    assert np.isfinite(preprocess([np.zeros((5, 7, 3), np.uint8)]).numpy()).all()


def test_official_sam2_weights_are_pinned():
    for model_type in SAM2_MODEL_TYPES:
        official = OFFICIAL_WEIGHTS[model_type]
        assert official.url.startswith("https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_")
        assert len(official.sha256) == 64 and official.size_bytes > 100_000_000
