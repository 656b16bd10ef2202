"""The two-stage recipe of the shipped tiny weights (`scripts/pretrain_tiny.py` runs it).

Both stages use generic shapes images (tiny.shapes; never stamps):

1. Decoder warm-up with samcache's own pipeline: draw a shapes data set, `embed` it with the
   randomly initialised tiny encoder, `train` the prompt encoder and mask decoder from that
   cache with box prompts, `export` the best epoch. From random weights, SAM's decoder learns
   far faster on a frozen encoder and box prompts than end to end with mixed prompts
   (measured: end to end alone reached 0.06 held-out box mIoU in 27 minutes; decoder-only with
   half point prompts 0.07 after 3 epochs).
2. End to end (tiny.pretrain.pretrain_tiny): every part of the model trains, on freshly drawn
   images, starting from stage 1's weights, the encoder at a tenth of the learning rate.

Each stage resumes: stage 1's data, cache and finished run are reused, an interrupted run is
resumed from its last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from samcache.config import EmbedConfig, PromptSettings, TrainConfig
from samcache.datasets import load_dataset
from samcache.embed import embed_dataset
from samcache.export import export_run
from samcache.runs import RunFolder
from samcache.tiny.pretrain import PretrainConfig, PretrainResult, pretrain_tiny
from samcache.tiny.shapes import generate_shapes
from samcache.train import train


@dataclass(frozen=True)
class Recipe:
    """The recipe's knobs (defaults: the shipped weights').

    Arguments:
      seed: seeds the shapes images and the random initial weights.
      warmup_images: stage 1's shapes images (90% train, 10% validation).
      warmup_epochs: stage 1's decoder epochs.
      steps: stage 2's end-to-end steps (one image each).
      lr: stage 2's peak learning rate; encoder_lr_scale: the encoder's share of it.
    """

    seed: int = 0
    warmup_images: int = 360
    warmup_epochs: int = 8
    steps: int = 300
    lr: float = 2e-4
    encoder_lr_scale: float = 0.1


def warmup_config(recipe: Recipe) -> TrainConfig:
    """Stage 1's `samcache train` options."""
    return TrainConfig(epochs=recipe.warmup_epochs, batch_size=4, objects_per_image=4, lr=1e-3, loss="dice-bce",
                       prompts=PromptSettings(mode="box"), train=["mask_decoder", "prompt_encoder"], warmup_steps=20,
                       workers=1, cache_in_memory="yes", seed=recipe.seed)


def make_tiny_weights(out: str | Path, workdir: str | Path, recipe: Recipe = Recipe(), *, command: str,
                      progress: bool = True) -> PretrainResult:
    """Runs both stages in `workdir` and writes `out` (.safetensors) with its provenance JSON."""
    work = Path(workdir)
    if not (work / "shapes" / "train.json").is_file():
        generate_shapes(work / "shapes", recipe.warmup_images, seed=recipe.seed, fractions=(0.9, 0.1, 0.0),
                        progress=progress)
    embed_dataset(load_dataset(work / "shapes"), work / "cache",
                  EmbedConfig(model_type="tiny", random_init=True, precision="bf16", workers=1, progress=progress))
    warmup, run = warmup_config(recipe), RunFolder(work / "run")
    if run.result() is None:  # stage 1 not finished yet
        train(work / "cache", run.path, warmup, resume=run.has_checkpoint("last"), progress=progress)
    export_run(run.path, work / "stage1.safetensors", fmt="safetensors", weights="best")
    stage1 = run.result()
    config = PretrainConfig(steps=recipe.steps, seed=recipe.seed, lr=recipe.lr,
                            encoder_lr_scale=recipe.encoder_lr_scale, init_weights=str(work / "stage1.safetensors"),
                            warmup_steps=20, prompts_per_image=4, eval_at_start=True)
    stages = {"decoder_warmup": {"config": warmup.model_dump(mode="json"), "train_seconds": stage1["seconds"],
                                 "val_miou_start": stage1["val_miou_start"], "val_miou_best": stage1["val_miou_best"],
                                 "history": stage1["history"]}}
    return pretrain_tiny(config, out, progress=progress, command=command, stages=stages)
