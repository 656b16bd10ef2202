"""The recipe of the shipped tiny weights (`scripts/pretrain_tiny.py` runs it).

One end-to-end stage on generic shapes images (tiny.shapes with text-like clutter; never
stamps, nothing drawn to resemble them): the convolutional encoder (tiny_encoder.py) starts from
random weights, SAM's prompt encoder and mask decoder from the previous tiny's (samcache's own,
also trained on shapes only: the two-stage recipe of git commit fc41f5c, whose weights file is
`git show fc41f5c:samcache/weights/tiny_shapes.safetensors`). Why the warm decoder: measured over
8 minutes from scratch, a random decoder gives a random encoder almost no gradient (held-out box
mIoU 0.05), the previous decoder 0.32.

Each step: one image, `prompts_per_image` prompts (jittered boxes, some single points), one
feedback pass per prompt (its own previous mask as the mask prompt, half with a corrective
point), and the dense auxiliary loss (tiny.pretrain.DenseHead). The run checkpoints every 100
steps and an interrupted run continues from its last checkpoint when started again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from recipes.tiny.pretrain import PretrainConfig, PretrainResult, pretrain_tiny
from recipes.tiny.shapes import ShapesSettings


@dataclass(frozen=True)
class Recipe:
    """The recipe's knobs (defaults: the shipped weights').

    Arguments:
      seed: seeds the shapes images and the encoder's random initial weights.
      steps: end-to-end steps (one image each).
      lr: peak learning rate of the prompt encoder and mask decoder; encoder_lr_scale: the
        image encoder's, as a multiple of it (it starts from random weights, the decoder does not).
      prompts_per_image, feedback_passes, dense_weight: as PretrainConfig's.
      text: the share of images with text-like clutter (ShapesSettings.text).
      precision: "bf16" (faster on CPUs with AMX or AVX512-BF16) or "fp32".
      stop_after: end after this step, the schedule still that of `steps` (PretrainConfig's).
    """

    seed: int = 0
    steps: int = 3600
    lr: float = 5e-4
    encoder_lr_scale: float = 2.0
    prompts_per_image: int = 4
    feedback_passes: int = 1
    dense_weight: float = 1.0
    text: float = 0.5
    precision: str = "bf16"
    stop_after: Optional[int] = None


def pretrain_config(recipe: Recipe, init_decoder: str | Path) -> PretrainConfig:
    """The recipe as pretrain_tiny's config."""
    return PretrainConfig(steps=recipe.steps, seed=recipe.seed, lr=recipe.lr, encoder_lr_scale=recipe.encoder_lr_scale,
                          init_decoder=str(init_decoder), prompts_per_image=recipe.prompts_per_image,
                          feedback_passes=recipe.feedback_passes, dense_weight=recipe.dense_weight,
                          precision=recipe.precision, stop_after=recipe.stop_after, warmup_steps=100,
                          shapes=ShapesSettings(text=recipe.text))


def make_tiny_weights(out: str | Path, workdir: str | Path, init_decoder: str | Path, recipe: Recipe = Recipe(), *,
                      command: str, progress: bool = True) -> PretrainResult:
    """Runs the recipe, checkpointing in `workdir`, and writes `out` (.safetensors) with its provenance JSON."""
    from samcache.fileio import sha256_file

    stages = {"decoder_init": {"file": str(init_decoder), "sha256": sha256_file(init_decoder),
                               "what": "the previous tiny's prompt encoder and mask decoder (git fc41f5c), "
                                       "trained on shapes only"}}
    return pretrain_tiny(pretrain_config(recipe, init_decoder), out, progress=progress, command=command,
                         stages=stages, checkpoint=Path(workdir) / "pretrain_checkpoint.pt")
