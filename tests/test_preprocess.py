"""Preprocessing must be SamPredictor.set_image's, pixel for pixel and feature for feature."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from samcache.models.preprocess import batch_to_model_input, input_size, resize_image, transform_boxes, transform_coords
from samcache.models.weights import build_tiny


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(0)


@pytest.mark.parametrize("shape", [(300, 500), (777, 333), (1024, 1024), (50, 1500)])
def test_same_encoder_input_and_features_as_sampredictor(tiny, shape):
    image = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    predictor = SamPredictor(tiny)
    predictor.set_image(image)
    resized = resize_image(image)
    assert resized.shape[:2] == input_size(shape) == tuple(predictor.input_size)
    model_input = batch_to_model_input([torch.from_numpy(resized)])
    expected_input = tiny.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())
    assert torch.equal(model_input, expected_input)
    with torch.inference_mode():
        features = tiny.image_encoder(model_input)
    assert torch.allclose(features, predictor.features, atol=1e-5)


@pytest.mark.parametrize("shape", [(300, 500), (777, 333), (1023, 1), (1, 999), (2048, 1365), (1365, 2048),
                                   (513, 1025)])
def test_resize_equals_resize_longest_side_pixel_for_pixel(shape):
    from segment_anything.utils.transforms import ResizeLongestSide

    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    reference = ResizeLongestSide(1024)
    assert input_size(shape) == reference.get_preprocess_shape(*shape, 1024)
    np.testing.assert_array_equal(resize_image(image), reference.apply_image(image))
    points = np.array([[0.0, 0.0], [shape[1] - 0.5, shape[0] / 3]])
    np.testing.assert_array_equal(transform_coords(points, shape), reference.apply_coords(points, shape))
    boxes = np.array([[1.0, 2.0, shape[1], shape[0]]])
    np.testing.assert_array_equal(transform_boxes(boxes, shape), reference.apply_boxes(boxes, shape))


def test_batch_of_mixed_sizes_equals_one_by_one(tiny):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(200, 300), (400, 100)]]
    resized = [torch.from_numpy(resize_image(im)) for im in images]
    batch = batch_to_model_input(resized)
    for i, r in enumerate(resized):
        assert torch.equal(batch[i : i + 1], batch_to_model_input([r]))
    assert batch[0, :, 683:, :].abs().sum() == 0  # bottom padding of a 683x1024 input stays zero


def test_box_and_point_transforms_match_predictor(tiny):
    predictor = SamPredictor(tiny)
    original = (480, 640)
    boxes = np.array([[10.0, 20.0, 300.0, 400.0], [0, 0, 640, 480]])
    points = np.array([[5.0, 7.0], [639.0, 479.0]])
    np.testing.assert_allclose(transform_boxes(boxes, original), predictor.transform.apply_boxes(boxes, original))
    np.testing.assert_allclose(transform_coords(points, original), predictor.transform.apply_coords(points, original))
    np.testing.assert_allclose(transform_boxes(boxes, original)[1], [0, 0, 1024, 768])


def test_resize_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="RGB uint8"):
        resize_image(np.zeros((10, 10), np.uint8))
