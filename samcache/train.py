"""Stage two: train the mask decoder (and optionally the prompt encoder) from the cache.

The image encoder never runs: each step reads B cached embeddings and decodes B x K prompts
with one batched forward (decoder.decode). The run folder holds:

    RUN/config.yaml       the resolved configuration
    RUN/run.json          model type, base weights SHA-256, cache, versions, results
    RUN/metrics.jsonl     one JSON line per step and per epoch
    RUN/curves.png        loss and validation mIoU
    RUN/last.pt, best.pt  checkpoints: tensors and plain types only (torch.load weights_only=True)

Resume (`resume=True`) restores the weights, optimizer state and position (epoch, batch)
from last.pt; the learning rate is a function of the step and all sampling a function of
(seed, epoch, image), so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from samcache import __version__, masks
from samcache.cache import EmbeddingCache, crash_point
from samcache.decoder import LOSSES, PromptBatch, compute_loss, decode
from samcache.distributed import SINGLE, Distributed
from samcache.embed import cuda_autocast, resolve_device
from samcache.errors import SamcacheError
from samcache.fileio import atomic_write_bytes, atomic_write_json
from samcache.metrics import iou
from samcache.models import load_matching
from samcache.prompts import PROMPT_MODES, PromptSettings
from samcache.samples import (
    CacheSamples, EmbeddingStore, EpochBatches, SampleSettings, collate, should_hold_in_memory,
)

TRAINABLE = ("mask_decoder", "prompt_encoder")
CHECKPOINT_FORMAT = "samcache-run-checkpoint"


class TrainingError(SamcacheError):
    """Training cannot start or had to stop (bad options, empty split, non-finite loss)."""


@dataclass
class TrainConfig:
    """Options of `samcache train` (also the keys of its YAML config file)."""

    epochs: int = 10
    """Passes over the training split."""
    batch_size: int = 4
    """Images per optimizer step, over all processes under torchrun (the global batch: each rank
    takes its share, so a run's results do not depend on the number of processes); each image
    contributes up to `objects_per_image` prompts."""
    objects_per_image: int = 8
    """K: objects sampled per image and step (all of them when the image has fewer)."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warmup steps, then cosine decay to zero at the last step."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    prompt: str = "box"
    """Training prompts: box, point or mixed."""
    box_jitter: float = 0.1
    """Each box side moves by up to this fraction of the box side..."""
    box_jitter_max: float = 20.0
    """... and at most this many original pixels (SAM's default: 10%, 20 px)."""
    positive_points: int = 1
    """Positive points per point prompt."""
    negative_points: int = 0
    """Negative points per point prompt (in the box, outside the mask)."""
    point_ratio: float = 0.5
    """With prompt=mixed, the share of point prompts."""
    loss: str = "sam"
    """sam (20 focal + dice + IoU MSE), dice-bce, or mse-threshold (the tutorial's, for comparison)."""
    train: list[str] = field(default_factory=lambda: ["mask_decoder"])
    """What is trainable: mask_decoder and/or prompt_encoder."""
    train_split: str = "train"
    """The cache split to train on."""
    val_split: str = "val"
    """The cache split validated after each epoch (fixed prompts, mIoU at original resolution)."""
    val_prompt: str = "box"
    """Validation prompts: box (the exact box) or point (the mask's most interior point)."""
    seed: int = 0
    """Seeds shuffling, object choice and prompt sampling."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda. On CUDA, bf16 autocast."""
    workers: int = 2
    """DataLoader worker processes reading the cache and building targets."""
    cache_in_memory: str = "auto"
    """auto, yes or no: hold all embeddings in RAM (or GPU memory) so epochs do no I/O."""
    memory_budget_mb: Optional[int] = None
    """With cache_in_memory=auto, the most memory the embeddings may take (default: half the free memory)."""
    save_every: int = 50
    """Also save last.pt every this many steps inside an epoch (0: only at epoch ends)."""
    checkpoint: Optional[str] = None
    """The base weights file, when the cache was not made with samcache's tiny or official weights."""

    def validate(self) -> None:
        if self.prompt not in PROMPT_MODES:
            raise TrainingError(f"unknown --prompt {self.prompt!r}; choose one of {', '.join(PROMPT_MODES)}")
        if self.loss not in LOSSES:
            raise TrainingError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        unknown = [t for t in self.train if t not in TRAINABLE]
        if unknown or not self.train:
            raise TrainingError(f"--train takes {' and/or '.join(TRAINABLE)}, got {','.join(self.train) or 'nothing'}")
        if self.val_prompt not in ("box", "point"):
            raise TrainingError(f"--val-prompt is box or point, not {self.val_prompt!r}")
        if self.cache_in_memory not in ("auto", "yes", "no"):
            raise TrainingError(f"--cache-in-memory is auto, yes or no, not {self.cache_in_memory!r}")
        for name in ("epochs", "batch_size", "objects_per_image"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1")

    def prompt_settings(self) -> PromptSettings:
        try:
            return PromptSettings(self.prompt, self.box_jitter, self.box_jitter_max, self.positive_points,
                                  self.negative_points, self.point_ratio)
        except ValueError as exc:
            raise TrainingError(str(exc)) from exc

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainingError(f"unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(values)
        if isinstance(values.get("cache_in_memory"), bool):  # YAML reads a bare yes/no as a boolean
            values["cache_in_memory"] = "yes" if values["cache_in_memory"] else "no"
        return cls(**values)


@dataclass
class TrainResult:
    run_dir: str
    epochs_run: int
    val_miou_start: float
    val_miou_best: float
    val_miou_last: float
    best_epoch: int
    history: list[float]
    seconds: float
    samples_per_second: float


def warmup_cosine(step: int, *, peak: float, warmup_steps: int, end_step: int, floor: float = 0.0) -> float:
    """Linear warmup to `peak` over `warmup_steps`, then cosine decay to `floor` at `end_step`."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, end_step - warmup_steps))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to zero at `total_steps`."""
    return warmup_cosine(step, peak=config.lr, warmup_steps=config.warmup_steps, end_step=total_steps)


def train(cache_dir: str | Path, run_dir: str | Path, config: TrainConfig, *, resume: bool = False,
          progress: bool = True, dist: Distributed = SINGLE) -> TrainResult:
    """Trains the decoder on the cache's train split and validates on its val split each epoch.

    Arguments:
      cache_dir: a cache made by `samcache embed`.
      run_dir: the run folder (created; must not hold a run unless `resume`).
      config: the options.
      resume: continue the run in `run_dir` from its last.pt.
      progress: show progress bars.
      dist: this process's place under torchrun. The decoder is wrapped in
        DistributedDataParallel; every global batch of `batch_size` images is split between the
        ranks, and the loss is scaled so the averaged gradient equals the single-process one.
        Only rank 0 writes to `run_dir`.
    """
    config.validate()
    run_dir = Path(run_dir)
    cache = EmbeddingCache(cache_dir)
    train_indices = cache.annotated_indices(config.train_split)
    val_indices = cache.annotated_indices(config.val_split)
    available = cache.describe_splits()
    if not train_indices:
        raise TrainingError(f"the cache has no objects in split {config.train_split!r}; its splits: {available}")
    if not val_indices:
        raise TrainingError(f"the cache has no objects in validation split {config.val_split!r}; "
                            f"its splits: {available}; choose one with --val-split")
    if config.batch_size < dist.world_size:
        raise TrainingError(f"--batch-size {config.batch_size} is the global batch, smaller than the "
                            f"{dist.world_size} processes: some would never get an image; use at least {dist.world_size}")
    _prepare_run_dir(run_dir, resume)
    dist.barrier()  # every rank has checked the folder before rank 0 writes into it
    device = dist.device(resolve_device(config.device))
    base = load_matching(cache.provenance.model_type, cache.provenance.weights_sha256, config.checkpoint)
    sam = base.sam
    sam.image_encoder = None  # never used in training; frees its memory
    sam.to(device)
    trainable = [p for part in config.train for p in getattr(sam, part).parameters()]
    for part in TRAINABLE:
        getattr(sam, part).requires_grad_(part in config.train)
    module = _distributed_wrapper(sam, config, device, dist)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    autocast = cuda_autocast(device)

    held = should_hold_in_memory(config.cache_in_memory, len(train_indices) + len(val_indices), device,
                                 config.memory_budget_mb * 2**20 if config.memory_budget_mb else None)
    store = EmbeddingStore(cache, train_indices + val_indices, device) if held else None
    train_samples = CacheSamples(cache, SampleSettings(config.objects_per_image, config.prompt_settings(),
                                                       seed=config.seed), read_embeddings=store is None)
    sampler = EpochBatches(train_indices, config.batch_size, config.seed, rank=dist.rank, world_size=dist.world_size)
    steps_per_epoch = len(sampler.global_batches())
    total_steps = steps_per_epoch * config.epochs

    state = {"epoch": 0, "batch": 0, "global_step": 0, "best_miou": -1.0, "best_epoch": -1, "history": []}
    writer = _RunWriter(run_dir, enabled=dist.is_main)
    if resume:
        state = _load_checkpoint(run_dir / "last.pt", sam, optimizer, config, cache)
        writer.truncate_metrics(state["global_step"], state["epoch"])
    else:
        start_miou = validate(sam, cache, val_indices, store, device, config, dist)
        state["history"] = [start_miou]
        writer.start(config, base, cache, train_indices, val_indices, held)
        writer.log({"type": "epoch", "epoch": 0, "global_step": 0, "val_miou": start_miou})
        if progress and dist.is_main:
            print(f"validation mIoU before training: {start_miou:.4f} ({len(val_indices)} images, "
                  f"split {config.val_split!r}, {config.val_prompt} prompts)")

    started, samples_done = time.time(), 0
    for epoch in range(state["epoch"], config.epochs):
        sampler.set_epoch(epoch, state["batch"] if epoch == state["epoch"] else 0)
        loader = DataLoader(train_samples, batch_sampler=sampler, num_workers=config.workers, collate_fn=collate,
                            pin_memory=device.type == "cuda")
        module.train()
        bar = _progress(len(sampler), f"epoch {epoch + 1}/{config.epochs}", progress and dist.is_main)
        epoch_start, epoch_samples = time.time(), 0
        for batch_number, batch in enumerate(loader, start=sampler.start_batch):
            lr = learning_rate(state["global_step"], total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if batch is None:  # this rank's share of a short last batch is empty
                embeddings, prompts, targets, n_local = _idle_step_inputs(device)
            else:
                embeddings = store.gather(batch.indices) if store is not None else batch.embeddings.to(device)
                prompts, targets, n_local = batch.prompts.to(device), batch.targets.to(device), batch.n_prompts
            with autocast:
                output = module(embeddings.float(), prompts)
            loss = compute_loss(output, targets, prompts.is_box, config.loss)
            # The ranks' prompt counts differ: weigh each rank's mean by its share of the global
            # batch (DDP then averages over ranks), so the gradient is the global batch's mean.
            parts = (loss.total, loss.mask, loss.iou, loss.train_iou)
            n_global, *global_sums = dist.sum([n_local] + [n_local * p.item() if n_local else 0.0 for p in parts])
            global_loss, global_mask, global_iou, global_train_iou = (v / n_global for v in global_sums)
            if not math.isfinite(global_loss):
                raise TrainingError(
                    f"the loss became {global_loss} at epoch {epoch + 1}, step {batch_number + 1}: stopped. "
                    f"The last good checkpoint {run_dir / 'last.pt'} is kept; try a lower --lr"
                )
            optimizer.zero_grad(set_to_none=True)
            (loss.total * (n_local * dist.world_size / n_global)).backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            state["global_step"] += 1
            state["batch"] = batch_number + 1
            samples_done += int(n_global)
            epoch_samples += int(n_global)
            rate = epoch_samples / max(time.time() - epoch_start, 1e-9)
            writer.log({"type": "step", "epoch": epoch + 1, "step": batch_number + 1,
                        "global_step": state["global_step"], "loss": global_loss, "mask_loss": global_mask,
                        "iou_loss": global_iou, "train_iou": global_train_iou, "lr": lr,
                        "prompts": int(n_global), "samples_per_s": rate})
            bar.update(1)
            bar.set_postfix(loss=f"{global_loss:.4f}", samples_s=f"{rate:.1f}")
            if config.save_every and state["global_step"] % config.save_every == 0 and state["batch"] < steps_per_epoch:
                writer.save_checkpoint("last.pt", sam, optimizer, config, cache, {**state, "epoch": epoch})
            crash_point("train-step")
        bar.close()
        miou = validate(sam, cache, val_indices, store, device, config, dist)
        state["history"].append(miou)
        state.update(epoch=epoch + 1, batch=0)
        improved = miou > state["best_miou"]
        if improved:
            state.update(best_miou=miou, best_epoch=epoch + 1)
        writer.log({"type": "epoch", "epoch": epoch + 1, "global_step": state["global_step"], "val_miou": miou,
                    "samples_per_s": epoch_samples / max(time.time() - epoch_start, 1e-9)})
        if improved:
            writer.save_checkpoint("best.pt", sam, optimizer, config, cache, state)
        writer.save_checkpoint("last.pt", sam, optimizer, config, cache, state)
        writer.plot()
        if progress and dist.is_main:
            print(f"epoch {epoch + 1}/{config.epochs}: validation mIoU {miou:.4f}"
                  f"{' (best)' if improved else ''}, {epoch_samples / max(time.time() - epoch_start, 1e-9):.1f} samples/s")

    seconds = time.time() - started
    result = TrainResult(
        run_dir=str(run_dir), epochs_run=config.epochs, val_miou_start=state["history"][0],
        val_miou_best=state["best_miou"], val_miou_last=state["history"][-1], best_epoch=state["best_epoch"],
        history=state["history"], seconds=seconds, samples_per_second=samples_done / max(seconds, 1e-9),
    )
    writer.finish(result)
    dist.barrier()  # the run folder is complete when any rank returns
    return result


def _idle_step_inputs(device: torch.device):
    """One placeholder prompt on a blank embedding, weighted 0: a rank without images in a step
    must still run forward and backward, since DistributedDataParallel averages gradients from all."""
    prompts = PromptBatch(image_index=torch.zeros(1, dtype=torch.long), boxes=torch.tensor([[0.0, 0.0, 64.0, 64.0]]),
                          points=torch.zeros((1, 1, 2)), labels=-torch.ones((1, 1), dtype=torch.long),
                          is_box=torch.ones(1, dtype=torch.bool))
    return torch.zeros((1, 256, 64, 64), device=device), prompts.to(device), torch.zeros((1, 256, 256), device=device), 0


class _DecoderModule(torch.nn.Module):
    """The trainable part as one module (what DistributedDataParallel wraps)."""

    def __init__(self, sam):
        super().__init__()
        self.prompt_encoder, self.mask_decoder = sam.prompt_encoder, sam.mask_decoder

    def forward(self, embeddings, prompts):
        return decode(self.prompt_encoder, self.mask_decoder, embeddings, prompts)


def _distributed_wrapper(sam, config: TrainConfig, device: torch.device, dist: Distributed) -> torch.nn.Module:
    module = _DecoderModule(sam)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters="prompt_encoder" in config.train)
    return module


def validate(sam, cache: EmbeddingCache, indices: list[int], store, device, config: TrainConfig,
             dist: Distributed = SINGLE) -> float:
    """Mean IoU over the objects of `indices`: fixed prompts, masks compared at original resolution.

    Under torchrun each rank scores its own slice of the images and the sums are combined.
    """
    from samcache.evaluate import predict_objects

    sam.eval()
    settings = SampleSettings(0, None, config.val_prompt, config.seed)
    scores = [
        iou(p.mask, masks.decode(p.info.objects[p.object_index].rle))
        for p in predict_objects(sam.prompt_encoder, sam.mask_decoder, cache, indices[dist.rank :: dist.world_size],
                                 settings, device=device, batch_size=config.batch_size, store=store)
    ]
    sam.train()
    total, count = dist.sum([float(np.sum(scores)) if scores else 0.0, len(scores)])
    return total / count if count else float("nan")


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise TrainingError(f"--resume: {run_dir} has no last.pt to resume from")
        return
    if (run_dir / "last.pt").exists() or (run_dir / "metrics.jsonl").exists():
        raise TrainingError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)


def _checkpoint_payload(sam, optimizer, config: TrainConfig, cache: EmbeddingCache, state: dict) -> dict:
    weights = {f"{part}.{k}": v.detach().cpu().clone() for part in TRAINABLE
               for k, v in getattr(sam, part).state_dict().items()}
    return {
        "format": CHECKPOINT_FORMAT, "version": 1, "samcache_version": __version__,
        "model_type": cache.provenance.model_type, "base_weights_sha256": cache.provenance.weights_sha256,
        "trained": list(config.train), "state_dict": weights, "optimizer": optimizer.state_dict(),
        "config": asdict(config), "state": {k: v for k, v in state.items()},
    }


def _load_checkpoint(path: Path, sam, optimizer, config: TrainConfig, cache: EmbeddingCache) -> dict:
    payload = read_run_checkpoint(path)
    if payload["base_weights_sha256"] != cache.provenance.weights_sha256:
        raise TrainingError(f"{path} was trained from other base weights than the cache's; cannot resume")
    apply_run_weights(sam, payload)
    optimizer.load_state_dict(payload["optimizer"])
    return dict(payload["state"])


def apply_run_weights(sam, payload: dict) -> None:
    """Loads a run checkpoint's prompt encoder and mask decoder into `sam` (strict keys)."""
    for part in TRAINABLE:
        prefix = f"{part}."
        getattr(sam, part).load_state_dict(
            {k[len(prefix):]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}, strict=True)


def read_run_checkpoint(path: str | Path) -> dict:
    """A run checkpoint, read with weights_only=True (tensors and plain types; no code runs)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise TrainingError(f"{path} is not a readable samcache checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a samcache run checkpoint")
    return payload


class _RunWriter:
    """Everything a run writes; only rank 0 writes."""

    def __init__(self, run_dir: Path, *, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.metrics = run_dir / "metrics.jsonl"

    def start(self, config, base, cache, train_indices, val_indices, held: bool) -> None:
        if not self.enabled:
            return
        import yaml

        atomic_write_bytes(self.run_dir / "config.yaml", yaml.safe_dump(asdict(config), sort_keys=True).encode())
        atomic_write_json(self.run_dir / "run.json", {
            "samcache_version": __version__, "torch_version": torch.__version__,
            "model_type": base.model_type, "base_weights_sha256": base.weights_sha256,
            "base_weights_source": base.weights_source, "cache": str(Path(cache.cache_dir).resolve()),
            "train_images": len(train_indices), "val_images": len(val_indices), "embeddings_in_memory": held,
        })

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, global_step: int, epoch: int) -> None:
        """Drops log lines written after the checkpoint a resumed run starts from."""
        if not self.enabled or not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            record = json.loads(line)
            if record["global_step"] < global_step or (record["global_step"] == global_step and (
                    record["type"] == "step" or record["epoch"] <= epoch)):
                kept.append(line)
        atomic_write_bytes(self.metrics, ("\n".join(kept) + "\n").encode() if kept else b"")

    def save_checkpoint(self, name: str, sam, optimizer, config, cache, state: dict) -> None:
        if not self.enabled:
            return
        import io

        buffer = io.BytesIO()
        torch.save(_checkpoint_payload(sam, optimizer, config, cache, state), buffer)
        atomic_write_bytes(self.run_dir / name, buffer.getvalue())

    def plot(self) -> None:
        if self.enabled:
            from samcache.report import plot_training_curves

            plot_training_curves(self.metrics, self.run_dir / "curves.png")

    def finish(self, result: TrainResult) -> None:
        if not self.enabled:
            return
        run = json.loads((self.run_dir / "run.json").read_text())
        run["result"] = asdict(result)
        atomic_write_json(self.run_dir / "run.json", run)


def _progress(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="step", disable=not enabled, dynamic_ncols=True, leave=False)
