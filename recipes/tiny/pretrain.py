"""Pretrains the tiny model end to end on synthetic shapes: samcache's own small pretrained SAM.

SAM's real weights cannot be shipped or downloaded everywhere, so the offline demo needs a
model of SAM's architecture that has learnt *something* about objects. `pretrain_tiny`
trains all of `tiny` (its convolutional image encoder, SAM's prompt encoder and mask decoder)
on images drawn on the fly by `recipes.tiny.shapes` (never the stamps domain), with box
prompts jittered as SAM's training does and single-point prompts, using the same
preprocessing as `samcache embed`, the same batched decoder, loss and click simulation as
`samcache train`, and the same inference path (inference.py) as `samcache eval`. It ends with
a fixed, seeded held-out evaluation and writes:

    OUT.safetensors   the full state dict (Meta's key layout), stored as float16
    OUT.json          provenance: config, seed, steps, wall time, CPU, torch, figures, SHA-256

A step (`pretrain_step`): the encoder once for the image; each of its prompts decoded, then
decoded again with its own previous mask as the mask prompt (half the time with a corrective
point), so the prompt encoder's mask path learns what SamPredictor's `mask_input` and
`--prompt interactive` feed it; and a dense auxiliary loss (`DenseHead`) on every pixel.
The run checkpoints (`checkpoint=`) and continues exactly from its last checkpoint: every
image and draw is a function of (seed, index), and the loader restarts at the next step.

Why these choices (measured on 2-core CPUs; the recipe is tiny/recipe.py):
- The model input is always the 1024 px padded square, so the cost of a step does not depend
  on how large the shapes image is drawn; images are drawn with their longest side in
  512-1024 px and upsampled by the predictor's resize, like the scans and photos samcache sees.
- The mask decoder costs about as much per prompt as the encoder per image, so a few prompts
  per image (not all objects) give the best quality per second; the dense head gives the
  encoder a gradient everywhere in the image for almost nothing.
- bf16 autocast on CPUs with AMX: the convolutional encoder's forward and backward took 0.64 s
  in bf16 against 1.4-2.7 s in fp32 (fp32 depthwise backward is slow). (The first tiny's ViT
  trained faster in fp32 on an AVX512-BF16 AMD CPU: measure on yours, `precision`.)
- `dice-bce` because SAM's focal-heavy loss collapses to background from random weights.
- float16 storage halves the file; the held-out figures are measured on the float16 weights
  as written, so they are the shipped model's figures.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from recipes.tiny.shapes import ShapesSettings, render_shapes
from samcache import __version__
from samcache.config import LOSSES, PromptSettings
from samcache.data import masks
from samcache.data.metrics import iou
from samcache.devices import autocast, cpu_name
from samcache.errors import TrainingError
from samcache.fileio import sha256_file
from samcache.models.decoder import compute_loss, decode, dice_loss
from samcache.models.families import family_of
from samcache.models.preprocess import batch_to_model_input, input_size, resize_image
from samcache.models.prompts import (
    PromptBatch,
    evaluation_prompt,
    low_res_size,
    low_res_target,
    rng_for,
    training_prompt,
)
from samcache.models.weights import build_tiny, load_weights_into, read_state_dict
from samcache.progress import progress_bar
from samcache.train.inference import predict_masks
from samcache.train.interactive import ClickSimulation
from samcache.train.samples import ClickSchedules
from samcache.train.step import NonFiniteLoss
from samcache.train.trainer import set_learning_rate, warmup_cosine

CPU = torch.device("cpu")

PRECISIONS = ("fp32", "bf16")
PROVENANCE_STATEMENT = (
    "This is samcache's own 'tiny' model (SAM's prompt encoder and mask decoder architecture with a "
    "small convolutional image encoder), trained by samcache on synthetic shapes images only (no "
    "stamps, nothing drawn to resemble an evaluation set). It is NOT Meta's Segment Anything model "
    "and contains none of Meta's weights."
)


@dataclass
class PretrainConfig:
    """Options of the tiny model's pretraining (scripts/pretrain_tiny.py)."""

    steps: int = 800
    """Optimizer steps; each sees `batch_size` freshly drawn images."""
    batch_size: int = 1
    """Images per step."""
    prompts_per_image: int = 8
    """Prompts per image and step: its objects in random order, cycled (new jitter or point) when
    the image has fewer; the encoder runs once per image, so more prompts make it cheaper per prompt."""
    point_ratio: float = 0.3
    """Probability that a prompt is a single positive point rather than a jittered box."""
    lr: float = 8e-4
    """Peak AdamW learning rate (the image encoder's is `encoder_lr_scale` x this)."""
    encoder_lr_scale: float = 1.0
    """The image encoder's learning rate as a fraction of `lr`: lower it when the decoder starts
    trained (`init_weights`), so the encoder adapts without pulling the decoder's inputs away."""
    init_weights: Optional[str] = None
    """A full tiny state dict to start from (e.g. the decoder warm-up's export); None: build_tiny(seed)."""
    init_decoder: Optional[str] = None
    """A tiny state dict whose prompt encoder and mask decoder start this run (the image encoder
    keeps its random initialisation): a decoder that already knows prompts gives a new encoder
    a useful gradient from the first step."""
    feedback_passes: int = 1
    """Decoder passes after the first, each with the previous pass's logits as the mask prompt
    (detached, as `samcache train --prompt interactive`), so the mask path learns what SamPredictor's
    mask_input and the interactive recipe feed it; 0: box and point prompts only."""
    feedback_point_prob: float = 0.5
    """Probability that a feedback pass also adds a corrective point from the previous error
    (else it refines from the mask prompt alone)."""
    dense_weight: float = 1.0
    """Weight of the auxiliary dense loss: a linear head on the embedding predicts every object's
    footprint and outline at 256x256. It trains the encoder at every pixel, not only where the
    few prompted objects are, and is dropped from the shipped weights; 0: no head."""
    checkpoint_every: int = 100
    """Steps between resumable checkpoints (pretrain_tiny's `checkpoint`)."""
    stop_after: Optional[int] = None
    """End the run after this many steps, the learning-rate schedule still that of `steps`: a
    run whose time budget ran out is finished from its last checkpoint (`stop_after` = that
    checkpoint's step), and says so in its provenance. None: all `steps`."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    warmup_steps: int = 40
    """Linear warmup from 0 to `lr`, then cosine decay to `min_lr_ratio` x `lr` at the last step."""
    min_lr_ratio: float = 0.05
    """The learning rate at the last step, as a fraction of `lr`."""
    grad_clip: float = 1.0
    """Global gradient norm clip."""
    loss: str = "dice-bce"
    """Loss (see decoder.compute_loss); `sam` collapses to background from random weights."""
    precision: str = "fp32"
    """"fp32", or "bf16" autocast for the forward pass."""
    seed: int = 0
    """Seeds the initial weights (build_tiny(seed)) and the training images (shapes seed)."""
    eval_seed: int = 20240607
    """Seed of the held-out images; training images use `seed`, so the sets never coincide."""
    eval_images: int = 24
    """Held-out images evaluated at the end (every annotated object, box and point prompts)."""
    eval_at_start: bool = False
    """Also evaluate the random initial weights (for the record; costs one more evaluation)."""
    workers: int = 1
    """DataLoader processes drawing images; the main process keeps the cores for training."""
    threads: Optional[int] = None
    """torch intra-op threads (None: torch's default)."""
    shapes: ShapesSettings = field(default_factory=ShapesSettings)
    """How shapes images are drawn (tiny.shapes.ShapesSettings)."""

    def __post_init__(self):
        if isinstance(self.shapes, dict):
            self.shapes = ShapesSettings(**self.shapes)
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(f"stop_after must be in [1, steps], got {self.stop_after}")
        if self.feedback_passes < 0 or self.checkpoint_every < 1:
            raise ValueError("feedback_passes must be >= 0 and checkpoint_every >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.steps < 1 or self.batch_size < 1 or self.prompts_per_image < 1:
            raise ValueError("steps, batch_size and prompts_per_image must be at least 1")
        if not 0.0 <= self.point_ratio <= 1.0:
            raise ValueError(f"point_ratio must be in [0, 1], got {self.point_ratio}")
        if self.seed == self.eval_seed:
            raise ValueError("seed and eval_seed must differ, or the held-out images would be training images")


@dataclass
class PretrainResult:
    """What a pretraining run produced.

    Arguments:
      weights: the safetensors file; provenance: the JSON beside it.
      sha256: SHA-256 of the weights file (what caches made with it record).
      box_miou, point_miou: held-out mIoU with exact-box and most-interior-point prompts.
      steps, images, wall_s: optimizer steps, training images seen, wall time of the whole run.
    """

    weights: Path
    provenance: Path
    sha256: str
    box_miou: float
    point_miou: float
    steps: int
    images: int
    wall_s: float


# --------------------------------------------------------------------------- data


@dataclass
class _Item:
    image: torch.Tensor  # resized uint8 (h, w, 3)
    prompts: list
    targets: np.ndarray  # (K, 256, 256) float32
    draws: np.ndarray  # (K, 3, passes) float32: the feedback passes' draws (interactive.ClickSimulation)
    valid_size: tuple[int, int]  # the image's part of the 256x256 frame
    dense: np.ndarray  # (2, 256, 256) float32: every object's footprint, and their outlines


class ShapesPrompts(Dataset):
    """Item i: shapes image i of `seed`, resized for the encoder, with up to K prompted objects.

    Objects, prompts and feedback draws come from a generator seeded by (seed, i), so the data
    of a run is the same for any number of workers and a resumed run sees what it would have.
    """

    def __init__(self, *, seed: int, length: int, prompts_per_image: int, prompt_settings: PromptSettings,
                 shapes: ShapesSettings, feedback_passes: int = 0, feedback_point_prob: float = 0.5):
        self.seed, self.length, self.k = seed, length, prompts_per_image
        self.prompt_settings, self.shapes = prompt_settings, shapes
        self.passes, self.point_prob = 1 + feedback_passes, feedback_point_prob

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> _Item:
        drawn = render_shapes(self.seed, index, self.shapes)
        while not drawn.masks:  # every object hidden: rare; draw the next image of another stream
            index += self.length
            drawn = render_shapes(self.seed, index, self.shapes)
        original = drawn.image.shape[:2]
        resized = input_size(original)
        rng = rng_for(self.seed, index, 1)
        # Always K prompts: objects in a random order, cycled when the image has fewer than K, so
        # one encoder pass (the expensive part) serves K decoder prompts with fresh jitter/points.
        order = rng.permutation(len(drawn.masks))
        rles = [masks.encode(m) for m in drawn.masks]
        low_res = {j: low_res_target(rles[j], resized) for j in range(len(rles))}
        prompts, targets = [], []
        for n in range(self.k):
            j = int(order[n % len(order)])
            prompts.append(training_prompt(rles[j], masks.bbox_xyxy(rles[j]), original, self.prompt_settings, rng))
            targets.append(low_res[j])
        # Pass 0 is the prompt itself; every later pass takes the mask prompt, and a corrective point
        # with probability point_prob (ClickSimulation's rows: adds_point, uses_mask, pick).
        draws = np.zeros((self.k, 3, self.passes), np.float32)
        if self.passes > 1:
            draws[:, 0, 1:] = rng.random((self.k, self.passes - 1)) < self.point_prob
            draws[:, 1, 1:] = 1.0
            draws[:, 2, 1:] = rng.random((self.k, self.passes - 1))
        return _Item(torch.from_numpy(resize_image(drawn.image)), prompts, np.stack(targets), draws,
                     low_res_size(resized), _dense_targets(list(low_res.values())))


def _dense_targets(low_res: list[np.ndarray]) -> np.ndarray:
    """(2, 256, 256): the union of the objects' footprints, and their outlines (one low-res pixel
    wide on each side of every footprint's edge, so touching objects are told apart)."""
    footprints = [(m > 0.5).astype(np.uint8) for m in low_res]
    union = np.maximum.reduce(footprints)
    kernel = np.ones((3, 3), np.uint8)
    outlines = np.maximum.reduce([cv2.dilate(f, kernel) - cv2.erode(f, kernel) for f in footprints])
    return np.stack([union, outlines]).astype(np.float32)


@dataclass
class _Batch:
    images: list[torch.Tensor]
    prompts: PromptBatch
    targets: torch.Tensor
    schedules: ClickSchedules
    dense: torch.Tensor


def _collate(items: list[_Item]) -> _Batch:
    batch = PromptBatch.from_prompts([p for item in items for p in item.prompts],
                                     torch.tensor([b for b, item in enumerate(items) for _ in item.prompts]))
    schedules = ClickSchedules(torch.from_numpy(np.concatenate([i.draws for i in items])),
                               torch.tensor([i.valid_size for i in items for _ in i.prompts], dtype=torch.long))
    return _Batch([item.image for item in items], batch, torch.from_numpy(np.concatenate([i.targets for i in items])),
                  schedules, torch.from_numpy(np.stack([i.dense for i in items])))


class DenseHead(nn.Module):
    """Pretraining only: a linear map from each embedding pixel to a 4x4 patch of two logit maps
    (footprint, outline) at 256x256. Being linear, it can only read what the embedding already
    holds, so its loss makes the encoder put sub-patch shape detail into the embedding."""

    def __init__(self, *, channels: int = 256, outputs: int = 2, upscale: int = 4) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, outputs * upscale * upscale, 1)
        self.shuffle = nn.PixelShuffle(upscale)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(embedding))


def dense_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE + dice per map, averaged: outlines are a few percent of the pixels."""
    foreground = target.flatten(-2).mean(-1).clamp(1e-3, 1 - 1e-3)
    pos_weight = ((1 - foreground) / foreground)[..., None, None]
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    return (bce.flatten(-2).mean(-1) * 0.5 / (1 - foreground) + dice_loss(logits, target)).mean()


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Warmup, then cosine down to `min_lr_ratio` x `lr` at the last step; `step` counts from 0."""
    return warmup_cosine(step, peak=config.lr, warmup_steps=config.warmup_steps, end_step=config.steps - 1,
                         floor=config.lr * config.min_lr_ratio)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_shapes(sam, *, seed: int, images: int, shapes: ShapesSettings = ShapesSettings(),
                    precision: str = "fp32") -> dict:
    """Held-out mIoU of `sam` on shapes images 0..images-1 of `seed`, at original resolution.

    Every annotated object is prompted twice, with its exact box and with its most interior
    point (the prompts `samcache eval` uses). Returns {"box_miou", "point_miou", "objects", "images"}.
    """
    sam.eval()
    scores: dict[str, list[float]] = {"box": [], "point": []}
    for index in range(images):
        drawn = render_shapes(seed, index, shapes)
        if not drawn.masks:
            continue
        original = drawn.image.shape[:2]
        x = batch_to_model_input([torch.from_numpy(resize_image(drawn.image))])
        with autocast(CPU, precision):
            embedding = sam.image_encoder(x).float()
        rles = [masks.encode(m) for m in drawn.masks]
        for mode in ("box", "point"):
            prompts = [evaluation_prompt(r, masks.bbox_xyxy(r), original, mode) for r in rles]
            batch = PromptBatch.from_prompts(prompts, torch.zeros(len(prompts), dtype=torch.long))
            predictions = predict_masks(family_of("tiny").decoder(sam, "tiny"), embedding, batch,
                                        [(input_size(original), original)], precision=precision)
            scores[mode] += [iou(p.mask, m) for p, m in zip(predictions, drawn.masks)]
    return {
        "box_miou": float(np.mean(scores["box"])) if scores["box"] else float("nan"),
        "point_miou": float(np.mean(scores["point"])) if scores["point"] else float("nan"),
        "objects": len(scores["box"]),
        "images": images,
    }


# --------------------------------------------------------------------------- training


def pretrain_tiny(config: PretrainConfig, out_path: str | Path, *, progress: bool = True,
                  command: Optional[str] = None, stages: Optional[dict] = None,
                  checkpoint: Optional[str | Path] = None) -> PretrainResult:
    """Trains `tiny` end to end on shapes and writes OUT.safetensors + OUT.json (see module doc).

    Arguments:
      config: the recipe.
      out_path: the weights file to write; a `.safetensors` suffix is added when missing.
      progress: show a progress bar with images/s.
      command: the command line to record in the provenance (default: sys.argv).
      stages: what came before this run (e.g. the decoder warm-up that made `init_weights`),
        recorded in the provenance as it is.
      checkpoint: a file the run saves to every `config.checkpoint_every` steps and resumes from
        when it exists (same config required); None: no checkpoints.
    """
    started = time.time()
    load_start = _load_average()
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        out_path = out_path.with_name(out_path.name + ".safetensors")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)

    sam = _initial_model(config)
    initial = None
    if config.eval_at_start:
        initial = evaluate_shapes(sam, seed=config.eval_seed, images=config.eval_images, shapes=config.shapes,
                                  precision=config.precision)
    history, train_s = _train(sam, config, progress=progress,
                              checkpoint=None if checkpoint is None else Path(checkpoint))

    # Write float16, then evaluate the file as written: the figures are the shipped model's.
    digest = _write_weights(sam, out_path)
    shipped = build_tiny(config.seed)
    load_weights_into(shipped, read_state_dict(out_path), model_type="tiny", source=out_path)
    final = evaluate_shapes(shipped, seed=config.eval_seed, images=config.eval_images, shapes=config.shapes,
                            precision=config.precision)
    wall = time.time() - started
    steps_done = config.steps if config.stop_after is None else config.stop_after
    images_seen = steps_done * config.batch_size
    provenance = _provenance(config, out_path, digest, command=command, stages=stages, history=history,
                             initial=initial, final=final, train_s=train_s, wall_s=wall, load_start=load_start)
    provenance_path = out_path.with_suffix(".json")
    provenance_path.write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    if progress:
        print(f"pretrained tiny: {steps_done} steps, {images_seen} images in {train_s / 60:.1f} min "
              f"({images_seen / train_s:.2f} img/s); held-out mIoU box {final['box_miou']:.4f}, "
              f"point {final['point_miou']:.4f} ({final['objects']} objects); {out_path} sha256 {digest[:12]}",
              file=sys.stderr)
    return PretrainResult(out_path, provenance_path, digest, final["box_miou"], final["point_miou"],
                          steps_done, images_seen, wall)


def _initial_model(config: PretrainConfig):
    """The architecture with `init_weights` (everything) or `init_decoder` (prompt side) loaded."""
    sam = build_tiny(config.seed)
    if config.init_weights:
        load_weights_into(sam, read_state_dict(config.init_weights), model_type="tiny", source=config.init_weights)
    if config.init_decoder:
        state = {k: v.float() for k, v in read_state_dict(config.init_decoder).items()
                 if k.startswith(("prompt_encoder.", "mask_decoder."))}
        missing, unexpected = sam.load_state_dict(state, strict=False)
        wrong = [k for k in missing if not k.startswith("image_encoder.")] + list(unexpected)
        if wrong or not state:
            raise TrainingError(f"{config.init_decoder} is not a tiny prompt encoder and mask decoder "
                                f"(missing or unexpected keys: {wrong[:5] or 'all'})")
    return sam


def _optimizer(parameters: list[tuple[str, torch.nn.Parameter]], config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with no decay on biases, norms and position embeddings, and the encoder's lr scaled."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in parameters:
        decays = p.ndim > 1 and "pos_embed" not in name and "rel_pos" not in name
        groups.setdefault((name.startswith("image_encoder."), decays), []).append(p)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": config.weight_decay if decays else 0.0,
          "lr_scale": config.encoder_lr_scale if encoder else 1.0}
         for (encoder, decays), params in groups.items()],
        lr=config.lr, betas=(0.9, 0.999),
    )


def _train(sam, config: PretrainConfig, *, progress: bool, checkpoint: Optional[Path]) -> tuple[list[dict], float]:
    """The end-to-end loop (see `pretrain_step`), resumable from `checkpoint`. Returns the loss
    history (every 25 steps) and the training seconds, summed over resumed sessions."""
    sam.train()
    head = None
    if config.dense_weight:
        with torch.random.fork_rng(devices=[]):  # its initial weights, like the model's, a function of the seed
            torch.manual_seed(config.seed)
            head = DenseHead()
    named = list(sam.named_parameters()) + ([] if head is None else [("dense_head." + n, p)
                                                                        for n, p in head.named_parameters()])
    optimizer = _optimizer(named, config)
    parameters = [p for _, p in named]
    first_step, history, done_s = 0, [], 0.0
    if checkpoint is not None and checkpoint.is_file():
        first_step, history, done_s = _resume(checkpoint, config, sam, head, optimizer)
        if progress:
            print(f"resuming pretraining from {checkpoint} at step {first_step}", file=sys.stderr)
    data = ShapesPrompts(seed=config.seed, length=config.steps * config.batch_size,
                         prompts_per_image=config.prompts_per_image,
                         prompt_settings=PromptSettings(mode="mixed", point_ratio=config.point_ratio),
                         shapes=config.shapes, feedback_passes=config.feedback_passes,
                         feedback_point_prob=config.feedback_point_prob)
    # Items depend on their index alone: the resumed loader starts at the next step's images.
    last_step = config.steps if config.stop_after is None else config.stop_after
    if first_step > last_step:
        raise TrainingError(f"{checkpoint} is at step {first_step}, past stop_after = {last_step}")
    remaining = Subset(data, range(first_step * config.batch_size, last_step * config.batch_size))
    loader = DataLoader(remaining, batch_size=config.batch_size, shuffle=False, num_workers=config.workers,
                        collate_fn=_collate, persistent_workers=False,
                        prefetch_factor=4 if config.workers else None)
    bar = progress_bar(max(0, last_step - first_step), desc="pretrain tiny", unit="step", enabled=progress)
    started = time.time()
    recent_loss, recent_iou, recent_dense = [], [], []
    for step, batch in enumerate(loader, start=first_step):
        set_learning_rate(optimizer, learning_rate(step, config))
        try:
            stats = pretrain_step(sam, head, batch, config, optimizer, parameters)
        except NonFiniteLoss as exc:
            raise TrainingError(f"{exc} at step {step}; lower the learning rate") from None
        recent_loss = (recent_loss + [stats["loss"]])[-20:]
        recent_iou = (recent_iou + [stats["train_iou"]])[-20:]
        recent_dense = (recent_dense + [stats["dense_loss"]])[-20:]
        elapsed = done_s + time.time() - started
        if (step + 1) % 25 == 0 or step + 1 == last_step:
            history.append({"step": step + 1, "loss": float(np.mean(recent_loss)),
                            "train_iou": float(np.mean(recent_iou)), "dense_loss": float(np.mean(recent_dense)),
                            "elapsed_s": round(elapsed, 1), "load_1min": _load_average()})
        if checkpoint is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == last_step):
            _save_checkpoint(checkpoint, config, step + 1, sam, head, optimizer, history, elapsed)
        bar.set_postfix(loss=f"{np.mean(recent_loss):.3f}", iou=f"{np.mean(recent_iou):.3f}",
                        dense=f"{np.mean(recent_dense):.3f}",
                        img_s=f"{(step + 1 - first_step) * config.batch_size / (time.time() - started):.2f}")
        bar.update(1)
    bar.close()
    return history, done_s + time.time() - started


def pretrain_step(sam, head: Optional[DenseHead], batch: _Batch, config: PretrainConfig,
                  optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter]) -> dict:
    """One end-to-end step: the encoder once per image, then 1 + feedback_passes decoder passes
    over the same prompts (interactive.ClickSimulation) and the dense head, then the update.

    The decoder passes and the head run on a detached copy of the embedding, each backpropagated
    as soon as it is done (memory stays at one pass's), their gradients gathering on that copy;
    one backward through the encoder then takes them all. The loss is the passes' mean plus
    `dense_weight` x the dense loss.
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast(CPU, config.precision):
        embeddings = sam.image_encoder(batch_to_model_input(batch.images))
    leaf = embeddings.detach().float().requires_grad_()
    passes = 1 + config.feedback_passes
    simulation = ClickSimulation(batch.prompts, batch.targets, batch.schedules, detach=True)
    losses, ious = [], []
    for _ in range(passes):
        prompts = simulation.prompts()
        with autocast(CPU, config.precision):
            output = decode(sam.prompt_encoder, sam.mask_decoder, leaf, prompts)
        parts = compute_loss(output, batch.targets, prompts.multimask, config.loss)
        _check_finite(parts.total)
        (parts.total / passes).backward()
        losses.append(float(parts.total.detach()))
        ious.append(float(parts.train_iou))
        simulation.update(output, prompts)
    dense = torch.zeros(())
    if head is not None:
        with autocast(CPU, config.precision):
            dense_logits = head(leaf)
        dense = dense_loss(dense_logits.float(), batch.dense)
        _check_finite(dense)
        (config.dense_weight * dense).backward()
    embeddings.backward(leaf.grad.to(embeddings.dtype))
    torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
    optimizer.step()
    return {"loss": float(np.mean(losses)), "train_iou": float(np.mean(ious)), "dense_loss": float(dense.detach())}


def _check_finite(loss: torch.Tensor) -> None:
    if not bool(torch.isfinite(loss)):
        raise NonFiniteLoss(float(loss))


# --------------------------------------------------------------------------- checkpoints

_RESUME_IGNORES = ("workers", "threads", "eval_at_start", "stop_after")  # may differ between sessions


def _save_checkpoint(path: Path, config: PretrainConfig, step: int, sam, head: Optional[DenseHead],
                     optimizer: torch.optim.Optimizer, history: list[dict], elapsed_s: float) -> None:
    """Everything the run needs to continue exactly, written to a temporary file then renamed, so
    an interruption leaves the previous checkpoint whole."""
    state = {"step": step, "config": _jsonable(asdict(config)), "model": sam.state_dict(),
             "dense_head": None if head is None else head.state_dict(), "optimizer": optimizer.state_dict(),
             "history": history, "elapsed_s": elapsed_s}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _resume(path: Path, config: PretrainConfig, sam, head: Optional[DenseHead],
            optimizer: torch.optim.Optimizer) -> tuple[int, list[dict], float]:
    """Loads a checkpoint (tensors and plain data only: weights_only, no pickled code) into the run."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, wanted = dict(state["config"]), _jsonable(asdict(config))
    for key in _RESUME_IGNORES:
        saved.pop(key, None), wanted.pop(key, None)
    if saved != wanted:
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise TrainingError(f"{path} is a checkpoint of another pretraining config (differs in {', '.join(changed)}); "
                            "delete it to start over")
    sam.load_state_dict(state["model"])
    if head is not None:
        head.load_state_dict(state["dense_head"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["history"]), float(state["elapsed_s"])


def _write_weights(sam, out_path: Path) -> str:
    """The state dict as float16 safetensors with the provenance statement; returns the file's SHA-256."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in sam.state_dict().items()}
    save_file(state, str(out_path), metadata={"format": "pt", "model_type": "tiny",
                                               "samcache_version": __version__, "statement": PROVENANCE_STATEMENT})
    return sha256_file(out_path)


def _provenance(config: PretrainConfig, out_path: Path, digest: str, *, command: Optional[str],
                stages: Optional[dict], history: list[dict], initial: Optional[dict], final: dict, train_s: float,
                wall_s: float, load_start: Optional[float]) -> dict:
    """What the weights' JSON says of them: recipe, seed, time, machine, held-out figures."""
    steps_done = config.steps if config.stop_after is None else config.stop_after
    images_seen = steps_done * config.batch_size
    return {
        "statement": PROVENANCE_STATEMENT,
        "model_type": "tiny",
        "weights_file": out_path.name,
        "weights_sha256": digest,
        "weights_dtype": "float16 (load_sam casts to float32)",
        "command": command if command is not None else " ".join(sys.argv),
        "config": _jsonable(asdict(config)),
        "seed": config.seed,
        "steps": steps_done,
        "schedule_steps": config.steps,
        "images_seen": images_seen,
        "train_s": round(train_s, 1),
        "wall_s": round(wall_s, 1),
        "images_per_s": round(images_seen / train_s, 3),
        "held_out": final,
        "held_out_initial": initial,
        "earlier_stages": _jsonable(stages),
        "history": history,
        "load_average_1min": {"start": load_start, "end": _load_average(),
                              "mean_during_training": _mean([h["load_1min"] for h in history])},
        "machine": _machine(),
        "torch": torch.__version__,
        "samcache": __version__,
        "git_commit": _git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_commit() -> Optional[str]:
    """The commit of the code that ran (with "+changes" when the checkout had uncommitted edits),
    when it runs from a git checkout; None otherwise."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "samcache", "scripts"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty else "")


def _machine() -> dict:
    return {"cpu": cpu_name(), "cores": _cores(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version()}


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 2) if values else None


def _load_average() -> Optional[float]:
    """The 1-minute load average: how shared the machine was, which the timings depend on."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
