"""SAM-HQ (hq_vit_tiny, hq_vit_b) against segment_anything_hq's own code: the batched decoder, the
loss, the cache of the embedding and the early feature, training the HQ parts alone, the evaluation
report, the export read back by its registry and SamPredictor, and prediction on a new image.

The weights are random (build_seeded, saved in the official layout): the point is that samcache
computes what SAM-HQ's code computes, not the quality of the masks."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from samcache.cli import main
from samcache.data import masks
from samcache.data.images import read_image
from samcache.models.decoder import choose_mask
from samcache.models.families import family_of
from samcache.models.prompts import MAX_POINTS, Prompt, PromptBatch
from samcache.models.sam_hq import HQ_PARTS, sam_hq_loss
from samcache.models.weights import build_seeded
from samcache.train.runs import RunCheckpoint
from tests.helpers import copy_tree, left_unchanged

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from segment_anything_hq import SamPredictor, sam_model_registry

HQ_EMBED_FLAGS = ["--workers", "0", "--batch-size", "1", "--precision", "fp32", "--backend", "torch",
                  "--shard-images", "2"]
HQ_TRAIN_FLAGS = ["--epochs", "1", "--batch-size", "2", "--objects-per-image", "2", "--workers", "0", "--lr", "1e-3"]
BOX = np.array([40.0, 50.0, 420.0, 380.0])


def invoke(args: list[str]):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def registry_model(model_type: str, checkpoint: Path) -> torch.nn.Module:
    """segment_anything_hq's own model from `checkpoint`, eval mode, as its README loads one."""
    with contextlib.redirect_stdout(io.StringIO()):  # its builders print load_state_dict's result
        sam = sam_model_registry[model_type.removeprefix("hq_")](checkpoint=str(checkpoint))
    return sam.eval()  # again after loading: TinyViT's eval-mode attention biases are copied by .eval()


def hq_pipeline(root: Path, model_type: str, pages: int) -> Path:
    """ROOT/ds (stamps pages), ROOT/weights.pth (seeded random, official layout), ROOT/cache (embedded
    through the CLI) and ROOT/run (one epoch of `samcache train`, its default parts)."""
    from samcache.data.stamps import generate_stamps

    fractions = (1 / 3, 1 / 3, 1 / 3) if pages == 3 else (0.5, 0.5, 0.0)
    generate_stamps(root / "ds", pages, seed=2, progress=False, fractions=fractions)
    torch.save(build_seeded(model_type, 0).state_dict(), root / "weights.pth")
    invoke(["embed", root / "ds", "--out", root / "cache", "--model", model_type, "--checkpoint", root / "weights.pth",
            *HQ_EMBED_FLAGS])
    invoke(["train", root / "cache", "--out", root / "run", "--checkpoint", root / "weights.pth", *HQ_TRAIN_FLAGS])
    return root


@pytest.fixture(scope="module")
def hq_tiny(tmp_path_factory) -> Path:
    """3 stamps pages (train, val, test) embedded by a random hq_vit_tiny and a run trained on them."""
    root = hq_pipeline(tmp_path_factory.mktemp("hq_tiny"), "hq_vit_tiny", 3)
    with left_unchanged(root, "hq_vit_tiny pipeline"):
        yield root


def stored_features(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    """{image name: {dataset: its (C, 64, 64) array}} of every image in the cache's shards."""
    out = {}
    for shard in sorted((cache / "shards").glob("*.h5")):
        with h5py.File(shard, "r") as f:
            for row, name in enumerate(f["images/name"][:]):
                out[name.decode() if isinstance(name, bytes) else name] = {
                    key: f[key][row] for key in f if isinstance(f[key], h5py.Dataset)}
    return out


def set_features(predictor: SamPredictor, stored: dict[str, np.ndarray], image: np.ndarray) -> None:
    """set_image's state from the cache's arrays (what samcache decodes), with no encoder run."""
    predictor.features = torch.from_numpy(stored["embeddings"].astype(np.float32))[None]
    predictor.interm_features = [torch.from_numpy(stored["early_features"].astype(np.float32))[None]
                                 .permute(0, 2, 3, 1)]
    predictor.original_size = image.shape[:2]
    predictor.input_size = tuple(predictor.transform.get_preprocess_shape(*image.shape[:2], 1024))
    predictor.is_image_set = True


# ------------------------------------------------------------------------------------------ decoder
def _prompt(box=None, point=None) -> Prompt:
    points, labels = np.zeros((MAX_POINTS, 2), np.float32), np.full(MAX_POINTS, -1, np.int64)
    if point is not None:
        points[0], labels[0] = point, 1
    return Prompt(np.array(box if box is not None else [0, 0, 0, 0], np.float32), points, labels, box is not None)


@pytest.mark.parametrize("model_type", ["hq_vit_tiny", "hq_vit_b"])
def test_decoder_matches_mask_decoder_hq(model_type):
    sam = build_seeded(model_type, 0)
    family = family_of(model_type)
    decoder = family.decoder(sam, model_type)
    features = torch.randn((2, *family.layout_of(model_type).feature_shape), generator=torch.Generator().manual_seed(1))
    # (image, prompt): boxes and single points on both images, interleaved
    prompts = [(0, _prompt(box=[100, 120, 600, 700])), (1, _prompt(point=[700, 200])), (0, _prompt(point=[300, 400])),
               (1, _prompt(box=[10, 20, 900, 500])), (1, _prompt(box=[400, 400, 1000, 800])),
               (0, _prompt(box=[50, 60, 200, 300]))]
    batch = PromptBatch.from_prompts([p for _, p in prompts], torch.tensor([row for row, _ in prompts]))
    with torch.no_grad():
        output = decoder(features, batch)
        chosen, chosen_iou = choose_mask(output, batch.multimask)

        pe, d = sam.prompt_encoder, sam.mask_decoder
        checked = 0
        for row in range(2):
            for is_box in (True, False):
                select = [n for n, (r, p) in enumerate(prompts) if r == row and p.is_box == is_box]
                if is_box:
                    boxes = torch.from_numpy(np.stack([prompts[n][1].box for n in select]))
                    sparse, dense = pe(points=None, boxes=boxes, masks=None)
                else:
                    points = torch.from_numpy(np.stack([prompts[n][1].points[:1] for n in select]))
                    sparse, dense = pe(points=(points, torch.ones(len(select), 1, dtype=torch.int)), boxes=None,
                                       masks=None)
                inputs = dict(image_embeddings=features[row : row + 1, :256], image_pe=pe.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                              multimask_output=not is_box,
                              interm_embeddings=[features[row : row + 1, 256:].permute(0, 2, 3, 1)])
                expected, expected_iou = d(**inputs, hq_token_only=False)
                expected_hq, _ = d(**inputs, hq_token_only=True)
                torch.testing.assert_close(chosen[select], expected[:, 0], atol=1e-4, rtol=0)
                torch.testing.assert_close(chosen_iou[select], expected_iou[:, 0], atol=1e-5, rtol=0)
                torch.testing.assert_close(output.hq_logits[select], expected_hq, atol=1e-4, rtol=0)
                checked += len(select)
    assert checked == len(prompts)
    # the HQ token's mask is its own term: SAM's chosen mask differs from it
    assert (chosen - output.hq_logits[:, 0]).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- loss
def _reference_points(logits: torch.Tensor, rng_state: torch.Tensor) -> torch.Tensor:
    """SAM-HQ's get_uncertain_point_coords_with_randomness (112 x 112 points, oversampled 3x, 3/4
    uncertain), on the global generator set to `rng_state`."""
    torch.set_rng_state(rng_state)
    num_points, num_boxes = 112 * 112, logits.shape[0]
    num_sampled = int(num_points * 3.0)
    coords = torch.rand(num_boxes, num_sampled, 2)
    uncertainty = -F.grid_sample(logits, 2.0 * coords.unsqueeze(2) - 1.0, align_corners=False).squeeze(3).abs()
    num_uncertain = int(0.75 * num_points)
    idx = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1)[1]
    idx += num_sampled * torch.arange(num_boxes)[:, None]
    coords = coords.view(-1, 2)[idx.view(-1), :].view(num_boxes, num_uncertain, 2)
    return torch.cat([coords, torch.rand(num_boxes, num_points - num_uncertain, 2)], dim=1)


def _reference_loss(logits: torch.Tensor, targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """SAM-HQ's loss_masks at `coords`: sigmoid BCE (mean over the points) + dice, each summed over
    the masks and divided by their number."""
    def sample(x):
        return F.grid_sample(x, 2.0 * coords.unsqueeze(2) - 1.0, align_corners=False).squeeze(3).squeeze(1)

    point_logits, point_labels = sample(logits), sample(targets.unsqueeze(1))
    bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1).sum()
    p = point_logits.sigmoid()
    dice = (1 - (2 * (p * point_labels).sum(-1) + 1) / (p.sum(-1) + point_labels.sum(-1) + 1)).sum()
    return (bce + dice) / logits.shape[0]


def _loss_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(3, 1, 256, 256, generator=g)
    targets = torch.zeros(3, 256, 256)
    targets[0, 40:200, 30:120] = 1
    targets[1, 100:140, 10:250] = 1
    targets[2, 5:60, 200:256] = 0.5  # a coverage map: edge pixels of a resized mask
    return logits, targets


def test_sam_hq_loss_is_sam_hq_loss_masks(monkeypatch):
    import samcache.models.sam_hq as sam_hq

    logits, targets = _loss_inputs()
    drawn = []
    uncertain_points = sam_hq.uncertain_points

    def recording(logits_, generator, **kwargs):
        drawn.append(generator.get_state())  # the generator's state before it draws
        return uncertain_points(logits_, generator, **kwargs)

    monkeypatch.setattr(sam_hq, "uncertain_points", recording)
    parts = sam_hq_loss(logits, targets)
    assert len(drawn) == 1
    with torch.random.fork_rng(devices=[]):
        expected = _reference_loss(logits, targets, _reference_points(logits, drawn[0]))
    torch.testing.assert_close(parts.total, expected, atol=1e-5, rtol=1e-5)
    assert parts.iou.item() == 0  # no IoU term: SAM-HQ keeps SAM's IoU head frozen
    rows = [((logits[i, 0] > 0) & (targets[i] > 0.5)).sum() / ((logits[i, 0] > 0) | (targets[i] > 0.5)).sum()
            for i in range(3)]
    torch.testing.assert_close(parts.train_iou, torch.stack(rows).mean())


def test_sam_hq_loss_points_depend_only_on_the_batch():
    logits, targets = _loss_inputs()
    torch.manual_seed(1)
    first = sam_hq_loss(logits, targets).total
    state = torch.get_rng_state()
    torch.manual_seed(2)
    second = sam_hq_loss(logits, targets).total
    assert first.item() == second.item()
    torch.manual_seed(2)
    sam_hq_loss(logits, targets)
    torch.manual_seed(1)
    sam_hq_loss(logits, targets)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    # another batch draws other points: a loss that ignored them would not change
    other_logits, _ = _loss_inputs(seed=5)
    assert sam_hq_loss(other_logits, targets).total.item() != first.item()


def test_sam_hq_loss_gradient_reaches_only_the_hq_parts():
    sam = build_seeded("hq_vit_tiny", 0)
    family = family_of("hq_vit_tiny")
    for part in ("prompt_encoder", "mask_decoder"):  # as the trainer freezes, then unfreezes --train's parts
        getattr(sam, part).requires_grad_(False)
    for module in family.trainable_modules(sam, "hq_head"):
        module.requires_grad_(True)
    decoder = family.decoder(sam, "hq_vit_tiny").train()
    features = torch.randn((1, *family.layout_of("hq_vit_tiny").feature_shape),
                           generator=torch.Generator().manual_seed(0))
    batch = PromptBatch.from_prompts([_prompt(box=[100, 120, 600, 700]), _prompt(point=[300, 400])],
                                     torch.zeros(2, dtype=torch.long))
    output = decoder(features, batch)
    targets = torch.zeros(2, 256, 256)
    targets[:, 30:180, 25:150] = 1
    decoder.loss(output, targets, batch.multimask, "sam").total.backward()

    grads = {name: p.grad for name, p in decoder.named_parameters()}
    hq = {name for name in grads if name.split(".")[1] in HQ_PARTS}
    assert {name.split(".")[1] for name in hq} == set(HQ_PARTS)
    assert all(grads[name] is not None and grads[name].abs().sum() > 0 for name in hq), \
        [name for name in hq if grads[name] is None]
    assert [name for name in grads if name not in hq and grads[name] is not None] == []


# -------------------------------------------------------------------------------------------- cache
def test_embed_caches_embedding_and_early_feature_as_sam_hq_predictor(hq_tiny):
    info = CliRunner().invoke(main, ["info", str(hq_tiny / "cache")])
    assert info.exit_code == 0, info.output
    assert "model hq_vit_tiny" in info.output
    assert "float16 embeddings 256x64x64, early_features 160x64x64" in info.output

    stored = stored_features(hq_tiny / "cache")
    assert sorted(stored) == sorted(p.name for p in (hq_tiny / "ds" / "images").iterdir())
    for arrays in stored.values():
        assert arrays["embeddings"].shape == (256, 64, 64) and arrays["embeddings"].dtype == np.float16
        assert arrays["early_features"].shape == (160, 64, 64) and arrays["early_features"].dtype == np.float16

    predictor = SamPredictor(registry_model("hq_vit_tiny", hq_tiny / "weights.pth"))
    for name in sorted(stored)[:1]:  # one image: the encoder costs seconds
        predictor.set_image(read_image(hq_tiny / "ds" / "images" / name))
        expected = {"embeddings": predictor.features[0],
                    "early_features": predictor.interm_features[0][0].permute(2, 0, 1)}
        for key, tensor in expected.items():
            got = torch.from_numpy(stored[name][key].astype(np.float32))
            # fp16 storage: a relative rounding of 2^-11, plus fp16's subnormal step near 0
            torch.testing.assert_close(got, tensor, rtol=2**-10, atol=1e-6, msg=f"{name} {key}")


@pytest.mark.slow
def test_openvino_embeds_both_maps_as_torch_does(hq_tiny, tmp_path, monkeypatch):
    """The OpenVINO backend converts SAM-HQ's encoder with its two outputs packed into one, and caches
    both maps as the torch backend does (a conversion: seconds for hq_vit_tiny, a minute for hq_vit_b)."""
    monkeypatch.setenv("SAMCACHE_HOME", str(tmp_path / "home"))
    cache = tmp_path / "cache_ov"
    flags = [f for f in HQ_EMBED_FLAGS if f not in ("--backend", "torch")]
    invoke(["embed", hq_tiny / "ds", "--out", cache, "--model", "hq_vit_tiny", "--checkpoint",
            hq_tiny / "weights.pth", *flags, "--backend", "openvino"])
    assert list((tmp_path / "home" / "openvino").glob("hq_vit_tiny-*-encoder-*.xml"))
    ours, reference = stored_features(cache), stored_features(hq_tiny / "cache")
    assert sorted(ours) == sorted(reference)
    for name, arrays in ours.items():
        for key in ("embeddings", "early_features"):
            a, b = arrays[key].astype(np.float32).ravel(), reference[name][key].astype(np.float32).ravel()
            assert a.shape == b.shape, key
            cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            assert cosine > 0.999, (name, key, cosine)


# -------------------------------------------------------------------------------------------- train
def _changed(run_checkpoint: Path, base: dict[str, torch.Tensor]) -> set[str]:
    state = RunCheckpoint.read(run_checkpoint).state_dict
    assert state.keys() <= base.keys()
    assert {k.split(".")[0] for k in state} == {"prompt_encoder", "mask_decoder"}
    return {key for key, tensor in state.items() if not torch.equal(tensor, base[key])}


def _hq_key(key: str) -> bool:
    return key.startswith("mask_decoder.") and key.split(".")[1] in HQ_PARTS


def test_train_changes_only_the_hq_parts(hq_tiny, tmp_path):
    base = torch.load(hq_tiny / "weights.pth", weights_only=True)
    for which in ("best", "last"):
        changed = _changed(hq_tiny / "run" / f"{which}.pt", base)
        assert changed and all(_hq_key(k) for k in changed), sorted(k for k in changed if not _hq_key(k))[:5]
        assert {k.split(".")[1] for k in changed} == set(HQ_PARTS)  # every HQ part trained
    assert RunCheckpoint.read(hq_tiny / "run" / "best.pt").trained == ["hq_head"]

    run = tmp_path / "run_with_decoder"
    invoke(["train", hq_tiny / "cache", "--out", run, "--checkpoint", hq_tiny / "weights.pth", *HQ_TRAIN_FLAGS,
            "--train", "hq_head,mask_decoder"])
    changed = _changed(run / "last.pt", base)
    assert {k.split(".")[1] for k in changed if _hq_key(k)} == set(HQ_PARTS)
    sam_decoder = {k for k in changed if not _hq_key(k)}
    assert any(k.startswith("mask_decoder.transformer.") for k in sam_decoder), sorted(changed)[:5]
    assert not any(k.startswith("prompt_encoder.") for k in changed)
    assert RunCheckpoint.read(run / "last.pt").trained == ["hq_head", "mask_decoder"]


def test_train_hq_head_refused_for_a_model_without_one(stamps_cache, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(stamps_cache), "--out", str(run), "--train", "hq_head",
                                       "--epochs", "1", "--workers", "0"])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "hq_head" in lines[0] and "SAM-HQ" in lines[0] and "micro" in lines[0], lines[0]
    assert "mask_decoder" in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not run.exists()  # refused before the run folder is made


# --------------------------------------------------------------------------------------------- eval
def _reference_miou(sam: torch.nn.Module, root: Path, split: str) -> float:
    """mIoU of segment_anything_hq's predictor over `split`'s objects, exact box prompts, from the
    cache's features (what samcache evaluates from)."""
    coco = json.loads((root / "ds" / f"{split}.json").read_text())
    stored = stored_features(root / "cache")
    predictor, files = SamPredictor(sam), {im["id"]: im["file_name"] for im in coco["images"]}
    ious = []
    for ann in coco["annotations"]:
        name = Path(files[ann["image_id"]]).name
        truth = masks.decode(ann["segmentation"])
        set_features(predictor, stored[name], truth)
        x, y, w, h = ann["bbox"]
        mask = predictor.predict(box=np.array([x, y, x + w, y + h]), multimask_output=False)[0][0]
        ious.append((mask & truth).sum() / max((mask | truth).sum(), 1))
    assert ious
    return float(np.mean(ious))


def test_eval_reports_zero_shot_sam_hq_and_fine_tuned(hq_tiny, tmp_path):
    out, run = tmp_path / "report", copy_tree(hq_tiny / "run", tmp_path / "run")  # eval records itself in the run
    invoke(["eval", hq_tiny / "cache", "--run", run, "--out", out, "--split", "test"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_type"] == "hq_vit_tiny"
    for model in ("zero_shot", "fine_tuned"):
        assert summary[model]["objects"] == len(json.loads((hq_tiny / "ds" / "test.json").read_text())["annotations"])
        assert 0 <= summary[model]["boundary_f"] <= 1

    base = registry_model("hq_vit_tiny", hq_tiny / "weights.pth")
    assert summary["zero_shot"]["miou"] == pytest.approx(_reference_miou(base, hq_tiny, "test"), abs=2e-3)
    base.load_state_dict(RunCheckpoint.read(run / "best.pt").state_dict, strict=False)
    assert summary["fine_tuned"]["miou"] == pytest.approx(_reference_miou(base, hq_tiny, "test"), abs=2e-3)
    assert "zero-shot SAM-HQ (vit_tiny)" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------- export and predict
def _predicted_mask(image: Path, exported: Path, out: Path, *extra) -> tuple[np.ndarray, str]:
    invoke(["predict", image, "--checkpoint", exported, "--box", ",".join(map(str, BOX)), "--out", out, *extra])
    prediction = json.loads((out / "predictions.json").read_text())["predictions"][0]
    return masks.decode(prediction["segmentation"]), prediction["embedding_from"]


def check_export_matches_predict(root: Path, model_type: str, tmp_path: Path, *, new_image: bool) -> None:
    """Exports root/run, loads it with segment_anything_hq's registry and SamPredictor, and compares
    its masks from the raw image with `samcache predict`'s from the cache (and from the encoder on an
    image the cache does not hold)."""
    exported = tmp_path / f"sam_hq_{model_type}.pth"
    invoke(["export", "--run", root / "run", "--out", exported])
    metadata = json.loads(exported.with_suffix(".json").read_text())
    then = ", then .eval()" if model_type == "hq_vit_tiny" else ""  # TinyViT: biases copied at .eval()
    assert metadata["load_with"] == (f"segment_anything_hq.sam_model_registry['{model_type[3:]}'](checkpoint=FILE)"
                                     f"{then}")
    assert metadata["fine_tuned"] == ["hq_head"]

    predictor = SamPredictor(registry_model(model_type, exported))
    image_path = sorted((root / "ds" / "images").glob("*.jpg"))[0]
    predictor.set_image(read_image(image_path))
    expected = predictor.predict(box=BOX, multimask_output=False)[0][0]
    assert 0 < expected.mean() < 1
    got, source = _predicted_mask(image_path, exported, tmp_path / "from_cache", "--cache", root / "cache")
    assert source == "cache"
    assert (got == expected).mean() >= 0.995  # fp16 storage: a few pixels at the mask's edge

    if new_image:  # not in the cache: `samcache predict` runs the HQ encoder itself
        import cv2

        page = cv2.imread(str(image_path))
        new_path = tmp_path / "new_page.png"
        cv2.imwrite(str(new_path), np.ascontiguousarray(page[::-1, ::-1]))
        predictor.set_image(read_image(new_path))
        expected = predictor.predict(box=BOX, multimask_output=False)[0][0]
        got, source = _predicted_mask(new_path, exported, tmp_path / "new", "--cache", root / "cache")
        assert source == "encoder"
        assert (got == expected).mean() == 1.0


def test_export_loads_in_segment_anything_hq_and_matches_predict(hq_tiny, tmp_path):
    check_export_matches_predict(hq_tiny, "hq_vit_tiny", tmp_path, new_image=True)


def test_export_onnx_refused(hq_tiny, tmp_path):
    out = tmp_path / "hq.onnx"
    result = CliRunner().invoke(main, ["export", "--run", str(hq_tiny / "run"), "--out", str(out), "--format", "onnx"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "onnx" in lines[0] and "hq_vit_tiny" in lines[0] and "--format pth" in lines[0], \
        result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_hq_vit_b_export_loads_in_segment_anything_hq_and_matches_predict(tmp_path_factory, tmp_path):
    root = hq_pipeline(tmp_path_factory.mktemp("hq_vit_b"), "hq_vit_b", 2)
    check_export_matches_predict(root, "hq_vit_b", tmp_path, new_image=False)
