"""SAM 2.1 from the cache, end to end, on a random-weight Hiera-T in Meta's layout (no download):
the cache's format and guarantees, training (conv_s0 / conv_s1 frozen, SAM 2's loss), evaluation,
and an export that sam2's own SAM2ImagePredictor loads and agrees with."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from samcache.cache.format import SCHEMA_VERSIONS
from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from samcache.config import EvalConfig
from samcache.data import masks
from samcache.data.images import read_image
from samcache.errors import CacheError, CheckpointError, SamcacheError
from samcache.evaluate.automatic_masks import segment_everything
from samcache.evaluate.evaluator import evaluate
from samcache.models.decoder import DecoderOutput
from samcache.models.families import family_of
from samcache.models.feature_layout import pack_sam2, unpack_sam2
from samcache.models.prompts import interior_point
from samcache.models.sam2_decoder import sam2_loss
from samcache.models.specs import OFFICIAL_WEIGHTS, SAM2_FEATURE_SHAPES
from samcache.models.weights import identify_weights, load_sam
from samcache.train.runs import RunFolder
from tests.helpers import EMBED_FLAGS, SAM2_PAGES, copy_tree, embed

CONFIG_T = "configs/sam2.1/sam2.1_hiera_t.yaml"


def test_packing_is_lossless_and_pixel_unshuffle_order():
    maps = {name: torch.randn(2, *shape) for name, shape in SAM2_FEATURE_SHAPES.items()}
    packed = pack_sam2(maps)
    assert packed.shape == (2, 1024, 64, 64)
    torch.testing.assert_close(packed[:, 256:512], torch.nn.functional.pixel_unshuffle(maps["high_res_s1"], 2))
    torch.testing.assert_close(packed[:, 512:], torch.nn.functional.pixel_unshuffle(maps["high_res_s0"], 4))
    for name, value in unpack_sam2(packed).items():
        assert torch.equal(value, maps[name])
    as_numpy = pack_sam2({name: value[0].numpy() for name, value in maps.items()})
    assert np.array_equal(as_numpy, packed[0].numpy())


def test_cache_holds_the_three_maps_of_sam2_image_predictor(sam2_cache, hiera_t_checkpoint):
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    header = json.loads((sam2_cache / "cache.json").read_text())
    assert header["schema_version"] == SCHEMA_VERSIONS["sam2.1"] == 2
    assert header["provenance"]["model_type"] == "sam2.1_hiera_t"
    cache = EmbeddingCache(sam2_cache)
    assert len(cache) == SAM2_PAGES
    info = cache.info()
    assert info["model_family"] == "sam2.1" and info["embedding_shape"] == [256, 64, 64]
    assert info["stored_maps"] == {"embeddings": [256, 64, 64], "high_res_s1": [64, 128, 128],
                                   "high_res_s0": [32, 256, 256]}
    assert 8 * 2**20 <= info["bytes_per_image"] < 8.3 * 2**20  # three fp16 maps, 8 MiB, plus tables
    with h5py.File(cache.shards[0], "r") as shard:
        for name, shape in (("embeddings", (256, 64, 64)), ("high_res_s1", (64, 128, 128)),
                            ("high_res_s0", (32, 256, 256))):
            assert shard[name].shape[1:] == shape and shard[name].dtype == np.float16 and shard[name].fletcher32

    assert all(image.input_size == (1024, 1024) for image in cache.images)  # stretched, whatever the page's shape
    # The last image, in the cache's second shard (a Hiera-T forward costs seconds on one thread)
    predictor = SAM2ImagePredictor(build_sam2(CONFIG_T, str(hiera_t_checkpoint), device="cpu"))
    index = len(cache) - 1
    predictor.set_image(read_image(cache.images[index].file.path))
    theirs = {"image_embed": predictor._features["image_embed"][0],
              "high_res_s0": predictor._features["high_res_feats"][0][0],
              "high_res_s1": predictor._features["high_res_feats"][1][0]}
    ours = unpack_sam2(torch.from_numpy(cache.embedding(index)).float())
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, atol=2e-2, rtol=2e-3)  # fp16 storage


def test_embedding_is_incremental_and_never_mixes_families(sam2_cache, sam2_stamps, stamps_cache, hiera_t_checkpoint,
                                                            stamps, tmp_path):
    cache = copy_tree(sam2_cache, tmp_path / "cache")
    again = embed(sam2_stamps, cache, model_type="sam2.1_hiera_t", checkpoint=hiera_t_checkpoint, precision="fp32")
    assert again.embedded == 0 and again.skipped == SAM2_PAGES
    sam_cache = copy_tree(stamps_cache, tmp_path / "sam_cache")
    with pytest.raises(CacheError, match="model_type is 'micro' in the cache, 'sam2.1_hiera_t' now"):
        embed(stamps, sam_cache, model_type="sam2.1_hiera_t", checkpoint=hiera_t_checkpoint)
    result = CliRunner().invoke(main, ["embed", str(stamps), "--out", str(tmp_path / "x"), "--model", "sam2.1_hiera_t",
                                       "--checkpoint", str(hiera_t_checkpoint), "--backend", "openvino"])
    assert result.exit_code != 0 and "Hiera" in result.output
    assert not (tmp_path / "x" / "cache.json").exists()


@pytest.mark.slow
def test_killed_embed_resumes_to_the_same_cache(sam2_cache, hiera_t_checkpoint, sam2_stamps, tmp_path):
    cache = tmp_path / "killed"
    env = dict(os.environ, SAMCACHE_CRASH_AT="shard-before-rename:2")
    command = [sys.executable, "-m", "samcache", "embed", str(sam2_stamps), "--out", str(cache), "--model",
               "sam2.1_hiera_t", "--checkpoint", str(hiera_t_checkpoint), *EMBED_FLAGS[2:]]  # its own --model
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    partial = EmbeddingCache(cache)
    assert len(partial) == 2 and list((cache / "shards").glob("*.tmp"))  # one shard committed, one half-done
    env.pop("SAMCACHE_CRASH_AT")
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not list((cache / "shards").glob("*.tmp"))
    done, reference = EmbeddingCache(cache), EmbeddingCache(sam2_cache)
    assert [done.name_of(i) for i in range(len(done))] == [reference.name_of(i) for i in range(len(reference))]
    for index in range(len(done)):
        np.testing.assert_array_equal(done.embedding(index), reference.embedding(index))


def test_sam2_loss_equals_sam2_trainers(monkeypatch):
    """sam2_loss (SAM 2.1's `--loss sam`) is sam2's MultiStepMultiMasksAndIous with
    the weights of its released configs, read from the sam2 package's own training/loss_fns.py."""
    spec = importlib.util.find_spec("training")
    monkeypatch.setitem(sys.modules, "training.trainer", types.SimpleNamespace(CORE_LOSS_KEY="core_loss"))
    monkeypatch.setitem(sys.modules, "training.utils.distributed", types.SimpleNamespace(
        get_world_size=lambda: 1, is_dist_avail_and_initialized=lambda: False))
    source = Path(spec.submodule_search_locations[0]) / "loss_fns.py"
    loss_spec = importlib.util.spec_from_file_location("sam2_loss_fns", source)
    loss_fns = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(loss_fns)
    theirs = loss_fns.MultiStepMultiMasksAndIous(
        {"loss_mask": 20, "loss_dice": 1, "loss_iou": 1, "loss_class": 1}, supervise_all_iou=True,
        iou_use_l1_loss=True, pred_obj_scores=True, focal_gamma_obj_score=0.0, focal_alpha_obj_score=-1)

    generator = torch.Generator().manual_seed(0)
    n = 5
    output = DecoderOutput(torch.randn(n, 4, 32, 32, generator=generator) * 3, torch.rand(n, 4, generator=generator),
                           torch.randn(n, 1, generator=generator))
    targets = (torch.rand(n, 32, 32, generator=generator) > 0.6).float()
    for multimask, outputs in ((torch.zeros(n, dtype=torch.bool), slice(0, 1)),
                               (torch.ones(n, dtype=torch.bool), slice(1, 4))):
        ours = sam2_loss(output, targets, multimask)
        expected = theirs([{"multistep_pred_multimasks_high_res": [output.logits[:, outputs]],
                            "multistep_pred_ious": [output.iou_pred[:, outputs]],
                            "multistep_object_score_logits": [output.object_score]}], targets[None])
        torch.testing.assert_close(ours.total, expected["core_loss"], rtol=1e-5, atol=1e-6)


def test_training_keeps_the_cached_convolutions_and_learns_the_rest(sam2_run, hiera_t_checkpoint):
    base = torch.load(hiera_t_checkpoint, weights_only=True)["model"]
    trained = RunFolder(sam2_run).read_checkpoint("last").state_dict
    for key, value in trained.items():
        original = base["sam_" + key]
        if ".conv_s0." in key or ".conv_s1." in key:
            assert torch.equal(value, original), key
    changed = [k for k, v in trained.items() if not torch.equal(v, base["sam_" + k])]
    assert any(k.startswith("mask_decoder.transformer.") for k in changed)
    assert any(k.startswith("mask_decoder.pred_obj_score_head") for k in changed)  # SAM 2's object score term
    assert not any(k.startswith("prompt_encoder.") for k in changed)  # not trained by default
    metrics = [json.loads(line) for line in (sam2_run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) for m in metrics if m.get("type") == "step")


def test_interactive_recipe_trains_from_a_sam2_cache(sam2_cache, tmp_path):
    result = CliRunner().invoke(main, [
        "train", str(sam2_cache), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2",
        "--objects-per-image", "2", "--workers", "0", "--prompt", "interactive", "--click-iterations", "2"])
    assert result.exit_code == 0, result.output
    assert RunFolder(tmp_path / "run").read_checkpoint("last").state.epoch == 1


def test_eval_reports_zero_shot_fine_tuned_box_fill_and_clicks(sam2_cache, sam2_run, tmp_path):
    run = copy_tree(sam2_run, tmp_path / "run")  # eval writes eval-test.json into the run
    summary = evaluate(sam2_cache, tmp_path / "report", EvalConfig(clicks=2), run_dir=run)
    cache = EmbeddingCache(sam2_cache)
    objects = sum(len(cache.images[i].objects) for i in cache.annotated_indices("test"))
    for model in ("zero_shot", "fine_tuned"):
        assert summary[model]["objects"] == objects and 0 <= summary[model]["miou"] <= 1
        assert len(summary["clicks"][model]["miou"]) == 2
    assert summary["baselines"]["box_fill"]["objects"] == objects
    assert summary["zero_shot"]["miou"] != summary["fine_tuned"]["miou"]


@pytest.mark.slow
def test_export_loads_in_sam2_and_predict_agrees_with_sam2_image_predictor(sam2_cache, sam2_run, tmp_path):
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    runner = CliRunner()
    exported = tmp_path / "model.pt"
    result = runner.invoke(main, ["export", "--run", str(sam2_run), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    metadata = json.loads(exported.with_suffix(".json").read_text())
    assert metadata["load_with"] == f"sam2.build_sam.build_sam2({CONFIG_T!r}, FILE)"
    predictor = SAM2ImagePredictor(build_sam2(CONFIG_T, str(exported), device="cpu"))
    tuned = RunFolder(sam2_run).read_checkpoint("best").state_dict
    loaded = predictor.model.sam_mask_decoder.state_dict()
    assert all(torch.equal(loaded[k[len("mask_decoder."):]], v) for k, v in tuned.items() if k.startswith("mask_"))

    cache = EmbeddingCache(sam2_cache)
    info = cache.images[cache.annotated_indices("test")[0]]
    image = read_image(info.file.path)
    predictor.set_image(image)
    box = info.objects[0].box
    inside = interior_point(masks.decode(info.objects[0].rle))[0]
    prompts = [  # (samcache predict flags, SAM2ImagePredictor.predict arguments)
        (["--box", ",".join(map(str, box))], dict(box=np.array(box))),
        (["--point", f"{inside[0]},{inside[1]}"], dict(point_coords=np.array([inside]), point_labels=np.array([1]))),
        (["--box", ",".join(map(str, box)), "--point", f"{box[0] + 2},{box[1] + 2},0"],
         dict(box=np.array(box), point_coords=np.array([[box[0] + 2, box[1] + 2]]), point_labels=np.array([0]))),
    ]
    for flags, arguments in prompts:
        single_point = "box" not in arguments
        stock, scores, _ = predictor.predict(multimask_output=single_point, **arguments)
        theirs = stock[int(np.argmax(scores))] if single_point else stock[0]
        for source, cache_flag in (("cache", str(sam2_cache)), ("encoder", str(tmp_path / "no-cache"))):
            out = tmp_path / "predicted"
            result = runner.invoke(main, ["predict", info.file.path, "--checkpoint", str(exported), "--cache",
                                          cache_flag, *flags, "--out", str(out), "--overwrite"])
            assert result.exit_code == 0, result.output
            (row,) = json.loads((out / "predictions.json").read_text())["predictions"]
            assert row["embedding_from"] == source
            ours = masks.decode(row["segmentation"])
            agreement = float((ours == (theirs > 0)).mean())
            assert agreement >= (0.995 if source == "cache" else 0.9999), (flags, source, agreement)


def test_sam2_refusals(sam2_run, stamps, hiera_t_checkpoint, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--run", str(sam2_run), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "sam2's layout" in result.output
    assert not (tmp_path / "o").exists()
    page = sorted((stamps / "images").glob("*.jpg"))[0]
    result = runner.invoke(main, ["predict", str(page), "--run", str(sam2_run), "--everything", "--out",
                                  str(tmp_path / "e")])
    assert result.exit_code != 0 and "not offered for SAM 2.1" in result.output
    assert not (tmp_path / "e").exists()  # refused before anything is made
    result = runner.invoke(main, ["eval", RunFolder(sam2_run).cache_dir(), "--run", str(sam2_run), "--everything",
                                  "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "not offered for SAM 2.1" in result.output and not (tmp_path / "r").exists()
    sam = load_sam("sam2.1_hiera_t", hiera_t_checkpoint).sam  # the generator itself refuses SAM 2.1's modules too
    with pytest.raises(SamcacheError, match="not offered for SAM 2.1"):
        segment_everything(family_of("sam2.1_hiera_t").decoder(sam, "sam2.1_hiera_t"), torch.zeros(1, 1024, 64, 64),
                           (64, 64))
    with pytest.raises(CheckpointError) as error:  # no file, no download: the message says where to get it
        identify_weights("sam2.1_hiera_t", download=False)
    official = OFFICIAL_WEIGHTS["sam2.1_hiera_t"]
    assert official.url in str(error.value) and official.sha256 in str(error.value)


def test_damage_in_a_high_resolution_map_is_found_and_taken_out(sam2_cache, tmp_path):
    cache_dir = copy_tree(sam2_cache, tmp_path / "cache")
    cache = EmbeddingCache(cache_dir)
    victim = cache.name_of(0)
    shard, row = cache.location(0)
    with h5py.File(shard, "r") as f:
        chunk = f["high_res_s0"].id.get_chunk_info(row)
    with open(shard, "r+b") as f:  # random bytes below HDF5, as a bad disk would leave them
        f.seek(chunk.byte_offset + 1000)
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    checked = CliRunner().invoke(main, ["verify", str(cache_dir), "--check-only"])
    assert checked.exit_code == 1 and f"{victim} in {shard.name}: checksum mismatch in high_res_s0" in checked.output
    assert CliRunner().invoke(main, ["verify", str(cache_dir)]).exit_code == 1
    assert EmbeddingCache(cache_dir).index_of(victim) is None


def test_without_the_sam2_package_embed_says_how_to_install_it_and_writes_nothing(stamps, monkeypatch, tmp_path):
    import samcache.models.sam2 as sam2_models

    real = importlib.util.find_spec
    monkeypatch.setattr(sam2_models.importlib.util, "find_spec",
                        lambda name, *args: None if name == "sam2" else real(name, *args))
    result = CliRunner().invoke(main, ["embed", str(stamps), "--out", str(tmp_path / "cache"), "--model",
                                       "sam2.1_hiera_s"])
    assert result.exit_code != 0 and "needs the sam2 package: SAM2_BUILD_CUDA=0 pip install" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "cache").exists()


def test_safetensors_export_loads_as_its_metadata_says(sam2_run, tmp_path):
    from safetensors.torch import load_file
    from sam2.build_sam import build_sam2

    exported = tmp_path / "model.safetensors"
    result = CliRunner().invoke(main, ["export", "--run", str(sam2_run), "--format", "safetensors", "--out",
                                       str(exported)])
    assert result.exit_code == 0, result.output
    load_with = json.loads(exported.with_suffix(".json").read_text())["load_with"]
    assert load_with.startswith(f"sam2.build_sam.build_sam2({CONFIG_T!r}, None).load_state_dict(")
    model = build_sam2(CONFIG_T, None, device="cpu")
    model.load_state_dict(load_file(str(exported)), strict=True)
    tuned = RunFolder(sam2_run).read_checkpoint("best").state_dict
    loaded = model.sam_mask_decoder.state_dict()
    assert all(torch.equal(loaded[k[len("mask_decoder."):]], v) for k, v in tuned.items() if k.startswith("mask_"))


@pytest.mark.parametrize("gradients", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["outputs", "outputs-and-gradients"])
def test_the_batched_decoder_equals_sam2s_predict_masks(hiera_t_checkpoint, gradients):
    """Sam2PromptDecoder (the transformer folded, the upscaling on tokens with the high-resolution
    maps in the tokens' order, an image's prompts sharing its first block) against sam2's own
    MaskDecoder.predict_masks on each prompt's image, in fp32: outputs (and every gradient, a slow
    case), for boxes over unsorted images, points alone, and mask prompts on some of the prompts."""
    from samcache.models.prompts import PromptBatch

    model_type = "sam2.1_hiera_t"
    sam = load_sam(model_type, checkpoint=hiera_t_checkpoint).sam
    decoder = family_of(model_type).decoder(sam, model_type).train()
    decoder.prompt_encoder.requires_grad_(False)  # as `samcache train` leaves it by default
    torch.manual_seed(0)
    with torch.no_grad():
        for p in decoder.mask_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    maps = {name: torch.randn(2, *shape) for name, shape in SAM2_FEATURE_SHAPES.items()}
    features = pack_sam2(maps)
    n = 3  # a point alone, a box alone, a box with a negative point; images out of order
    base = dict(batch_row=torch.tensor([1, 0, 1]), boxes=torch.tensor([[100., 120, 500, 400]] * n) +
                torch.arange(float(n))[:, None] * 30,
                points=torch.tensor([[[300., 300]], [[0., 0]], [[250., 260]]]),
                labels=torch.tensor([[1], [-1], [0]]), is_box=torch.tensor([False, True, True]))
    previous = torch.randn(n, 256, 256) * 3
    cases = {"boxes and points": PromptBatch(**base),
             "mask prompts on some": PromptBatch(**base, masks=previous, has_mask=torch.tensor([True, False, True]))}

    def stock(prompts):
        pe, md = decoder.prompt_encoder, decoder.mask_decoder
        logits = torch.empty(n, 4, 256, 256)
        for i in range(n):
            row = prompts.batch_row[i : i + 1]
            coords, labels = [], []
            if prompts.is_box[i]:
                coords.append(prompts.boxes[i : i + 1].reshape(1, 2, 2))
                labels.append(torch.tensor([[2, 3]]))
            if prompts.labels[i, 0] >= 0:
                coords.append(prompts.points[i : i + 1, :1])
                labels.append(prompts.labels[i : i + 1, :1])
            given = prompts.masks is not None and bool(prompts.has_mask[i])
            sparse, dense = pe(points=(torch.cat(coords, 1), torch.cat(labels, 1)), boxes=None,
                               masks=prompts.masks[i : i + 1, None] if given else None)
            out, _, _, _ = md.predict_masks(
                image_embeddings=maps["image_embed"][row], image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, repeat_image=False,
                high_res_features=[maps["high_res_s0"][row], maps["high_res_s1"][row]])
            logits[i] = out[0]
        return logits

    weights = torch.randn(n, 4, 256, 256)
    for name, prompts in cases.items():
        results = []
        for run in (lambda: decoder(features, prompts).logits, lambda: stock(prompts)):
            decoder.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(gradients):
                logits = run()
            if gradients:
                (logits * weights).sum().backward()
            results.append((logits.detach(), {k: p.grad.clone() for k, p in decoder.mask_decoder.named_parameters()
                                              if p.grad is not None}))
        (ours, our_grads), (theirs, their_grads) = results
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=name)
        if not gradients:
            continue
        # A key projection's bias shifts all of a query's scores alike, which the softmax cancels: sam2's
        # modules give it rounding noise as gradient, the folded attentions none.
        cancelled = {k for k in their_grads if k.endswith("k_proj.bias")}
        assert cancelled and our_grads.keys() - cancelled == their_grads.keys() - cancelled, name
        largest = max(float(g.abs().max()) for g in their_grads.values())
        assert all(float(grads[k].abs().max()) < 1e-5 * largest
                   for grads in (our_grads, their_grads) for k in cancelled if k in grads), name
        for key in our_grads.keys() - cancelled:
            scale = float(their_grads[key].abs().max()) + 1e-6
            torch.testing.assert_close(our_grads[key], their_grads[key], rtol=1e-3, atol=1e-4 * scale,
                                       msg=f"{name}: {key}")
