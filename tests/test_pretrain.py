"""The shapes generator, the tiny model's pretraining, and loading its shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samcache import masks, models
from samcache.config import PromptSettings
from samcache.datasets import load_dataset
from samcache.errors import CheckpointError
from samcache.fileio import sha256_file
from samcache.tiny.pretrain import PretrainConfig, ShapesPrompts, learning_rate, pretrain_tiny
from samcache.tiny.shapes import CATEGORIES, ShapesSettings, generate_shapes, render_shapes

SMALL = ShapesSettings(min_side=96, max_side=160)


def test_shapes_are_deterministic_per_seed_and_index():
    a, b = render_shapes(7, 3), render_shapes(7, 3)
    assert np.array_equal(a.image, b.image)
    assert len(a.masks) == len(b.masks) and all(np.array_equal(m, n) for m, n in zip(a.masks, b.masks))
    assert a.category_ids == b.category_ids
    assert not np.array_equal(render_shapes(7, 4).image, a.image)  # arrays of other shapes are never equal
    assert not np.array_equal(render_shapes(8, 3).image, a.image)


def test_shape_masks_are_visible_parts_with_exact_boxes():
    settings = ShapesSettings()
    objects = 0
    for index in range(8):
        item = render_shapes(0, index, settings)
        h, w = item.image.shape[:2]
        assert item.image.dtype == np.uint8 and item.image.shape == (h, w, 3)
        assert settings.min_side <= max(h, w) <= settings.max_side
        assert len(item.masks) == len(item.category_ids)
        total = np.zeros((h, w), np.int32)
        for mask, category in zip(item.masks, item.category_ids):
            assert mask.dtype == bool and mask.shape == (h, w)
            assert mask.sum() >= settings.min_pixels
            assert category in {c["id"] for c in CATEGORIES}
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = masks.bbox_xyxy(masks.encode(mask))
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            total += mask
        assert total.max() <= 1  # visible parts never overlap
        objects += len(item.masks)
    assert objects >= 8


def test_generate_shapes_writes_a_coco_dataset_samcache_reads(tmp_path):
    summary = generate_shapes(tmp_path / "shapes", 5, seed=1, settings=SMALL, progress=False)
    dataset = load_dataset(tmp_path / "shapes", strict=True)
    assert len(dataset.images) == 5
    assert sum(len(r.objects) for r in dataset.images) == summary["objects"] > 0
    first = render_shapes(1, 0, SMALL)
    record = next(r for r in dataset.images if r.path.name == "shapes_00000.png")
    assert len(record.objects) == len(first.masks)
    assert np.array_equal(masks.decode(record.objects[0].rle), first.masks[0])


def test_training_items_hold_prompts_and_low_res_targets():
    data = ShapesPrompts(seed=0, length=4, prompts_per_image=2, prompt_settings=PromptSettings(mode="mixed"),
                         shapes=SMALL)
    item = data[1]
    assert item.image.dtype == torch.uint8 and max(item.image.shape[:2]) == 1024
    assert 1 <= len(item.prompts) <= 2 and item.targets.shape == (len(item.prompts), 256, 256)
    assert all(t.max() > 0.5 for t in item.targets)
    again = data[1]
    assert np.array_equal(item.targets, again.targets)
    assert all(np.array_equal(p.box, q.box) for p, q in zip(item.prompts, again.prompts))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = PretrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(1e-4)
    assert learning_rate(9, config) == pytest.approx(1e-3)
    assert learning_rate(99, config) == pytest.approx(1e-4)
    assert learning_rate(50, config) < learning_rate(20, config)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    config = PretrainConfig(steps=2, batch_size=1, prompts_per_image=1, warmup_steps=1, eval_images=1,
                            workers=0, shapes=SMALL)
    out = tmp_path_factory.mktemp("pretrain") / "tiny_test"
    return pretrain_tiny(config, out, progress=False, command="test")


def test_pretrain_writes_strict_fp16_weights_and_provenance(pretrained):
    from safetensors.torch import load_file

    assert pretrained.weights.suffix == ".safetensors" and pretrained.weights.is_file()
    written = load_file(str(pretrained.weights))
    expected = models.build_sam("tiny").state_dict()
    assert sorted(written) == sorted(expected)
    assert all(written[k].shape == expected[k].shape and written[k].dtype == torch.float16 for k in expected)
    # The two steps moved the weights away from the random initialisation.
    initial = models.build_tiny(0).state_dict()
    assert not torch.equal(written["mask_decoder.iou_token.weight"], initial["mask_decoder.iou_token.weight"].half())
    assert not torch.equal(written["image_encoder.patch_embed.proj.weight"],
                           initial["image_encoder.patch_embed.proj.weight"].half())

    loaded = models.load_sam("tiny", pretrained.weights)
    assert loaded.weights_sha256 == sha256_file(pretrained.weights) == pretrained.sha256
    assert torch.equal(loaded.sam.state_dict()["mask_decoder.iou_token.weight"].half(),
                       written["mask_decoder.iou_token.weight"])

    provenance = json.loads(pretrained.provenance.read_text())
    assert provenance["weights_sha256"] == pretrained.sha256
    assert provenance["steps"] == 2 and provenance["seed"] == 0 and provenance["images_seen"] == 2
    assert "NOT Meta's Segment Anything" in provenance["statement"]
    assert provenance["config"]["loss"] == "dice-bce" and provenance["command"] == "test"
    assert provenance["torch"] == torch.__version__
    held_out = provenance["held_out"]
    assert held_out["objects"] >= 1 and 0.0 <= held_out["box_miou"] <= 1.0 and 0.0 <= held_out["point_miou"] <= 1.0
    assert held_out["box_miou"] == pytest.approx(pretrained.box_miou)


def test_random_init_is_build_tiny():
    loaded = models.load_sam("tiny", random_init=True)
    reference = models.build_tiny(0).state_dict()
    state = loaded.sam.state_dict()
    assert sorted(state) == sorted(reference) and all(torch.equal(state[k], reference[k]) for k in reference)
    assert loaded.weights_sha256 == models.state_dict_sha256(reference)
    assert loaded.weights_source == "tiny random init (seed 0)"
    with pytest.raises(CheckpointError, match="random_init"):
        models.load_sam("vit_b", random_init=True)


def test_shipped_weights_are_the_default_and_both_tiny_caches_match(pretrained, monkeypatch, tmp_path):
    random_sha = models.state_dict_sha256(models.build_tiny(0).state_dict())
    monkeypatch.setattr(models, "TINY_PRETRAINED", pretrained.weights)
    monkeypatch.setattr(models, "TINY_PRETRAINED_SHA256", pretrained.sha256)
    default = models.load_sam("tiny")
    assert default.weights_sha256 == pretrained.sha256 and default.weights_source == str(pretrained.weights)
    assert models.load_matching("tiny", pretrained.sha256).weights_sha256 == pretrained.sha256
    assert models.load_matching("tiny", random_sha).weights_source == "tiny random init (seed 0)"
    assert models.load_sam("tiny", seed=1, random_init=True).weights_sha256 != random_sha
    with pytest.raises(CheckpointError, match="random_init=True"):
        models.load_sam("tiny", seed=1)
    with pytest.raises(CheckpointError, match="SHA-256"):
        models.load_matching("tiny", "0" * 64)

    damaged = tmp_path / "tiny_shapes.safetensors"
    damaged.write_bytes(pretrained.weights.read_bytes()[:-1] + b" ")
    monkeypatch.setattr(models, "TINY_PRETRAINED", damaged)
    with pytest.raises(CheckpointError, match="damaged"):
        models.load_sam("tiny")
    assert models.load_sam("tiny", random_init=True).weights_sha256 == random_sha


def test_pretrain_starts_from_given_weights_and_scales_the_encoder_lr(pretrained, tmp_path):
    from safetensors.torch import load_file

    # Encoder lr scaled to 0: the encoder stays exactly where init_weights put it; the decoder moves.
    config = PretrainConfig(steps=2, batch_size=1, prompts_per_image=1, warmup_steps=1, eval_images=1, workers=0,
                            shapes=SMALL, init_weights=str(pretrained.weights), encoder_lr_scale=0.0, weight_decay=0.0)
    second = pretrain_tiny(config, tmp_path / "second", progress=False, command="test",
                           stages={"warmup": {"note": "recorded as given"}})
    start, end = load_file(str(pretrained.weights)), load_file(str(second.weights))
    encoder = [k for k in start if k.startswith("image_encoder.")]
    assert encoder and all(torch.equal(start[k], end[k]) for k in encoder)
    assert not torch.equal(start["mask_decoder.iou_token.weight"], end["mask_decoder.iou_token.weight"])
    provenance = json.loads(second.provenance.read_text())
    assert provenance["earlier_stages"] == {"warmup": {"note": "recorded as given"}}
    assert provenance["config"]["init_weights"] == str(pretrained.weights)
