"""The click protocol (clicks.py): its error-region clicks, the mask prompt fed back, and `eval --clicks`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from samcache.models.decoder import DecoderOutput, SamPromptDecoder, decode
from samcache.models.families import family_of
from samcache.models.prompts import PromptBatch
from samcache.models.weights import build_tiny
from samcache.train.click_protocol import click_ious, largest_error_region, next_click, noc
from tests.helpers import rect_mask


def test_the_next_click_is_inside_the_largest_error_region_with_its_sign():
    truth = rect_mask(100, 100, 10, 10, 60, 60)  # x0, y0, x1, y1
    missed = rect_mask(100, 100, 10, 10, 60, 40)  # the bottom 20 rows of the object missed
    (x, y), label = next_click(missed, truth)
    assert label == 1 and truth[int(y), int(x)] and not missed[int(y), int(x)]
    bleeding = truth | rect_mask(100, 100, 60, 10, 95, 60)  # 35 false columns, more than any miss
    (x, y), label = next_click(bleeding & ~rect_mask(100, 100, 10, 10, 15, 60), truth)
    assert label == 0 and not truth[int(y), int(x)] and bleeding[int(y), int(x)]
    assert next_click(truth.copy(), truth) is None
    region, label = largest_error_region(missed, truth)
    np.testing.assert_array_equal(region, truth & ~missed)


def test_noc_counts_clicks_to_the_threshold_and_caps_at_n():
    ious = np.array([[0.5, 0.86, 0.95], [0.91, 0.92, 0.93], [0.2, 0.3, 0.4]])
    assert noc(ious, 0.85) == pytest.approx((2 + 1 + 3) / 3)
    assert noc(ious, 0.90) == pytest.approx((3 + 1 + 3) / 3)


def test_the_protocol_on_a_hand_built_decoder():
    """A fake decoder that predicts a 200-px square around each positive click, on a 1024x1024 image
    (input frame = original, low-res = /4): click 1, its IoU and click 2 follow by hand."""
    seen, returned = [], []

    class SquareDecoder(SamPromptDecoder):  # SAM's upscaling, a hand-made forward
        def forward(self, embeddings, prompts):
            seen.append(prompts)
            logits = torch.full((len(prompts), 4, 256, 256), -10.0)
            for n in range(len(prompts)):
                for (x, y), label in zip(prompts.points[n].tolist(), prompts.labels[n].tolist()):
                    if label == 1:
                        x, y = int(x / 4), int(y / 4)
                        logits[n, :, max(0, y - 25) : y + 25, max(0, x - 25) : x + 25] = 10.0
            returned.append(logits)
            return DecoderOutput(logits, torch.zeros(len(prompts), 4))

    truth = rect_mask(1024, 1024, 100, 100, 400, 200)  # 300 x 100
    decoder = SquareDecoder(None, None, family=family_of("tiny"), model_type="tiny")
    ious = click_ious(decoder, torch.zeros(1, 256, 64, 64), [truth], (1024, 1024), 2)
    first = seen[0]
    x, y = first.points[0, 0].tolist()
    assert first.labels[0].tolist() == [1] and first.masks is None and bool(first.multimask[0])
    assert 100 < x < 400 and 100 < y < 200
    cx, cy = int(x // 4) * 4, int(y // 4) * 4
    pred = rect_mask(1024, 1024, cx - 100, cy - 100, cx + 100, cy + 100)
    assert ious[0, 0] == pytest.approx((pred & truth).sum() / (pred | truth).sum(), abs=0.01)  # ~20000 / 50000
    second = seen[1]
    assert second.labels[0].tolist() == [1, 0]  # the false strips above and below (200 x 50) beat the misses (50 x 100)
    x2, y2 = second.points[0, 1].tolist()
    assert not truth[int(y2), int(x2)] and pred[int(y2), int(x2)]
    # The mask prompt is click 1's chosen low-res logits (a single point: the best-scored of outputs 1-3).
    torch.testing.assert_close(second.masks[0], returned[0][0, 1])
    assert not bool(second.multimask[0])


def test_a_fed_back_mask_decodes_as_sam_predictors_mask_input():
    sam = build_tiny(0)
    torch.manual_seed(2)
    embedding = torch.randn(1, 256, 64, 64)
    previous = torch.randn(2, 256, 256) * 4
    prompts = PromptBatch(batch_row=torch.zeros(2, dtype=torch.long), boxes=torch.tensor([[100., 100, 600, 500]] * 2),
                          points=torch.tensor([[[300., 300], [0, 0]], [[200., 250], [500, 400]]]),
                          labels=torch.tensor([[1, -1], [1, 0]]), is_box=torch.tensor([False, True]), masks=previous)
    predictor = SamPredictor(sam)
    predictor.features, predictor.is_image_set = embedding, True
    predictor.original_size = predictor.input_size = (1024, 1024)
    with torch.no_grad():
        ours = decode(sam.prompt_encoder, sam.mask_decoder, embedding, prompts)
        for i, k in enumerate([1, 2]):
            _, iou, low_res = predictor.predict_torch(
                point_coords=prompts.points[i : i + 1, :k], point_labels=prompts.labels[i : i + 1, :k],
                boxes=prompts.boxes[i : i + 1] if prompts.is_box[i] else None,
                mask_input=previous[i : i + 1, None], multimask_output=False)
            torch.testing.assert_close(ours.logits[i, :1], low_res[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours.iou_pred[i, :1], iou[0], rtol=1e-4, atol=1e-4)
    assert not prompts.multimask.any()  # with a mask prompt even a single point is unambiguous
