"""The shapes generator, the tiny model's pretraining, and loading its shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recipes.tiny import pretrain
from recipes.tiny.pretrain import PretrainConfig, ShapesPrompts, learning_rate, pretrain_tiny
from recipes.tiny.shapes import CATEGORIES, ShapesSettings, generate_shapes, render_shapes
from samcache.config import PromptSettings
from samcache.data import masks
from samcache.data.datasets import load_dataset
from samcache.errors import CheckpointError, TrainingError
from samcache.fileio import sha256_file
from samcache.models import weights as models

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


def test_training_items_hold_prompts_low_res_targets_feedback_draws_and_dense_targets():
    data = ShapesPrompts(seed=0, length=4, prompts_per_image=3, prompt_settings=PromptSettings(mode="mixed"),
                         shapes=SMALL, feedback_passes=2, feedback_point_prob=0.5)
    item = data[1]
    assert item.image.dtype == torch.uint8 and max(item.image.shape[:2]) == 1024
    assert len(item.prompts) == 3 and item.targets.shape == (3, 256, 256)
    assert all(t.max() > 0.5 for t in item.targets)
    # Pass 0 is the prompt; the later ones take the mask prompt, some a corrective point too.
    assert item.draws.shape == (3, 3, 3)
    assert not item.draws[:, :, 0].any() and (item.draws[:, 1, 1:] == 1).all()
    assert set(np.unique(item.draws[:, 0, 1:])) <= {0.0, 1.0} and ((item.draws[:, 2, 1:] >= 0) & (item.draws[:, 2, 1:] < 1)).all()
    height, width = item.valid_size
    assert max(height, width) == 256 and item.image.shape[0] // 4 == height
    union, outlines = item.dense
    assert item.dense.shape == (2, 256, 256)
    assert np.array_equal(union, np.maximum.reduce([t > 0.5 for t in item.targets]) | union.astype(bool)) \
        and union.sum() >= max(int((t > 0.5).sum()) for t in item.targets)
    assert 0 < outlines.sum() < union.sum() and not union[height:].any() and not union[:, width:].any()
    again = data[1]
    assert np.array_equal(item.targets, again.targets) and np.array_equal(item.draws, again.draws)
    assert all(np.array_equal(p.box, q.box) for p, q in zip(item.prompts, again.prompts))


def test_dense_targets_are_footprint_union_and_both_sides_of_each_edge():
    a = np.zeros((256, 256), np.float32)
    a[10:20, 10:20] = 1
    b = np.zeros_like(a)
    b[10:20, 20:30] = 1  # touching a: their shared edge is an outline
    union, outlines = pretrain._dense_targets([a, b])
    assert np.array_equal(union, np.maximum(a, b))
    assert outlines[15, 19] == 1 and outlines[15, 20] == 1 and outlines[15, 15] == 0  # the shared edge; inside
    assert outlines[9, 15] == 1 and outlines[10, 15] == 1 and outlines[8, 15] == 0  # one pixel either side


def test_text_clutter_is_opt_in_and_keeps_masks_valid():
    plain = render_shapes(0, 2, SMALL)
    assert np.array_equal(plain.image, render_shapes(0, 2, ShapesSettings(min_side=96, max_side=160, text=0.0)).image)
    texts = [render_shapes(0, i, ShapesSettings(min_side=96, max_side=160, text=1.0)) for i in range(4)]
    assert any(not np.array_equal(t.image, render_shapes(0, i, SMALL).image) for i, t in enumerate(texts))
    for t in texts:
        assert all(m.shape == t.image.shape[:2] and m.sum() >= 100 for m in t.masks)
        assert sum(m.astype(int) for m in t.masks).max() <= 1 if t.masks else True


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
    assert not torch.equal(written["image_encoder.stem.0.weight"], initial["image_encoder.stem.0.weight"].half())
    assert not any(k.startswith("dense_head") for k in written)  # the auxiliary head is not shipped

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


def test_init_decoder_loads_the_prompt_side_only(pretrained):
    from safetensors.torch import load_file

    config = PretrainConfig(steps=1, seed=3, init_decoder=str(pretrained.weights))
    sam = pretrain._initial_model(config)
    state, start, random = sam.state_dict(), load_file(str(pretrained.weights)), models.build_tiny(3).state_dict()
    prompt_side = [k for k in start if k.startswith(("prompt_encoder.", "mask_decoder."))]
    assert prompt_side and all(torch.equal(state[k], start[k].float()) for k in prompt_side)
    assert all(torch.equal(state[k], random[k]) for k in state if k.startswith("image_encoder."))
    with pytest.raises(TrainingError, match="not a tiny prompt encoder"):
        pretrain._initial_model(PretrainConfig(steps=1, init_decoder=str(_vit_like(pretrained.weights.parent))))


def _vit_like(folder):
    from safetensors.torch import save_file

    path = folder / "other.safetensors"
    save_file({"mask_decoder.something_else": torch.zeros(2)}, str(path))
    return path


RESUMABLE = dict(steps=3, batch_size=1, prompts_per_image=1, warmup_steps=1, eval_images=1, workers=0, shapes=SMALL,
                 checkpoint_every=1)


@pytest.mark.slow
def test_an_interrupted_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    whole = pretrain_tiny(PretrainConfig(**RESUMABLE), tmp_path / "whole", progress=False, command="test",
                          checkpoint=tmp_path / "whole.ckpt")
    real_step, calls = pretrain.pretrain_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during step 3: the checkpoint of step 2 remains
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pretrain, "pretrain_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain_tiny(PretrainConfig(**RESUMABLE), tmp_path / "cut", progress=False, command="test",
                      checkpoint=tmp_path / "cut.ckpt")
    assert not (tmp_path / "cut.safetensors").exists()
    assert torch.load(tmp_path / "cut.ckpt", weights_only=True)["step"] == 2
    monkeypatch.setattr(pretrain, "pretrain_step", real_step)
    resumed = pretrain_tiny(PretrainConfig(**RESUMABLE), tmp_path / "cut", progress=False, command="test",
                            checkpoint=tmp_path / "cut.ckpt")
    a, b = load_file(str(whole.weights)), load_file(str(resumed.weights))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads(resumed.provenance.read_text())["history"]
    assert [h["step"] for h in history] == [3]

    # A run ended early (its budget spent) keeps the full run's schedule, says so, and can still go on.
    early = pretrain_tiny(PretrainConfig(**{**RESUMABLE, "stop_after": 2}), tmp_path / "early", progress=False,
                          command="test", checkpoint=tmp_path / "early.ckpt")
    provenance = json.loads(early.provenance.read_text())
    assert early.steps == 2 and provenance["steps"] == 2 and provenance["schedule_steps"] == 3
    on = pretrain_tiny(PretrainConfig(**RESUMABLE), tmp_path / "on", progress=False, command="test",
                       checkpoint=tmp_path / "early.ckpt")
    c = load_file(str(on.weights))
    assert all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(TrainingError, match="past stop_after"):
        pretrain_tiny(PretrainConfig(**{**RESUMABLE, "stop_after": 1}), tmp_path / "x", progress=False,
                      checkpoint=tmp_path / "early.ckpt")

    with pytest.raises(TrainingError, match="another pretraining config.*lr"):
        pretrain_tiny(PretrainConfig(**{**RESUMABLE, "lr": 1e-5}), tmp_path / "other", progress=False,
                      checkpoint=tmp_path / "cut.ckpt")
