"""Cached views (`embed --views`): each view embedded once, its objects transformed to match, one view
drawn per image and epoch (seeded), the original alone in evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from samcache.config import PromptSettings, TrainConfig
from samcache.data import masks
from samcache.data.images import read_image
from samcache.models.preprocess import batch_to_model_input, resize_image
from samcache.models.prompts import low_res_target
from samcache.models.weights import load_matching
from samcache.train.samples import CacheSamples, EmbeddingStore, SampleSettings
from samcache.train.trainer import train
from tests.helpers import (
    EMBED_FLAGS,
    QUICK_TRAIN,
    SHARED_EMBED,
    assert_same_last_checkpoint,
    embed,
    left_unchanged,
    train_run,
)

VIEWS = ["hflip", "rot90", "scale0.5"]


@pytest.fixture(scope="module")
def views_cache(stamps, tmp_path_factory):
    out = tmp_path_factory.mktemp("views") / "cache"
    embed(stamps, out, **SHARED_EMBED, views=VIEWS)
    return out


def test_each_view_is_the_encoder_on_that_view_of_the_image(views_cache, stamps):
    cache = EmbeddingCache(views_cache)
    assert [v.name for v in cache.views] == VIEWS
    model = load_matching(cache.provenance.model_type, cache.provenance.weights_sha256, None)
    info = cache.images[0]
    image = resize_image(read_image(stamps / "images" / info.name, intensity=cache.provenance.intensity))
    for number, view in enumerate(cache.views, start=1):
        model_input = batch_to_model_input([torch.from_numpy(view.input_image(image))], device="cpu",
                                           preprocessing=model.family.preprocessing)
        with torch.no_grad():
            expected = model.sam.image_encoder(model_input)[0].numpy().astype(np.float16)
        stored = cache.features(0, "embedding", number)
        np.testing.assert_array_equal(stored, expected)
        assert not np.array_equal(stored, cache.embedding(0))  # a view is not the original again


def test_a_drawn_view_brings_its_own_objects_frame_and_features(views_cache):
    cache = EmbeddingCache(views_cache)
    index = cache.annotated_indices("train")[0]
    info = cache.images[index]
    settings = SampleSettings.training(objects_per_image=8, prompts=PromptSettings(box_jitter=0.0), seed=0)
    samples = CacheSamples(cache, settings)
    seen = {}
    for epoch in range(40):
        item = samples[(epoch, index)]
        seen.setdefault(item["view"], item)
    assert sorted(seen) == [0, 1, 2, 3]  # the original and each view get drawn
    original_targets = np.stack([low_res_target(o.rle, info.input_size) for o in info.objects])
    for number, item in seen.items():
        np.testing.assert_array_equal(item["embedding"].numpy(), cache.features(index, "embedding", number))
        if number == 0:
            np.testing.assert_array_equal(item["targets"], original_targets)
            continue
        view = cache.views[number - 1]
        moved = [masks.decode(o.rle) for o in view.objects(info.objects, info.original_size)]
        expected = np.stack([low_res_target(masks.encode(m), view.input_size(info.input_size)) for m in moved])
        np.testing.assert_array_equal(item["targets"], expected)
    # hflip's target is the original's mirrored inside the image's part of the 256x256 frame
    h, w = (round(v / 4) for v in info.input_size)
    flipped = seen[1]["targets"][:, :h, :w]
    np.testing.assert_allclose(flipped, original_targets[:, :h, ::-1][:, :, :w], atol=1e-6)


def test_the_view_draw_is_a_function_of_seed_epoch_and_image_and_evaluation_reads_the_original(views_cache):
    cache = EmbeddingCache(views_cache)
    prompts = PromptSettings()
    a = CacheSamples(cache, SampleSettings.training(objects_per_image=2, prompts=prompts, seed=3))
    b = CacheSamples(cache, SampleSettings.training(objects_per_image=2, prompts=prompts, seed=3))
    other = CacheSamples(cache, SampleSettings.training(objects_per_image=2, prompts=prompts, seed=4))
    draws = [a.view_of(e, i) for e in range(6) for i in range(len(cache))]
    assert draws == [b.view_of(e, i) for e in range(6) for i in range(len(cache))]
    assert draws != [other.view_of(e, i) for e in range(6) for i in range(len(cache))]
    fixed = CacheSamples(cache, SampleSettings.fixed("box", seed=3))
    assert {fixed.view_of(e, i) for e in range(6) for i in range(len(cache))} == {0}
    store = EmbeddingStore(cache, [0, 1], views=True)
    np.testing.assert_array_equal(store.gather([1, 0], [2, 0]).numpy(),
                                  np.stack([cache.features(1, "embedding", 2), cache.embedding(0)]))


def test_training_on_views_resumes_exactly(views_cache, tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train_run(views_cache, whole, epochs=2, lr=1e-3)
    train_run(views_cache, halves, epochs=1, lr=1e-3)
    train(views_cache, halves, TrainConfig(**{**QUICK_TRAIN, "epochs": 2, "lr": 1e-3}), resume=True, progress=False)
    assert_same_last_checkpoint(whole, halves)


def test_views_are_part_of_the_recipe_and_bad_names_are_refused(views_cache, stamps, tmp_path):
    runner = CliRunner()
    with left_unchanged(views_cache, "views cache"):
        result = runner.invoke(main, ["embed", str(stamps), "--out", str(views_cache), *EMBED_FLAGS,
                                      "--views", "hflip"])
    assert result.exit_code != 0
    assert "views" in result.output and "another --out" in result.output
    result = runner.invoke(main, ["embed", str(stamps), "--out", str(tmp_path / "bad"), *EMBED_FLAGS,
                                  "--views", "hflip,spin"])
    assert result.exit_code != 0 and "'spin'" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    header = json.loads((views_cache / "cache.json").read_text())
    assert header["provenance"]["views"] == VIEWS


def test_views_need_an_encoder_that_takes_the_resized_image():
    from samcache.errors import SamcacheError
    from samcache.models.families import family_of

    with pytest.raises(SamcacheError, match="--views"):
        family_of("sam2.1_hiera_t").check_views("sam2.1_hiera_t")
