"""Stage two: train the mask decoder (and optionally the prompt encoder) from the cache.

The image encoder never runs: each step reads B cached embeddings and decodes B x K prompts
with one batched forward (the family's PromptDecoder), or with --prompt interactive one such forward per
pass of SAM's click recipe (interactive.py). What a run writes is described in runs.py.

`train` reads top to bottom: `Training.setup` (cache, splits, model, optimizer, data), a first
validation (or the state from last.pt on --resume), then per epoch `train_epoch` (each step
is `Training.step`: step.py's `optimize_step` or `interactive_step`) and `end_epoch`
(validate, by clicks too when asked, checkpoint, plot).

Resume restores the weights, optimizer state and position (a `TrainState`) from last.pt; the
learning rate is a function of the step and all sampling a function of (seed, epoch, image)
(the interactive recipe's of (seed, epoch, image, object, pass)), so a resumed run ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from samcache.cache.reader import EmbeddingCache
from samcache.config import DECODER_MODULES, RESUME_MAY_CHANGE, TAIL_PARTS, TrainConfig, resume_changes
from samcache.data import masks
from samcache.data.metrics import iou
from samcache.devices import autocast, decoder_precision, keep_freed_memory, resolve_device, resolve_precision
from samcache.distributed import SINGLE, Distributed
from samcache.errors import OutputError, RunError, TrainingError
from samcache.faults import crash_point
from samcache.locks import WriterLock
from samcache.models.decoder import PromptDecoder
from samcache.models.encoder_tail import EncoderTail, TailedDecoder, add_lora, tail_parameters
from samcache.models.families import family_of
from samcache.models.prompts import PromptBatch, rng_for, trained_passes
from samcache.models.specs import LOW_RES_SIZE
from samcache.models.weights import LoadedModel, load_matching
from samcache.progress import progress_bar
from samcache.train.click_protocol import click_protocol
from samcache.train.inference import predict_cached_objects
from samcache.train.runs import (
    RunCheckpoint,
    RunFolder,
    RunWriter,
    TrainState,
    apply_weights,
    trained_parts,
    upgrade_saved_config,
)
from samcache.train.samples import (
    Batch,
    CacheSamples,
    ClickSchedules,
    EmbeddingStore,
    EpochBatches,
    SampleSettings,
    collate,
    should_hold_in_memory,
)
from samcache.train.step import NonFiniteLoss, StepStats, interactive_step, optimize_step
from samcache.workers import batches_of


@dataclass
class TrainResult:
    """What `train` returns (also saved as run.json's "result")."""

    run_dir: str
    epochs_run: int
    val_miou_start: float
    val_miou_best: float
    val_miou_last: float
    best_epoch: int
    history: list[float]
    seconds: float
    samples_per_second: float


# --------------------------------------------------------------------------- the schedule
def warmup_cosine(step: int, *, peak: float, warmup_steps: int, end_step: int, floor: float = 0.0) -> float:
    """Linear warmup to `peak` over `warmup_steps`, then cosine decay to `floor` at `end_step`."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, end_step - warmup_steps))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to zero at `total_steps`."""
    return warmup_cosine(step, peak=config.lr, warmup_steps=config.warmup_steps, end_step=total_steps)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every parameter group's rate to `lr` times the group's "lr_scale" (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ------------------------------------------------------------------------------ the setup
@dataclass
class Training:
    """Everything a run needs, made once by `setup`."""

    config: TrainConfig
    cache: EmbeddingCache
    run: RunFolder
    dist: Distributed
    device: torch.device
    base: LoadedModel
    decoder: PromptDecoder
    module: torch.nn.Module
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    train_indices: list[int]
    val_indices: list[int]
    store: Optional[EmbeddingStore]
    samples: CacheSamples
    sampler: EpochBatches
    steps_per_epoch: int
    precision: str
    """The decoder's arithmetic in training steps: "fp32" or "bf16" (autocast). Validation decodes as
    `samcache eval` does (devices.decoder_precision), so that its mIoU is eval's."""
    tail: Optional[EncoderTail] = None

    @classmethod
    def setup(cls, cache: EmbeddingCache, run: RunFolder, config: TrainConfig, splits: tuple[list[int], list[int]],
              *, resume: bool, dist: Distributed) -> "Training":
        """Everything but the run folder's lock, which `train` holds (see locks.py); `splits` are
        the train and val images (`_splits`)."""
        train_indices, val_indices = splits
        if dist.is_main:
            run.prepare(resume)
        else:
            run.check_writable(resume)
        dist.barrier()  # every rank has checked the folder before rank 0 writes into it
        device = dist.device(resolve_device(config.device))
        base = load_matching(cache.provenance.model_type, cache.provenance.weights_sha256, config.checkpoint,
                             recorded_source=cache.provenance.weights_source)
        parts = trained_parts(config, base.model_type)
        # The tail (the encoder's last K blocks and neck) keeps those modules alive; the rest of the
        # encoder is never used in training, and dropping it frees its memory.
        tail = base.family.encoder_tail(base.sam, cache.provenance.tail_blocks) if config.trains_tail else None
        base.sam.image_encoder = None
        base.sam.to(device)
        for part in DECODER_MODULES:
            getattr(base.sam, part).requires_grad_(False)
        for part in parts:
            for module in [] if part in TAIL_PARTS else base.family.trainable_modules(base.sam, part):
                module.requires_grad_(True)
        for module in base.family.frozen_by_cache(base.sam):  # e.g. SAM 2.1's conv_s0 / conv_s1: cached outputs
            module.requires_grad_(False)
        parameters = [p for part in DECODER_MODULES for p in getattr(base.sam, part).parameters() if p.requires_grad]
        groups = [{"params": parameters}]
        decoder = base.decoder()
        if tail is not None:
            tail.to(device).requires_grad_(False)
            if config.lora_rank:
                add_lora(tail.blocks, rank=config.lora_rank, alpha=config.lora_rank)
            tail_params = [p for part in parts if part in TAIL_PARTS for p in tail_parameters(tail, part)]
            for p in tail_params:
                p.requires_grad_(True)
            groups.append({"params": tail_params, "lr_scale": config.tail_lr_in_effect / config.lr})
            parameters = parameters + tail_params
            decoder = TailedDecoder(decoder, tail)
        held = should_hold_in_memory(config.cache_in_memory, len(train_indices) + len(val_indices), device,
                                     config.memory_budget_mb * 2**20 if config.memory_budget_mb else None,
                                     shape=(1 + len(cache.views), *cache.feature_shape(decoder.reads)))
        store = (EmbeddingStore(cache, train_indices + val_indices, device, features=decoder.reads, views=True)
                 if held else None)
        sampler = EpochBatches(train_indices, config.batch_size, config.seed, rank=dist.rank,
                               world_size=dist.world_size)
        return cls(
            config=config, cache=cache, run=run, dist=dist, device=device, base=base,
            decoder=decoder, module=_wrap_for_distributed(decoder, device, dist), parameters=parameters,
            # The fused update: one kernel over all parameters instead of a dozen ops per tensor
            # (a tenth of a small step's time on a CPU); the same update rule, the same state dict.
            optimizer=torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay,
                                        fused=device.type in ("cpu", "cuda")),
            train_indices=train_indices, val_indices=val_indices, store=store,
            samples=CacheSamples(cache, SampleSettings.training(objects_per_image=config.objects_per_image,
                                                                 prompts=config.prompts, seed=config.seed),
                                 read_embeddings=store is None, features=decoder.reads),
            sampler=sampler, steps_per_epoch=len(sampler.global_batches()),
            precision=resolve_precision(config.precision, device), tail=tail,
        )

    @property
    def sam(self):
        return self.base.sam

    def images(self) -> dict[str, dict[str, str]]:
        """{"train": {name: SHA-256}, "val": {...}}: the images this run trains and validates on."""
        return {split: {self.cache.name_of(i): self.cache.file_of(i).sha256 for i in indices}
                for split, indices in (("train", self.train_indices), ("val", self.val_indices))}

    def step(self, batch: Batch) -> StepStats:
        """One optimizer step on a batch from `step_inputs` (a placeholder batch has no indices
        and weighs nothing)."""
        config, precision = self.config, self.precision
        n_local = batch.n_prompts if batch.indices else 0
        embeddings = batch.embeddings.float()
        common = dict(loss=partial(self.decoder.loss, kind=config.loss), optimizer=self.optimizer,
                      parameters=self.parameters, grad_clip=config.grad_clip, n_local=n_local, dist=self.dist)
        if batch.schedules is not None:
            return interactive_step(self.module, embeddings, batch.prompts, batch.targets, batch.schedules,
                                    settings=config.prompts, precision=precision, **common)
        with autocast(self.device, precision):
            output = self.module(embeddings, batch.prompts, outputs="used")
        return optimize_step(output, batch.targets, batch.prompts.multimask, **common)

    def checkpoint(self, state: TrainState) -> RunCheckpoint:
        return RunCheckpoint.capture(self.sam, self.optimizer, self.config, self.cache.provenance, state, self.tail)

    def step_inputs(self, batch: Optional[Batch], trained: Optional[torch.Tensor] = None) -> Batch:
        """The batch on the device (embeddings filled in); a placeholder for an empty share. With
        the interactive recipe, `trained` (`trained_passes`) are the passes its step backpropagates."""
        if batch is None:
            batch = _placeholder_step_inputs(self.config, self.cache.feature_shape(self.decoder.reads))
        embeddings = (self.store.gather(batch.indices, batch.views) if self.store is not None and batch.indices
                      else batch.embeddings.to(self.device))
        schedules = batch.schedules
        if schedules is not None:
            schedules = ClickSchedules(schedules.draws, schedules.valid_sizes, trained).to(self.device)
        return Batch(batch.indices, embeddings, batch.prompts.to(self.device), batch.targets.to(self.device),
                     schedules, batch.views)

    def trained_passes(self, epoch: int, global_batch: list[int]) -> Optional[torch.Tensor]:
        """The passes a step of the interactive recipe backpropagates (None: all, SAM's recipe),
        drawn from the first image of the step's global batch: every rank's share of the step
        (an empty one too) trains the same passes, so all of them all-reduce at the same pass."""
        settings = self.config.prompts
        if settings.mode != "interactive" or settings.trained_passes is None:
            return None
        return torch.from_numpy(trained_passes(settings, self.config.seed, epoch, global_batch[0]))


def _splits(cache: EmbeddingCache, config: TrainConfig, dist: Distributed) -> tuple[list[int], list[int]]:
    train_indices = cache.annotated_indices(config.train_split)
    val_indices = cache.annotated_indices(config.val_split)
    available = cache.describe_splits()
    if not train_indices:
        raise TrainingError(f"the cache has no objects in split {config.train_split!r}; its splits: {available}")
    if not val_indices:
        raise TrainingError(f"the cache has no objects in validation split {config.val_split!r}; "
                            f"its splits: {available}; choose one with --val-split")
    if config.val_max_images is not None and len(val_indices) > config.val_max_images:
        # A key no epoch number takes: the subset is a function of the seed alone, the same on resume.
        chosen = rng_for(config.seed, 2**32 - 1).choice(len(val_indices), config.val_max_images, replace=False)
        val_indices = [val_indices[i] for i in sorted(chosen)]
    if config.batch_size < dist.world_size:
        raise TrainingError(f"--batch-size {config.batch_size} is the global batch, smaller than the "
                            f"{dist.world_size} processes: some would never get an image; "
                            f"use at least {dist.world_size}")
    return train_indices, val_indices


def _wrap_for_distributed(module: PromptDecoder, device: torch.device, dist: Distributed) -> torch.nn.Module:
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # Parameters a step may not reach: the multimask outputs' hypernetworks when no prompt of a rank's
    # share is a single point (steps decode only the outputs they use), the prompt encoder's unused
    # point embeddings, SAM's own heads under SAM-HQ's loss (it scores the HQ mask alone), SAM 2.1's
    # object score head under a loss without its term. DDP then finds them each step; one unused on
    # every rank keeps no gradient, as in a single process.
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def _placeholder_step_inputs(config: TrainConfig, shape: tuple[int, ...]) -> Batch:
    """One prompt on a blank embedding, in a batch of no images (so it weighs 0): a rank without
    images in a step must still run forward and backward as often as the others, since
    DistributedDataParallel averages gradients from all ranks."""
    prompts = PromptBatch.boxes_of_one_image(torch.tensor([[0.0, 0.0, 64.0, 64.0]]))
    schedules = None
    if config.prompts.mode == "interactive":  # as many passes as the other ranks; no points, no masks
        schedules = ClickSchedules(torch.zeros((1, 3, config.prompts.passes)),
                                   torch.tensor([[LOW_RES_SIZE, LOW_RES_SIZE]]))
    return Batch([], torch.zeros((1, *shape)), prompts, torch.zeros((1, LOW_RES_SIZE, LOW_RES_SIZE)), schedules)


# ------------------------------------------------------------------------------- the loop
def train(cache_dir: str | Path, run_dir: str | Path, config: TrainConfig, *, resume: bool = False,
          progress: bool = True, dist: Distributed = SINGLE) -> TrainResult:
    """Trains the decoder on the cache's train split and validates on its val split each epoch.

    Arguments:
      cache_dir: a cache made by `samcache embed`.
      run_dir: the run folder (created; must not hold a run unless `resume`).
      config: the options.
      resume: continue the run in `run_dir` from its last.pt.
      progress: show progress bars and a line per epoch.
      dist: this process's place under torchrun. The decoder is wrapped in
        DistributedDataParallel; every global batch of `batch_size` images is split between the
        ranks, and the loss is weighed so the averaged gradient equals the single-process one.
        Only rank 0 writes to `run_dir`.
    The process keeps the memory its steps free from then on (devices.keep_freed_memory).
    """
    keep_freed_memory()
    cache, run = EmbeddingCache(cache_dir), RunFolder(run_dir)
    splits = _splits(cache, config, dist)  # refused before anything is written
    model_type = cache.provenance.model_type
    family_of(model_type).check_trainable(trained_parts(config, model_type), model_type)
    if config.trains_tail and not cache.provenance.tail_blocks:
        raise TrainingError(f"--train {'/'.join(sorted({'tail', 'neck'} & set(config.trainable)))} trains the "
                            f"encoder from the cache's tail tokens, and {cache_dir} holds none: make a cache with "
                            "`samcache embed --tail-blocks K` (K = the encoder blocks to train)")
    if dist.is_main:
        run.check_writable(resume)  # before the lock file goes in: a folder that is not a run stays untouched
    with WriterLock(run.path, what="run folder", enabled=dist.is_main):  # one writer per run folder
        t = Training.setup(cache, run, config, splits, resume=resume, dist=dist)
        writer = RunWriter(t.run, enabled=dist.is_main)
        try:
            state = resume_state(t, writer) if resume else start_state(t, writer, progress=progress)
            started, prompts_seen = time.time(), 0
            for epoch in range(state.epoch, config.epochs):
                epoch_started = time.time()
                epoch_prompts = train_epoch(t, state, writer, epoch, progress=progress)
                prompts_seen += epoch_prompts
                end_epoch(t, state, writer, epoch, epoch_prompts, epoch_started, progress=progress)
            seconds = time.time() - started
            result = TrainResult(
                run_dir=str(run_dir), epochs_run=config.epochs, val_miou_start=state.history[0],
                val_miou_best=state.best_miou, val_miou_last=state.history[-1], best_epoch=state.best_epoch,
                history=state.history, seconds=seconds, samples_per_second=prompts_seen / max(seconds, 1e-9),
            )
            writer.finish(asdict(result))
        except OutputError as exc:
            raise TrainingError(f"{exc}. Training stopped; {t.run.after_write_failure()}") from None
        finally:
            writer.close()  # the TensorBoard events up to here are on disk, whatever stopped the run
        dist.barrier()  # the run folder is complete when any rank returns
    return result


def start_state(t: Training, writer: RunWriter, *, progress: bool) -> TrainState:
    """A new run: validate the base decoder (epoch 0 of the history) and write the run's header."""
    start_miou, click_miou = validate(t), validate_clicks(t)
    writer.start(t.config, t.base, t.cache.cache_dir, images=t.images(),
                 embeddings_in_memory=t.store is not None)
    writer.log({"type": "epoch", "epoch": 0, "global_step": 0, "val_miou": start_miou,
                **_clicks_field(click_miou)})
    if progress and t.dist.is_main:
        print(f"validation mIoU before training: {start_miou:.4f} ({len(t.val_indices)} images, "
              f"split {t.config.val_split!r}, {t.config.val_prompt} prompts){_clicks_text(click_miou)}")
    return TrainState(history=[start_miou])


def resume_state(t: Training, writer: RunWriter) -> TrainState:
    """A resumed run: weights, optimizer and position from last.pt; later log lines dropped.
    Only what does not change the computation may differ from the run's own options."""
    checkpoint = t.run.read_checkpoint("last")
    checkpoint.check_cache(t.cache.provenance)
    t.run.check_same_cache(t.cache.cache_dir, t.images())
    changed = resume_changes(upgrade_saved_config(checkpoint.config), t.config)
    if changed:
        raise RunError(
            f"--resume continues {t.run} exactly as it was started, but these options differ: {', '.join(changed)}. "
            f"Only {', '.join(RESUME_MAY_CHANGE)} may change on resume; for other options start a new run "
            "(another --out)")
    if t.config.epochs < checkpoint.state.epoch:
        raise RunError(f"--resume: {t.run} has already trained {checkpoint.state.epoch} epochs; --epochs "
                       f"{t.config.epochs} would end before that")
    writer.update_config(t.config)
    apply_weights(t.sam, checkpoint, t.tail)
    t.optimizer.load_state_dict(checkpoint.optimizer)
    writer.truncate_metrics(checkpoint.state)
    return checkpoint.state


def train_epoch(t: Training, state: TrainState, writer: RunWriter, epoch: int, *, progress: bool) -> int:
    """One pass over the training split (from `state.batch` when resuming mid-epoch); returns the
    number of prompts trained on."""
    config = t.config
    t.sampler.set_epoch(epoch, state.batch if epoch == state.epoch else 0)
    loader = DataLoader(t.samples, batch_sampler=t.sampler, num_workers=config.workers, collate_fn=collate,
                        pin_memory=t.device.type == "cuda")
    t.module.train()
    bar = _progress(len(t.sampler), f"epoch {epoch + 1}/{config.epochs}", progress and t.dist.is_main)
    started, prompts = time.time(), 0
    global_batches = t.sampler.global_batches()
    with batches_of(loader) as batches:
        for batch_number, batch in enumerate(batches, start=t.sampler.start_batch):
            lr = learning_rate(state.global_step, t.steps_per_epoch * config.epochs, config)
            set_learning_rate(t.optimizer, lr)
            try:
                stats = t.step(t.step_inputs(batch, t.trained_passes(epoch, global_batches[batch_number])))
            except NonFiniteLoss as exc:
                raise TrainingError(f"{exc} at epoch {epoch + 1}, step {batch_number + 1}: stopped. "
                                    f"{t.run.after_failure()}") from None
            state.global_step += 1
            state.batch = batch_number + 1
            prompts += stats.prompts
            rate = prompts / max(time.time() - started, 1e-9)
            writer.log({"type": "step", "epoch": epoch + 1, "step": state.batch, "global_step": state.global_step,
                        "loss": stats.loss, "mask_loss": stats.mask_loss, "iou_loss": stats.iou_loss,
                        "train_iou": stats.train_iou, "lr": lr, "prompts": stats.prompts, "samples_per_s": rate})
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", samples_s=f"{rate:.1f}")
            if (writer.enabled and config.save_every and state.global_step % config.save_every == 0
                    and state.batch < t.steps_per_epoch):
                writer.save_checkpoint("last", t.checkpoint(state))
            crash_point("train-step")
    bar.close()
    return prompts


def end_epoch(t: Training, state: TrainState, writer: RunWriter, epoch: int, prompts: int, started: float, *,
              progress: bool) -> None:
    """Validates, records the epoch, saves best.pt (when it improved) and last.pt, redraws the curves.
    Its throughput counts the whole epoch, validation included."""
    miou, click_miou = validate(t), validate_clicks(t)
    state.history.append(miou)
    state.epoch, state.batch = epoch + 1, 0
    improved = miou > state.best_miou
    if improved:
        state.best_miou, state.best_epoch = miou, epoch + 1
    # The checkpoint first, then the record: whoever reads "epoch N ended" in metrics.jsonl (the
    # serve app's progress, a cancel) finds epoch N's last.pt on disk.
    state.epoch_log = {"type": "epoch", "epoch": epoch + 1, "global_step": state.global_step, "val_miou": miou,
                       **_clicks_field(click_miou), "samples_per_s": prompts / max(time.time() - started, 1e-9)}
    if writer.enabled:  # only the writing rank builds checkpoints
        checkpoint = t.checkpoint(state)
        if improved:
            writer.save_checkpoint("best", checkpoint)
        writer.save_checkpoint("last", checkpoint)
    crash_point("epoch-checkpointed")
    writer.log(state.epoch_log)
    writer.plot()
    if progress and t.dist.is_main:
        print(f"epoch {epoch + 1}/{t.config.epochs}: validation mIoU {miou:.4f}"
              f"{' (best)' if improved else ''}{_clicks_text(click_miou)}, "
              f"{prompts / max(time.time() - started, 1e-9):.1f} samples/s")


def validate(t: Training) -> float:
    """Mean IoU over the validation objects: fixed prompts, masks compared at original resolution.

    Under torchrun each rank scores its own slice of the images and the sums are combined.
    """
    t.decoder.eval()
    settings = SampleSettings.fixed(t.config.val_prompt, seed=t.config.seed)
    indices = t.val_indices[t.dist.rank :: t.dist.world_size]
    scores = [
        iou(p.mask, masks.decode(p.info.objects[p.object_index].rle))
        for p in predict_cached_objects(t.decoder, t.cache, indices, settings,
                                        device=t.device, precision=decoder_precision(t.device),
                                        batch_size=t.config.batch_size, store=t.store)
    ]
    t.decoder.train()
    total, count = t.dist.sum([float(np.sum(scores)) if scores else 0.0, len(scores)])
    return total / count if count else float("nan")


def validate_clicks(t: Training) -> Optional[list[float]]:
    """mIoU after each click of the click protocol (clicks.py) on the validation objects, or None
    when the run does not validate by clicks (TrainConfig.val_clicks)."""
    clicks = t.config.val_clicks_in_effect
    if not clicks:
        return None
    t.decoder.eval()
    indices = t.val_indices[t.dist.rank :: t.dist.world_size]
    result = click_protocol(t.decoder, t.cache, indices, clicks, device=t.device,
                            precision=decoder_precision(t.device))
    t.decoder.train()
    count, *totals = t.dist.sum([result["objects"]] + [result["objects"] * m for m in result["miou"]])
    return [v / count if count else float("nan") for v in totals]


def _clicks_field(click_miou: Optional[list[float]]) -> dict:
    return {} if click_miou is None else {"val_click_miou": click_miou}


def _clicks_text(click_miou: Optional[list[float]]) -> str:
    if click_miou is None:
        return ""
    return f"; by clicks 1..{len(click_miou)}: " + " ".join(f"{v:.3f}" for v in click_miou)


def _progress(total: int, description: str, enabled: bool):
    return progress_bar(total, desc=description, unit="step", enabled=enabled, leave=False)
