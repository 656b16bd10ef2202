"""Training: batched decoder, prompts, losses, schedule, config, checkpoints, resume, failures."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from segment_anything import SamPredictor

from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from samcache.config import EmbedConfig, PromptSettings, TrainConfig, parse
from samcache.data import masks
from samcache.data.datasets import load_dataset
from samcache.data.stamps import generate_stamps
from samcache.embed.pipeline import embed_dataset
from samcache.errors import ConfigError, RunError, TrainingError
from samcache.models.decoder import compute_loss, decode, mask_iou, upscale_logits
from samcache.models.families import family_of
from samcache.models.prompts import (
    PromptBatch,
    evaluation_prompt,
    interior_point,
    jitter_box,
    low_res_target,
    rng_for,
    sample_points,
    training_prompt,
)
from samcache.models.weights import build_seeded, build_tiny, load_sam
from samcache.train.runs import RunCheckpoint
from samcache.train.trainer import learning_rate, train
from tests.helpers import QUICK_TRAIN, assert_same_last_checkpoint, make_coco, rect_mask, train_process, write_image

QUICK = dict(QUICK_TRAIN, warmup_steps=1)
# `stamps_cache` is the shared session cache of conftest.py: training only reads it.


# ------------------------------------------------------------------------------ batched decoder
@pytest.mark.parametrize("model_type", ["tiny", "micro"])
def test_batched_decoder_equals_sam_predictor_per_prompt(model_type):
    """Boxes, boxes with points, one point, several points, on three images in one call: each prompt's
    four masks equal SamPredictor's for the same prompt, given only its real points. The micro model
    (SAM's classes at width 32) decodes by the same code as SAM's widths."""
    sam = build_seeded(model_type, 0)
    torch.manual_seed(0)
    embeddings = torch.randn(3, sam.prompt_encoder.embed_dim, 64, 64)
    n = 8
    labels = torch.full((n, 8), -1)
    real_points = [0, 3, 1, 1, 0, 2, 0, 3]  # per prompt; padding after
    for i, k in enumerate(real_points):
        labels[i, :k] = torch.tensor([1, 0, 1][:k])
    prompts = PromptBatch(
        batch_row=torch.tensor([0, 0, 1, 2, 2, 1, 0, 1]),
        boxes=torch.rand(n, 4).sort(dim=1).values[:, [0, 1, 2, 3]] * torch.tensor([500, 500, 1000, 1000]),
        points=torch.rand(n, 8, 2) * 1000,
        labels=labels,
        is_box=torch.tensor([True, False, True, False, True, True, True, False]),
    )
    predictor = SamPredictor(sam)
    with torch.no_grad():
        batched = decode(sam.prompt_encoder, sam.mask_decoder, embeddings, prompts)
        for i, k in enumerate(real_points):
            j = int(prompts.batch_row[i])
            predictor.features, predictor.is_image_set = embeddings[j : j + 1], True
            predictor.original_size = predictor.input_size = (1024, 1024)  # prompts are in the input frame
            for multimask, outputs in ((False, slice(0, 1)), (True, slice(1, 4))):
                _, iou, low_res = predictor.predict_torch(
                    point_coords=prompts.points[i : i + 1, :k] if k else None,
                    point_labels=prompts.labels[i : i + 1, :k] if k else None,
                    boxes=prompts.boxes[i : i + 1] if prompts.is_box[i] else None, multimask_output=multimask)
                torch.testing.assert_close(batched.logits[i, outputs], low_res[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(batched.iou_pred[i, outputs], iou[0], rtol=1e-4, atol=1e-4)
    assert prompts.multimask.tolist() == [False, False, False, True, False, False, False, False]
    assert set(sam.state_dict()) == set(build_seeded(model_type, 0).state_dict())  # no new parameters


def test_sharing_the_first_blocks_image_work_changes_neither_outputs_nor_gradients():
    from samcache.models.decoder import predict_masks_batched

    sam = build_tiny(0)
    torch.manual_seed(1)
    embeddings, batch_row = torch.randn(2, 256, 64, 64), torch.tensor([0, 1, 1, 0, 1])
    sparse, dense = sam.prompt_encoder(points=None, boxes=torch.rand(5, 4) * 500 + torch.tensor([0, 0, 500, 500]),
                                       masks=None)
    results = []
    for shared in (False, True):
        sam.zero_grad()
        out = predict_masks_batched(sam.mask_decoder, embeddings, batch_row, sam.prompt_encoder.get_dense_pe(),
                                    sparse.detach(), dense.detach(), shared_dense=shared)
        (out.logits.square().mean() + out.iou_pred.sum()).backward()
        results.append((out.logits.detach(), [p.grad for p in sam.mask_decoder.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        assert (a is None) == (b is None)  # the keys' biases, which the softmax cancels, get none in both
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("model_type,masks", [("tiny", 4), ("tiny", 1), ("micro", 4)])
def test_mask_logits_on_tokens_equal_the_stock_upscaling_outputs_and_gradients(model_type, masks):
    """The upscaling as matrix products on channels-last tokens (upscaling.mask_logits) against the stock
    `output_upscaling` modules and the hypernetwork product: the same logits and the same gradients for
    every upscaling parameter and for the tokens, with a layer norm and biases that are not the identity;
    with four mask tokens and with one (training's box prompts)."""
    from samcache.models.upscaling import mask_logits

    sam = build_seeded(model_type, 0)
    upscaling = sam.mask_decoder.output_upscaling
    torch.manual_seed(2)
    with torch.no_grad():
        for p in upscaling.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    c = sam.prompt_encoder.embed_dim
    src = torch.randn(3, 64 * 64, c, requires_grad=True)
    hyper_in = torch.randn(3, masks, upscaling[3].out_channels, requires_grad=True)
    target = torch.randn(3, masks, 256, 256)
    results = []
    for fused in (False, True):
        for p in (*upscaling.parameters(), src, hyper_in):
            p.grad = None
        if fused:
            logits = mask_logits(upscaling, src, hyper_in, 64, 64)
        else:
            upscaled = upscaling(src.transpose(1, 2).reshape(3, c, 64, 64))
            logits = (hyper_in @ upscaled.flatten(2)).reshape(3, masks, 256, 256)
        (logits * target).mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in (*upscaling.parameters(), src, hyper_in)]))
    assert results[0][0].shape == (3, masks, 256, 256)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for fused_grad, stock_grad in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(fused_grad, stock_grad, rtol=1e-3, atol=1e-6)


def test_mask_logits_runs_an_upscaling_of_another_shape_as_its_modules():
    from samcache.models.upscaling import mask_logits

    torch.manual_seed(0)
    upscaling = torch.nn.Sequential(torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(8, 4, 1))
    src, hyper_in = torch.randn(2, 16, 8), torch.randn(2, 3, 4)
    expected = (hyper_in @ upscaling(src.transpose(1, 2).reshape(2, 8, 4, 4)).flatten(2)).reshape(2, 3, 16, 16)
    torch.testing.assert_close(mask_logits(upscaling, src, hyper_in, 4, 4), expected)


def test_decoding_only_the_used_output_gives_its_logits_loss_and_gradients():
    """outputs="used" on prompts that all take output 0 (boxes, box + points) makes that output alone:
    the same logits, loss and gradients as all four, and no gradient at all for the multimask outputs'
    hypernetworks (so AdamW leaves them as they are); a single point in the batch brings all four back."""
    sam = build_tiny(0)
    torch.manual_seed(3)
    embeddings, targets = torch.randn(2, 256, 64, 64), (torch.rand(3, 256, 256) > 0.6).float()
    corner = torch.rand(3, 2) * 500
    box_prompts = dict(batch_row=torch.tensor([0, 1, 1]), boxes=torch.cat([corner, corner + 300], 1),
                       points=torch.rand(3, 1, 2) * 1000, labels=torch.tensor([[-1], [-1], [1]]),
                       is_box=torch.ones(3, dtype=torch.bool))
    module = family_of("tiny").decoder(sam, "tiny")
    results = {}
    for outputs in ("all", "used"):
        sam.zero_grad(set_to_none=True)
        prompts = PromptBatch(**box_prompts)
        output = module(embeddings, prompts, outputs=outputs)
        loss = compute_loss(output, targets, prompts.multimask, "sam").total
        loss.backward()
        results[outputs] = (output, loss.detach(), {n: p.grad for n, p in sam.mask_decoder.named_parameters()})
    assert results["all"][0].logits.shape == (3, 4, 256, 256) and results["used"][0].logits.shape == (3, 1, 256, 256)
    torch.testing.assert_close(results["used"][0].logits, results["all"][0].logits[:, :1])
    torch.testing.assert_close(results["used"][0].iou_pred, results["all"][0].iou_pred)
    torch.testing.assert_close(results["used"][1], results["all"][1])
    unused = [n for n in results["all"][2] if n.startswith(("output_hypernetworks_mlps.1.", "output_hypernetworks_mlps.2.",
                                                              "output_hypernetworks_mlps.3."))]
    assert unused and all(results["used"][2][n] is None for n in unused)
    assert all(float(results["all"][2][n].abs().max()) == 0 for n in unused)  # all four: zeros, which AdamW decays
    for name, grad in results["all"][2].items():
        if name not in unused:
            torch.testing.assert_close(results["used"][2][name], grad, rtol=1e-4, atol=1e-7, msg=name)

    with_a_point = PromptBatch(**{**box_prompts, "is_box": torch.tensor([True, True, False])})
    assert bool(with_a_point.multimask.any())
    assert module(embeddings, with_a_point, outputs="used").logits.shape == (3, 4, 256, 256)
    with pytest.raises(ValueError, match="unknown outputs"):
        module(embeddings, with_a_point, outputs="some")


def test_upscale_matches_sam_postprocess():
    sam = build_tiny(0)
    logits = torch.randn(2, 256, 256)
    ours = upscale_logits(logits, (683, 1024), (400, 600))
    theirs = sam.postprocess_masks(logits.unsqueeze(1), (683, 1024), (400, 600))[:, 0]
    torch.testing.assert_close(ours, theirs)


# -------------------------------------------------------------------------------------- prompts
def test_box_jitter_respects_fraction_cap_and_image():
    rng = rng_for(0, 1)
    box = (100.0, 100.0, 400.0, 150.0)  # 300 x 50: x sides move <= 20 px (cap), y sides <= 5 px
    moved = np.array([jitter_box(box, (1000, 1000), rng, fraction=0.1, max_pixels=20) for _ in range(500)])
    delta = np.abs(moved - np.array(box))
    assert delta[:, [0, 2]].max() <= 20 and delta[:, [1, 3]].max() <= 5
    assert delta[:, [0, 2]].max() > 15 and delta.min() >= 0  # really moves
    edge = np.array([jitter_box((0, 0, 50, 50), (60, 60), rng, fraction=0.5, max_pixels=50) for _ in range(200)])
    assert edge.min() >= 0 and edge.max() <= 60


def test_points_are_inside_and_outside_the_mask():
    mask = rect_mask(100, 100, 20, 30, 60, 70)
    points, labels = sample_points(mask, (10, 20, 70, 80), rng_for(3, 4), positive=5, negative=5)
    cells = np.floor(points).astype(int)
    assert (labels == 1).sum() == 5 and (labels == 0).sum() == 5
    assert mask[cells[labels == 1, 1], cells[labels == 1, 0]].all()
    assert not mask[cells[labels == 0, 1], cells[labels == 0, 0]].any()
    assert (cells[:, 0] >= 10).all() and (cells[:, 0] < 70).all()


def test_prompts_are_deterministic_per_seed_and_in_the_input_frame():
    rle = masks.encode(rect_mask(500, 1000, 100, 100, 300, 400))
    settings = PromptSettings(mode="mixed", point_ratio=0.5)
    a = training_prompt(rle, (100, 100, 300, 400), (500, 1000), settings, rng_for(1, 2, 3))
    b = training_prompt(rle, (100, 100, 300, 400), (500, 1000), settings, rng_for(1, 2, 3))
    assert np.array_equal(a.box, b.box) and np.array_equal(a.points, b.points) and a.is_box == b.is_box
    fixed = evaluation_prompt(rle, (100, 100, 300, 400), (500, 1000), "box")
    np.testing.assert_allclose(fixed.box, [102.4, 102.4, 307.2, 409.6], rtol=1e-5)  # 1000 px wide -> 1024
    point = evaluation_prompt(rle, (100, 100, 300, 400), (500, 1000), "point")
    assert point.labels[0] == 1 and (point.labels[1:] == -1).all()
    np.testing.assert_allclose(interior_point(rect_mask(500, 1000, 100, 100, 300, 300))[0], [200, 200], atol=1.5)


def test_box_plus_points_prompts_carry_both_and_train_one_output():
    mask = rect_mask(500, 1000, 100, 100, 300, 400) & ~rect_mask(500, 1000, 200, 100, 300, 200)  # an L: the box
    rle = masks.encode(mask)  # keeps background for the negative point
    settings = PromptSettings(mode="box+points", positive_points=2, negative_points=1)
    prompt = training_prompt(rle, (100, 100, 300, 400), (500, 1000), settings, rng_for(0, 1, 2))
    assert prompt.is_box and prompt.labels[:3].tolist() == [1, 1, 0] and (prompt.labels[3:] == -1).all()
    x, y = prompt.points[0] * (1000 / 1024)  # back to original pixels
    assert mask[int(y), int(x)]  # a positive point inside the object
    batch = PromptBatch.from_prompts([prompt], torch.zeros(1, dtype=torch.long))
    assert not bool(batch.multimask[0])  # a box with points: the single-mask output, as SamPredictor's
    sam = build_tiny(0)
    with torch.no_grad():
        out = decode(sam.prompt_encoder, sam.mask_decoder, torch.randn(1, 256, 64, 64), batch)
        sparse, _ = sam.prompt_encoder(points=(batch.points[:, :3], batch.labels[:, :3]), boxes=batch.boxes, masks=None)
    assert sparse.shape[1] == 3 + 2  # the three points and the box's two corners, no padding
    assert torch.isfinite(out.logits).all()


def test_low_res_target_sits_where_the_decoder_predicts():
    rle = masks.encode(rect_mask(512, 1024, 0, 0, 512, 256))  # top-left quarter of a 2:1 image
    target = low_res_target(rle, (512, 1024))
    assert target.shape == (256, 256)
    assert target[:64, :128].min() == 1.0 and target[64:, :].max() == 0.0 and target[:, 128:].max() == 0.0


@pytest.mark.parametrize("size,cells", [((1114, 934), (256, 215)), ((600, 800), (150, 200)), ((97, 131), (40, 57)),
                                        ((300, 200), (256, 171)), ((100, 120), (256, 215))])
def test_mask_coverage_is_cv2s_area_resize_of_the_mask(size, cells):
    """masks.coverage works on the mask's box alone; the whole-image INTER_AREA resize it replaces
    gives the same map (non-integer and integer scales, masks at the edges, empty and full masks)."""
    rng = np.random.default_rng(sum(size))
    h, w = size
    cases = [np.zeros(size, bool), np.ones(size, bool)]
    for _ in range(6):
        y0, x0 = rng.integers(0, h - 1), rng.integers(0, w - 1)
        y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
        mask = np.zeros(size, bool)
        mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.7
        cases.append(mask)
    for mask in cases:
        expected = cv2.resize(mask.astype(np.float32), cells[::-1], interpolation=cv2.INTER_AREA)
        got = masks.coverage(masks.encode(mask), cells)
        assert got.shape == cells and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=2e-6)


# --------------------------------------------------------------------------------------- losses
def test_sam_loss_rewards_the_right_mask_and_iou_head():
    from samcache.models.decoder import DecoderOutput

    target = torch.zeros(1, 256, 256)
    target[0, 50:150, 50:150] = 1
    good = (target * 20 - 10).unsqueeze(1).repeat(1, 4, 1, 1)
    bad = -good
    single = torch.tensor([False])  # not multimask: a box prompt's single-mask output
    right_iou = DecoderOutput(good, torch.ones(1, 4))
    wrong_iou = DecoderOutput(good, torch.zeros(1, 4))
    assert compute_loss(right_iou, target, single).total < 0.05
    assert compute_loss(DecoderOutput(bad, torch.zeros(1, 4)), target, single).total > 10
    assert compute_loss(wrong_iou, target, single).iou == pytest.approx(1.0)
    assert mask_iou(good[:, 0], target).item() == 1.0


def test_a_single_point_trains_the_best_multimask_output():
    from samcache.models.decoder import DecoderOutput

    target = torch.zeros(1, 256, 256)
    target[0, :100, :100] = 1
    logits = torch.full((1, 4, 256, 256), -10.0)
    logits[0, 2] = target[0] * 20 - 10  # only mask 2 is right
    loss = compute_loss(DecoderOutput(logits, torch.ones(1, 4)), target, torch.tensor([True]))
    assert loss.train_iou.item() == 1.0 and loss.mask.item() < 0.05


def test_tutorial_loss_has_no_useful_gradient():
    from samcache.models.decoder import DecoderOutput

    logits = torch.randn(2, 4, 256, 256, requires_grad=True)
    target = (torch.rand(2, 256, 256) > 0.5).float()
    compute_loss(DecoderOutput(logits, torch.zeros(2, 4)), target, torch.tensor([False, False]),
                 "mse-threshold").total.backward()
    assert logits.grad.abs().max() < 1e-3
    sam_logits = logits.detach().clone().requires_grad_(True)
    compute_loss(DecoderOutput(sam_logits, torch.zeros(2, 4)), target, torch.tensor([False, False]), "sam").total.backward()
    assert sam_logits.grad.abs().max() > 1e-6


def test_learning_rate_warms_up_then_decays_to_zero():
    config = TrainConfig(lr=1e-3, warmup_steps=10)
    lrs = [learning_rate(s, 100, config) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[100] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- runs and outputs
def test_run_writes_checkpoints_logs_and_curves(stamps_cache, tmp_path):
    result = train(stamps_cache, tmp_path / "run", TrainConfig(**{**QUICK, "epochs": 2}), progress=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "run.json", "metrics.jsonl", "curves.png", "best.pt", "last.pt"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2] and len(result.history) == 3
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in records if r["type"] == "step")
    last = RunCheckpoint.read(run / "last.pt")  # weights_only=True
    assert last.state.epoch == 2 and last.model_type == "micro"
    assert set(k.split(".")[0] for k in last.state_dict) == {"mask_decoder", "prompt_encoder"}
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 2
    assert json.loads((run / "run.json").read_text())["result"]["val_miou_last"] == pytest.approx(result.val_miou_last)
    # Only the decoder trained: the prompt encoder is the base one.
    base = load_sam("micro").sam  # the cache's weights
    for k, v in base.prompt_encoder.state_dict().items():
        assert torch.equal(last.state_dict[f"prompt_encoder.{k}"], v)
    assert not torch.equal(last.state_dict["mask_decoder.iou_token.weight"], base.mask_decoder.iou_token.weight)
    with pytest.raises(RunError, match="already holds a run"):
        train(stamps_cache, run, TrainConfig(**QUICK), progress=False)


def test_in_memory_and_hdf5_and_workers_train_identically(stamps_cache, tmp_path):
    a = train(stamps_cache, tmp_path / "a", TrainConfig(**{**QUICK, "cache_in_memory": "yes"}), progress=False)
    b = train(stamps_cache, tmp_path / "b", TrainConfig(**{**QUICK, "cache_in_memory": "no", "workers": 2}),
              progress=False)
    wa = RunCheckpoint.read(tmp_path / "a" / "last.pt").state_dict
    wb = RunCheckpoint.read(tmp_path / "b" / "last.pt").state_dict
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a.history == b.history
    assert json.loads((tmp_path / "a" / "run.json").read_text())["embeddings_in_memory"] is True


def test_prompt_encoder_can_be_trained_too(stamps_cache, tmp_path):
    train(stamps_cache, tmp_path / "r", TrainConfig(**{**QUICK, "train": ["mask_decoder", "prompt_encoder"],
                                                       "prompts": PromptSettings(mode="mixed")}), progress=False)
    weights = RunCheckpoint.read(tmp_path / "r" / "last.pt").state_dict
    base = load_sam("tiny").sam.prompt_encoder.state_dict()
    assert not torch.equal(weights["prompt_encoder.point_embeddings.2.weight"], base["point_embeddings.2.weight"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(stamps_cache, tmp_path, monkeypatch):
    import samcache.models.decoder as step_module  # where SAM's PromptDecoder finds its loss

    train(stamps_cache, tmp_path / "r", TrainConfig(**QUICK), progress=False)
    good = (tmp_path / "r" / "last.pt").read_bytes()
    real = step_module.compute_loss

    def exploding(*args, **kwargs):
        parts = real(*args, **kwargs)
        parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(step_module, "compute_loss", exploding)
    with pytest.raises(TrainingError, match="loss became nan at epoch 2, step 1.*last good checkpoint"):
        train(stamps_cache, tmp_path / "r", TrainConfig(**{**QUICK, "epochs": 2}), resume=True, progress=False)
    assert (tmp_path / "r" / "last.pt").read_bytes() == good


def test_clear_errors_for_bad_options_and_empty_splits(stamps_cache, tmp_path):
    with pytest.raises(TrainingError, match="no objects in validation split 'nope'.*--val-split"):
        train(stamps_cache, tmp_path / "r", TrainConfig(**{**QUICK, "val_split": "nope"}), progress=False)
    with pytest.raises(ConfigError, match="prompts.mode = 'scribble'"):
        parse(TrainConfig, {**QUICK, "prompts": {"mode": "scribble"}})
    with pytest.raises(ConfigError, match="train = 'image_encoder'"):
        parse(TrainConfig, {**QUICK, "train": ["image_encoder"]})
    with pytest.raises(ConfigError, match="unknown option epochz"):
        parse(TrainConfig, {"epochz": 3})
    with pytest.raises(TrainingError, match="global batch, smaller than the 4 processes"):
        from samcache.distributed import Distributed

        train(stamps_cache, tmp_path / "r", TrainConfig(**{**QUICK, "batch_size": 2}), progress=False,
              dist=Distributed(rank=0, world_size=4))
    with pytest.raises(RunError, match="--resume: .* has no last.pt"):
        train(stamps_cache, tmp_path / "fresh", TrainConfig(**QUICK), resume=True, progress=False)


def test_cache_without_objects_is_refused(tmp_path):
    write_image(tmp_path / "images" / "a.png", 50, 50)
    make_coco(tmp_path, [{"id": 1, "file_name": "a.png", "width": 50, "height": 50}], [], "train.json")
    embed_dataset(load_dataset(tmp_path), tmp_path / "c", EmbedConfig(workers=0, progress=False))
    with pytest.raises(TrainingError, match="no objects in split 'train'"):
        train(tmp_path / "c", tmp_path / "r", TrainConfig(**QUICK), progress=False)


def test_other_base_weights_are_refused(stamps_cache, tmp_path):
    other = tmp_path / "other.pth"
    torch.save(build_seeded("micro", 5).state_dict(), other)
    from samcache.errors import CheckpointError

    with pytest.raises(CheckpointError, match="cache was made with micro weights"):
        train(stamps_cache, tmp_path / "r", TrainConfig(**{**QUICK, "checkpoint": str(other)}), progress=False)


def test_cli_config_file_and_overrides(stamps_cache, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"epochs": 1, "batch_size": 3, "objects_per_image": 2, "workers": 0,
                                      "save_every": None, "lr": 5e-5}))
    result = CliRunner().invoke(main, ["train", str(stamps_cache), "--out", str(tmp_path / "r"),
                                       "--config", str(config), "--lr", "2e-4"])
    assert result.exit_code == 0, result.output
    assert "validation mIoU" in result.output and "samples/s" in result.output
    resolved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert resolved["batch_size"] == 3 and resolved["lr"] == 2e-4
    bad = CliRunner().invoke(main, ["train", str(stamps_cache), "--out", str(tmp_path / "s"), "--loss", "l1"])
    assert bad.exit_code == 2
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: 1\nlearning_rate: 1\n")
    out = CliRunner().invoke(main, ["train", str(stamps_cache), "--out", str(tmp_path / "t"),
                                    "--config", str(bad_yaml)])
    assert out.exit_code == 1 and "unknown option learning_rate in" in out.output
    # YAML 1.1 reads a bare `no` as False: the config must still mean --cache-in-memory no.
    yes_no = tmp_path / "yes_no.yaml"
    yes_no.write_text("epochs: 1\nworkers: 0\nsave_every: null\ncache_in_memory: no\n")
    run = CliRunner().invoke(main, ["train", str(stamps_cache), "--out", str(tmp_path / "u"), "--config", str(yes_no)])
    assert run.exit_code == 0, run.output
    assert yaml.safe_load((tmp_path / "u" / "config.yaml").read_text())["cache_in_memory"] == "no"


# ------------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(stamps_cache, tmp_path):
    args = ["--epochs", "2", "--batch-size", "1", "--objects-per-image", "2", "--workers", "1", "--warmup-steps", "2"]

    def run(out: Path, *extra: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
        return train_process(stamps_cache, out, [*args, *extra], crash_at=crash_at)

    # Steps per epoch: the 'train' images. Save every 2 steps; die at step 3 of epoch 1, mid-epoch.
    steps_per_epoch = len(EmbeddingCache(stamps_cache).annotated_indices("train"))
    assert steps_per_epoch >= 4, steps_per_epoch  # step 3 is inside epoch 1, after the step-2 save
    reference = run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    yaml_config = tmp_path / "save.yaml"
    yaml_config.write_text("save_every: 2\n")
    killed = run(tmp_path / "killed", "--config", str(yaml_config), crash_at="train-step:3")
    assert killed.returncode == -signal.SIGKILL
    mid = RunCheckpoint.read(tmp_path / "killed" / "last.pt").state
    assert (mid.epoch, mid.batch) == (0, 2)  # the step-2 save, inside epoch 1
    resumed = run(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = assert_same_last_checkpoint(tmp_path / "reference", tmp_path / "killed")
    assert got.state.global_step == 2 * steps_per_epoch
    steps = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in steps if r["type"] == "step"] == list(range(1, got.state.global_step + 1))


_PAGE_FAULTS = """
import resource, sys, torch
from samcache.devices import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for mib in (128, 112, 96, 80, 64):  # large blocks, each a little smaller than the one freed before it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(mib * 2**20 // 4)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="page-fault counts of Linux")
def test_keeping_freed_memory_spares_the_page_faults_of_large_blocks():
    """Training keeps the memory it frees (devices.keep_freed_memory): a large block asked for after a
    larger one was freed comes from the process's heap, not from fresh pages the kernel faults in."""
    import platform
    import sys

    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
        applied, *counts = out.stdout.split()
        faults[mode] = [int(c) for c in counts]
    if platform.libc_ver()[0] != "glibc":
        assert applied == "False"
        return
    assert applied == "True"
    later_pages = sum((112, 96, 80, 64)) * 2**20 // 4096
    # By default every block is mapped afresh and faulted in (page by page, or by huge pages where the
    # kernel gives them); kept, the later blocks reuse the first one's pages.
    assert sum(faults["keep"][1:]) < later_pages // 100, faults
    assert sum(faults["keep"][1:]) * 10 < sum(faults["default"][1:]), faults


def test_bf16_training_follows_the_fp32_loss_trajectory(tiny_cache, tmp_path):
    """--precision bf16 (the default on CPUs with native bf16) against fp32 on the same short run of the
    demo's recipe (tiny, SAM's loss, lr 1e-3): the first step's loss within bf16's rounding (1%), every
    step within 10% as the two trajectories part, validation mIoU within 0.01 after each epoch. The
    demo's full run: BENCHMARKS.md (bench_train_precision.py)."""
    losses, histories = {}, {}
    for precision in ("fp32", "bf16"):
        result = train(tiny_cache, tmp_path / precision, TrainConfig(**{
            **QUICK, "epochs": 2, "objects_per_image": 4, "lr": 1e-3, "loss": "sam", "precision": precision}),
            progress=False)
        records = [json.loads(line) for line in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = np.array([r["loss"] for r in records if r["type"] == "step"])
        histories[precision] = np.array(result.history)
    assert len(losses["fp32"]) >= 6
    relative = np.abs(losses["bf16"] - losses["fp32"]) / losses["fp32"]
    assert relative[0] < 0.01 and relative.max() < 0.10, relative
    assert relative.max() > 0  # bf16 really ran: its rounding shows
    # Validation decodes in fp32 whatever the training precision: the same start.
    assert histories["bf16"][0] == histories["fp32"][0]
    np.testing.assert_allclose(histories["bf16"], histories["fp32"], atol=0.01)


@pytest.mark.slow  # SIGKILL and resume in subprocesses, as the other crash cases
def test_a_stop_between_the_epoch_checkpoint_and_its_log_line_resumes_with_the_line(stamps_cache, tmp_path):
    """An epoch's last.pt is written before its metrics.jsonl record (so a reader of the record finds the
    checkpoint); killed between the two, --resume writes the record the checkpoint carries, and the log
    ends as the uninterrupted run's."""
    args = ["--epochs", "2", "--batch-size", "2", "--objects-per-image", "2", "--workers", "0"]
    reference = train_process(stamps_cache, tmp_path / "reference", args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = train_process(stamps_cache, tmp_path / "killed", args, crash_at="epoch-checkpointed:1")
    assert killed.returncode == -signal.SIGKILL

    def records(run: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert RunCheckpoint.read(tmp_path / "killed" / "last.pt").state.epoch == 1
    assert [r["epoch"] for r in records("killed") if r["type"] == "epoch"] == [0]  # epoch 1's line not yet written
    resumed = train_process(stamps_cache, tmp_path / "killed", ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_last_checkpoint(tmp_path / "reference", tmp_path / "killed")

    def comparable(run: str) -> list[tuple]:
        return [(r["type"], r["epoch"], r["global_step"], r.get("val_miou"), r.get("loss")) for r in records(run)]

    assert comparable("killed") == comparable("reference")
    assert [r["epoch"] for r in records("killed") if r["type"] == "epoch"] == [0, 1, 2]


@pytest.mark.slow
def test_it_learns_on_a_small_stamps_cache(tmp_path):
    """The mechanics, from a decoder that knows nothing: the tiny model's random weights (--random-init),
    so this uses the class-balanced dice-bce loss: SAM's focal-heavy recipe assumes a pretrained decoder and,
    from random weights, settles on predicting background everywhere."""
    data = tmp_path / "ds"
    # Its own 6 pages, all in the train split, which is also validated: learning to fit them from nothing is
    # the mechanics under test (generalising is the pretrained-tiny tests'), and it shows in a few epochs.
    generate_stamps(data, 6, seed=3, progress=False, fractions=(1.0, 0.0, 0.0))
    # fp32 embeddings: the same trajectory on CPUs with and without native bf16.
    embed_dataset(load_dataset(data), tmp_path / "cache",
                  EmbedConfig(workers=0, progress=False, precision="fp32", random_init=True, backend="torch"))
    # 15 epochs of 3 steps: learning from random weights starts slowly (0.06 after 5 epochs here).
    config = TrainConfig(epochs=15, batch_size=2, objects_per_image=4, lr=1e-3, loss="dice-bce", workers=0,
                         warmup_steps=5, save_every=None, val_split="train", precision="fp32")
    result = train(tmp_path / "cache", tmp_path / "run", config, progress=False)
    assert result.val_miou_start < 0.1
    # Seen here (opencv 5.1): 0.032 before, 0.06 after 5 epochs, 0.27 after 15.
    assert result.val_miou_best > result.val_miou_start + 0.1, result.history
    assert result.val_miou_best > 3 * result.val_miou_start, result.history


def test_validation_is_bounded_by_a_seeded_subset(stamps_cache, tmp_path):
    from samcache.distributed import SINGLE
    from samcache.train.runs import RunFolder
    from samcache.train.trainer import _splits
    from tests.helpers import train_run

    cache = EmbeddingCache(stamps_cache)
    # The train split (5 images) validated, so that there is something to take a subset of.
    subsets = {name: _splits(cache, TrainConfig(val_split="train", **overrides), SINGLE)[1]
               for name, overrides in {"two": dict(val_max_images=2), "again": dict(val_max_images=2),
                                       "all": dict(val_max_images=None)}.items()}
    assert len(subsets["two"]) == 2 and subsets["two"] == subsets["again"]  # a function of the seed
    assert set(subsets["two"]) < set(subsets["all"]) and len(subsets["all"]) == 5
    run = train_run(stamps_cache, tmp_path / "run", val_split="train", val_max_images=2)
    assert RunFolder(tmp_path / "run").info()["val_images"] == 2 and len(run.history) == 2
