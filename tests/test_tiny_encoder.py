"""The convolutional image encoder for the next tiny: SAM's input and output, in SAM's own predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from samcache.models.tiny_encoder import ConvImageEncoder
from samcache.models.weights import build_tiny


def test_it_maps_sams_input_to_sams_embedding_and_sees_far():
    torch.manual_seed(0)
    encoder = ConvImageEncoder().eval()
    x = torch.randn(1, 3, 1024, 1024, requires_grad=True)
    y = encoder(x)
    assert y.shape == (1, 256, 64, 64) and encoder.img_size == 1024
    # LayerNorm2d at the end: every position's channels have mean 0 and variance 1 (weight 1, bias 0).
    torch.testing.assert_close(y.mean(1), torch.zeros(1, 64, 64), atol=1e-4, rtol=0)
    # A far corner of the embedding sees the centre of the image: the receptive field spans objects.
    y[0, 0, 0, 0].backward()  # one channel: the channels' sum is constant after LayerNorm
    assert x.grad[0, :, 400:600, 400:600].abs().sum() > 0


def test_sams_predictor_runs_on_it():
    sam = build_tiny(0)
    torch.manual_seed(0)
    sam.image_encoder = ConvImageEncoder()
    predictor = SamPredictor(sam.eval())
    image = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    predictor.set_image(image)
    masks, scores, low_res = predictor.predict(box=np.array([50, 60, 200, 250]), multimask_output=False)
    assert masks.shape == (1, 300, 500) and low_res.shape == (1, 256, 256) and scores.shape == (1,)


def test_each_stride_16_block_needs_a_dilation():
    with pytest.raises(ValueError, match="need a dilation for each of the 6"):
        ConvImageEncoder(dilations=(1, 2))
