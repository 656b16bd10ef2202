"""Pretrains the tiny model end to end on synthetic shapes: samcache's own small pretrained SAM.

SAM's real weights cannot be shipped or downloaded everywhere, so the offline demo needs a
model of SAM's architecture that has learnt *something* about objects. `pretrain_tiny`
trains all of `tiny` (image encoder, prompt encoder, mask decoder) from its random
initialisation on images drawn on the fly by `samcache.tiny.shapes` (never the stamps
domain), with box prompts jittered as SAM's training does and single-point prompts, using the
same preprocessing as `samcache embed`, the same batched decoder and training step
(`step.optimize_step`) as `samcache train`, and the same inference path (inference.py) as
`samcache eval`. It ends with a fixed, seeded held-out evaluation and writes:

    OUT.safetensors   the full state dict (Meta's key layout), stored as float16
    OUT.json          provenance: config, seed, steps, wall time, CPU, torch, figures, SHA-256

Why these choices (measured on a 2-core CPU; see scripts/pretrain_tiny.py):
- The model input is always the 1024 px padded square, so the cost of a step does not depend
  on how large the shapes image is drawn; images are drawn with their longest side in
  512-1024 px and upsampled by the predictor's resize, like the scans and photos samcache sees.
- The mask decoder costs about as much per prompt as the tiny encoder per image, so a few
  prompts per image (not all objects) give the best quality per second.
- fp32, not bf16 autocast: on the 2-core AVX512-BF16 CPU, bf16 training steps ran about 2x
  slower (0.2 vs 0.45 images/s), its backward passes being the slow part.
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

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from samcache import __version__, masks
from samcache.config import LOSSES, PromptSettings
from samcache.decoder import decode
from samcache.devices import autocast, cpu_name
from samcache.errors import TrainingError
from samcache.fileio import sha256_file
from samcache.inference import predict_masks
from samcache.metrics import iou
from samcache.models import build_sam, build_tiny, load_weights_into, read_state_dict
from samcache.preprocess import batch_to_model_input, input_size, resize_image
from samcache.progress import progress_bar
from samcache.prompts import PromptBatch, evaluation_prompt, low_res_target, rng_for, training_prompt
from samcache.step import NonFiniteLoss, optimize_step
from samcache.tiny.shapes import ShapesSettings, render_shapes
from samcache.train import set_learning_rate, warmup_cosine

CPU = torch.device("cpu")

PRECISIONS = ("fp32", "bf16")
PROVENANCE_STATEMENT = (
    "This is samcache's own 'tiny' model (SAM's prompt encoder and mask decoder architecture with a "
    "small windowed ViT image encoder), trained from random initialisation by samcache on synthetic "
    "shapes images. It is NOT Meta's Segment Anything model and contains none of Meta's weights."
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


class ShapesPrompts(Dataset):
    """Item i: shapes image i of `seed`, resized for the encoder, with up to K prompted objects.

    Objects and prompts are drawn from a generator seeded by (seed, i), so the data of a run is
    the same for any number of workers.
    """

    def __init__(self, *, seed: int, length: int, prompts_per_image: int, prompt_settings: PromptSettings,
                 shapes: ShapesSettings):
        self.seed, self.length, self.k = seed, length, prompts_per_image
        self.prompt_settings, self.shapes = prompt_settings, shapes

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
        low_res = {}
        prompts, targets = [], []
        for n in range(self.k):
            j = int(order[n % len(order)])
            prompts.append(training_prompt(rles[j], masks.bbox_xyxy(rles[j]), original, self.prompt_settings, rng))
            if j not in low_res:
                low_res[j] = low_res_target(rles[j], resized)
            targets.append(low_res[j])
        return _Item(torch.from_numpy(resize_image(drawn.image)), prompts, np.stack(targets))


def _collate(items: list[_Item]) -> tuple[list[torch.Tensor], PromptBatch, torch.Tensor]:
    batch = PromptBatch.from_prompts([p for item in items for p in item.prompts],
                                     torch.tensor([b for b, item in enumerate(items) for _ in item.prompts]))
    return [item.image for item in items], batch, torch.from_numpy(np.concatenate([i.targets for i in items]))


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
            predictions = predict_masks(sam.prompt_encoder, sam.mask_decoder, embedding, batch,
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
                  command: Optional[str] = None, stages: Optional[dict] = None) -> PretrainResult:
    """Trains `tiny` end to end on shapes and writes OUT.safetensors + OUT.json (see module doc).

    Arguments:
      config: the recipe.
      out_path: the weights file to write; a `.safetensors` suffix is added when missing.
      progress: show a progress bar with images/s.
      command: the command line to record in the provenance (default: sys.argv).
      stages: what came before this run (e.g. the decoder warm-up that made `init_weights`),
        recorded in the provenance as it is.
    """
    started = time.time()
    load_start = _load_average()
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        out_path = out_path.with_name(out_path.name + ".safetensors")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)

    sam = build_tiny(config.seed)
    if config.init_weights:
        load_weights_into(sam, read_state_dict(config.init_weights), model_type="tiny", source=config.init_weights)
    initial = None
    if config.eval_at_start:
        initial = evaluate_shapes(sam, seed=config.eval_seed, images=config.eval_images, shapes=config.shapes,
                                  precision=config.precision)
    train_started = time.time()
    history = _train(sam, config, progress=progress)
    train_s = time.time() - train_started

    # Write float16, then evaluate the file as written: the figures are the shipped model's.
    digest = _write_weights(sam, out_path)
    shipped = build_sam("tiny")
    load_weights_into(shipped, read_state_dict(out_path), model_type="tiny", source=out_path)
    final = evaluate_shapes(shipped, seed=config.eval_seed, images=config.eval_images, shapes=config.shapes,
                            precision=config.precision)
    wall = time.time() - started
    images_seen = config.steps * config.batch_size
    provenance = _provenance(config, out_path, digest, command=command, stages=stages, history=history,
                             initial=initial, final=final, train_s=train_s, wall_s=wall, load_start=load_start)
    provenance_path = out_path.with_suffix(".json")
    provenance_path.write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    if progress:
        print(f"pretrained tiny: {config.steps} steps, {images_seen} images in {train_s / 60:.1f} min "
              f"({images_seen / train_s:.2f} img/s); held-out mIoU box {final['box_miou']:.4f}, "
              f"point {final['point_miou']:.4f} ({final['objects']} objects); {out_path} sha256 {digest[:12]}",
              file=sys.stderr)
    return PretrainResult(out_path, provenance_path, digest, final["box_miou"], final["point_miou"],
                          config.steps, images_seen, wall)


def _optimizer(sam, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with no decay on biases, norms and position embeddings, and the encoder's lr scaled."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in sam.named_parameters():
        decays = p.ndim > 1 and "pos_embed" not in name and "rel_pos" not in name
        groups.setdefault((name.startswith("image_encoder."), decays), []).append(p)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": config.weight_decay if decays else 0.0,
          "lr_scale": config.encoder_lr_scale if encoder else 1.0}
         for (encoder, decays), params in groups.items()],
        lr=config.lr, betas=(0.9, 0.999),
    )


def _train(sam, config: PretrainConfig, *, progress: bool) -> list[dict]:
    """The end-to-end loop: encoder + decoder forward, then `samcache train`'s own step. Returns
    the loss history (every 25 steps)."""
    sam.train()
    optimizer = _optimizer(sam, config)
    parameters = list(sam.parameters())
    data = ShapesPrompts(seed=config.seed, length=config.steps * config.batch_size,
                         prompts_per_image=config.prompts_per_image,
                         prompt_settings=PromptSettings(mode="mixed", point_ratio=config.point_ratio),
                         shapes=config.shapes)
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=False, num_workers=config.workers,
                        collate_fn=_collate, persistent_workers=False,
                        prefetch_factor=4 if config.workers else None)
    bar = progress_bar(config.steps, desc="pretrain tiny", unit="step", enabled=progress)
    started = time.time()
    recent_loss, recent_iou, history = [], [], []
    for step, (images, prompts, targets) in enumerate(loader):
        set_learning_rate(optimizer, learning_rate(step, config))
        with autocast(CPU, config.precision):
            embeddings = sam.image_encoder(batch_to_model_input(images))
            output = decode(sam.prompt_encoder, sam.mask_decoder, embeddings, prompts)
        try:
            stats = optimize_step(output, targets, prompts.multimask, loss_kind=config.loss, optimizer=optimizer,
                                  parameters=parameters, grad_clip=config.grad_clip)
        except NonFiniteLoss as exc:
            raise TrainingError(f"{exc} at step {step}; lower the learning rate") from None
        recent_loss = (recent_loss + [stats.loss])[-20:]
        recent_iou = (recent_iou + [stats.train_iou])[-20:]
        elapsed = time.time() - started
        if (step + 1) % 25 == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, "loss": float(np.mean(recent_loss)),
                            "train_iou": float(np.mean(recent_iou)), "elapsed_s": round(elapsed, 1),
                            "load_1min": _load_average()})
        bar.set_postfix(loss=f"{np.mean(recent_loss):.3f}", iou=f"{np.mean(recent_iou):.3f}",
                        img_s=f"{(step + 1) * config.batch_size / elapsed:.2f}")
        bar.update(1)
    bar.close()
    return history


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
    images_seen = config.steps * config.batch_size
    return {
        "statement": PROVENANCE_STATEMENT,
        "model_type": "tiny",
        "weights_file": out_path.name,
        "weights_sha256": digest,
        "weights_dtype": "float16 (load_sam casts to float32)",
        "command": command if command is not None else " ".join(sys.argv),
        "config": _jsonable(asdict(config)),
        "seed": config.seed,
        "steps": config.steps,
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
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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
