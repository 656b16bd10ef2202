"""Every option samcache takes: its name, type, range, default and meaning, checked in one place.

Each command's options are one pydantic model (`EmbedConfig`, `TrainConfig`, `EvalConfig`,
`ExportConfig`, `PredictConfig`), keyword-only, documented field by field (the first paragraph of
the docstring under a field is the command line's help text), and `FLAGS` maps each command's
options to their flags, in one place. Nested settings are nested models: the training prompts are a
`PromptSettings` inside `TrainConfig`, and a YAML `--config` file mirrors that:

    epochs: 8
    lr: 1e-3
    prompts:
      mode: mixed
      point_ratio: 0.3

Values are checked for type and range when a config is made, before any work starts;
`parse` turns pydantic's report into one line that names the option and the value. Options that
do not go together (the prompt rule of predict, generator options without --everything, ONNX
options of another format) are refused by the config too, as an `OptionCombinationError`. What is
accepted, on purpose: numbers written as strings (YAML 1.1 reads `1e-4` as a string), and
`train: mask_decoder` as a one-item list. What is refused: true/false where a number is
asked for, fractions where a whole number is, NaN and infinity, values out of range. Every
whole-number option has a lower and an upper bound: what the code that consumes it accepts
(torch's generator seeds, DataLoader workers, Python's index sizes, ...; see the MAX_ constants),
so no value gets past the config to fail deep inside a command.

This module imports no PyTorch, so the command line can build its options from it without
the seconds torch takes to import. The vocabularies of the options (losses, prompt kinds,
devices, precisions, trainable parts, split names, ...) live here too, and the modules that
implement them import them from here; the model types come from specs.py and the intensity
modes from images.py, their owners.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    AliasChoices,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from samcache.data.images import INTENSITY_MODES
from samcache.errors import ConfigError, OptionCombinationError
from samcache.models.specs import MODEL_TYPES

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
ENCODER_BACKENDS = ("auto", "torch", "openvino")
PROMPT_MODES = ("box", "point", "mixed", "box+points", "interactive")
MASK_PROMPT_GRADIENTS = ("detach", "backprop")
EVAL_PROMPTS = ("box", "point")
LOSSES = ("sam", "dice-bce", "mse-threshold")
DECODER_OUTPUTS = ("all", "used")
"""Which mask outputs a decoder makes (models/decoder.py PromptDecoder.forward)."""
TRAINABLE = ("mask_decoder", "prompt_encoder", "hq_head", "tail", "neck")
TAIL_PARTS = ("tail", "neck")
"""The --train parts of the image encoder, trained from a cache's tail tokens (models/encoder_tail.py)."""
DECODER_MODULES = ("mask_decoder", "prompt_encoder")
"""The modules a run's checkpoint holds (the model's `prompt_encoder` and `mask_decoder`); `--train hq_head`
trains SAM-HQ's parts of its mask decoder."""
RUN_WEIGHTS = ("best", "last")
EXPORT_FORMATS = ("pth", "safetensors", "onnx")
MEMORY_POLICIES = ("auto", "yes", "no")
SPLITS = ("train", "val", "test")
TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT = SPLITS
MAX_POINTS = 8
"""Points per prompt beyond this are ignored; fixed so that prompts stack into batches."""
MAX_CLICK_ITERATIONS = 24
"""The most corrective points `--prompt interactive` adds after the first prompt."""
REFINE_PASSES = 2
"""Passes of the interactive recipe that add no point, only the mask prompt (SAM: 2)."""
MAX_COUNT = 2**63 - 1
"""The most images, objects or steps a count option takes: sys.maxsize, the largest size that
itertools.islice (DataLoader's batches), range() and list slices accept. The data bounds a batch
or a shard long before: it never holds more images than there are."""
EPOCH_SEED_STRIDE = 100_003
"""Epoch e of a run with seed s is shuffled by torch.Generator().manual_seed(s * EPOCH_SEED_STRIDE + e)
(train/samples.py, EpochBatches)."""
MAX_EPOCHS = 100_000
"""Fewer epochs than EPOCH_SEED_STRIDE: every (seed, epoch) pair shuffles its own way."""
MAX_SEED = (2**64 - MAX_EPOCHS) // EPOCH_SEED_STRIDE
"""The largest seed whose last epoch's shuffle seed is within torch.Generator.manual_seed's 2**64 - 1.
numpy's generators (prompts.rng_for) take any seed: the commands share this one range."""
MAX_WORKERS = 128
"""Each DataLoader worker is a process, and the main process holds 4 open files for each: the common
limit of 1024 open files stops at about 250, and more workers than cores only compete for them."""
MAX_MEMORY_MB = (2**63 - 1) // 2**20
"""A memory budget whose bytes fit in int64, the type of the memory counts it is compared with."""
MAX_OVERLAYS = 200
"""Objects per overlay figure: matplotlib's Agg draws under 2**16 pixels a side, and each object
takes a row of up to 288 pixels (evaluate/report.py), so 227 rows fit."""
MAX_POINTS_PER_SIDE = 256
"""The densest segment-everything grid: 65,536 points."""


def _no_bool(value: Any) -> Any:
    # pydantic's lax mode reads True as 1; `epochs: true` is a mistake, not one epoch.
    if isinstance(value, bool):
        raise ValueError("a number is needed, not true/false")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool), AllowInfNan(False)]


class _Options(BaseModel):
    """Base of every config: unknown keys are errors, assignments are checked too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True,
                              protected_namespaces=())


# ----------------------------------------------------------------------------------- embed
def _comma_list(value: Any) -> Any:
    # `train: mask_decoder` (YAML) and `--train mask_decoder,prompt_encoder` (CLI) are lists too.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class EmbedConfig(_Options):
    """Options of `samcache embed`."""

    model_type: Literal[MODEL_TYPES] = "tiny"
    """Image encoder to run: SAM's (vit_b/l/h, samcache's tiny), MobileSAM's (vit_t), SAM-HQ's (hq_vit_b/l/h/tiny:
    the cache also holds the encoder's early feature, 8 MiB per image for hq_vit_b) or SAM 2.1's Hiera
    (sam2.1_hiera_t/s/b+/l: needs the sam2 package; the cache then holds its three feature maps, 8 MiB per image)."""
    checkpoint: Optional[Path] = None
    """Weights file (default: Meta's official weights; for tiny, samcache's pretrained ones)."""
    random_init: bool = False
    """tiny only: random weights instead of the pretrained ones."""
    batch_size: Optional[Annotated[Int, Field(ge=1, le=MAX_COUNT)]] = None
    """Images per encoder forward (default: 8 on CUDA, 1 on the CPU, where batching vit_b only adds
    memory traffic)."""
    device: Literal[DEVICES] = "auto"
    """auto (CUDA when available), cpu or cuda."""
    precision: Literal[PRECISIONS] = "auto"
    """auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32."""
    backend: Literal[ENCODER_BACKENDS] = "auto"
    """Who runs the encoder: auto (OpenVINO on the CPU, converted once per weights into
    $SAMCACHE_HOME; torch on CUDA), torch or openvino."""
    workers: Optional[Annotated[Int, Field(ge=0, le=MAX_WORKERS)]] = None
    """Processes decoding images while the encoder runs (0: in the main process). Unset: 2 on
    CUDA, where the CPU is otherwise idle; 0 on the CPU, where the encoder already uses every
    core and workers only compete with it.

    BENCHMARKS.md ("Embed on a CPU") has the measurement behind the CPU default."""
    strict: bool = False
    """Stop at the first image that fails to decode (after committing what is done)."""
    intensity: Literal[INTENSITY_MODES] = "percentile"
    """How images with more than 8 bits become 8-bit (images.read_image)."""
    views: Annotated[list[str], BeforeValidator(_comma_list)] = []
    """Also embed these views of each image (data/views.py): hflip, vflip, rot90, rot180, rot270, scaleS
    (0 < S < 1: shrunk by S in the input frame), comma-separated; each costs one more encoder run and one
    more embedding per image. Training draws one of the original and its views per image and epoch;
    evaluation reads the original only."""
    tail_blocks: Annotated[Int, Field(ge=0, le=64)] = 0
    """Also store, per image, the encoder's hidden state before its last K blocks (vit_b: 768x64x64 fp16,
    6 MiB per image; the tiny: 192x64x64, 1.5 MiB), so `train --train tail` can train those blocks and
    the neck from the cache. 0: the embedding alone."""
    shard_images: Annotated[Int, Field(ge=1, le=MAX_COUNT)] = 64
    """Commit a shard after this many images (what a crash can lose at most)."""
    shard_seconds: Annotated[Float, Field(gt=0)] = 60.0
    """... or after this many seconds, whichever comes first."""
    progress: bool = True
    """Show a progress bar."""


# ----------------------------------------------------------------------------------- train
class PromptSettings(_Options):
    """How training prompts are drawn from the ground truth."""

    model_config = ConfigDict(frozen=True)

    mode: Literal[PROMPT_MODES] = "box"
    """Training prompts: box, point, mixed (a point prompt with probability point_ratio),
    box+points (the jittered box and the points in one prompt, as SamPredictor takes both), or
    interactive (SAM's own recipe: a box or one point, then corrective points from the error of
    each prediction, with the previous logits fed back as the mask prompt; interactive.py)."""
    box_jitter: Annotated[Float, Field(ge=0, le=1)] = 0.1
    """Each box side moves by up to this fraction of the box's width or height..."""
    box_jitter_max: Annotated[Float, Field(ge=0)] = 20.0
    """... and by at most this many original pixels (SAM's default: 10%, 20 px)."""
    positive_points: Annotated[Int, Field(ge=1, le=MAX_POINTS)] = 1
    """Points inside the mask per point prompt."""
    negative_points: Annotated[Int, Field(ge=0, le=MAX_POINTS)] = 0
    """Points in the box outside the mask per point prompt."""
    point_ratio: Annotated[Float, Field(ge=0, le=1)] = 0.5
    """With mode mixed, the probability that a prompt is points rather than a box."""
    click_iterations: Annotated[Int, Field(ge=0, le=MAX_CLICK_ITERATIONS)] = 8
    """With mode interactive: the corrective points added one per decoder pass after the first
    prompt, each drawn uniformly from the previous prediction's error (SAM: 8)."""
    mask_prompt_prob: Annotated[Float, Field(ge=0, le=1)] = 0.5
    """With mode interactive: the probability that a pass adding a point also gets the previous
    prediction's low-res logits as the mask prompt (SAM: always; micro-sam: 0.5). The two passes
    that add no point (one at random among the corrective ones, one last) always get it; 0 turns
    mask feedback off, and those two passes with it.

    Default 0.5: on the demo's stamps it cost far less box mIoU than 1 (BENCHMARKS.md, "Interactive
    training") and, unlike 0, still trains the mask path that SamPredictor's mask_input uses."""
    mask_prompt_gradient: Literal[MASK_PROMPT_GRADIENTS] = "detach"
    """With mode interactive: detach (the fed-back logits are a constant of the next pass, as in
    micro-sam; each pass is backpropagated at once, so memory is one pass's) or backprop (the
    gradient flows back through them into earlier passes, as in SAM 2; memory grows with the
    passes)."""
    trained_passes: Optional[Annotated[Int, Field(ge=1, le=1 + MAX_CLICK_ITERATIONS + REFINE_PASSES)]] = None
    """With mode interactive: backpropagate only this many of each step's passes, drawn at random
    (seeded by the step's first image); the others run forward only, to place the next point and
    feed back their mask. A cheaper recipe than SAM's, which trains every pass (none, the default):
    a pass's backward is over half its cost (BENCHMARKS.md, "Interactive training"). Needs
    mask_prompt_gradient detach."""

    @property
    def passes(self) -> int:
        """Decoder passes per step of the interactive recipe: the first prompt, one per corrective
        point, and the refinement passes when there is mask feedback (SAM: 1 + 8 + 2 = 11)."""
        return 1 + self.click_iterations + (REFINE_PASSES if self.mask_prompt_prob > 0 else 0)

    @model_validator(mode="after")
    def _points_fit(self) -> "PromptSettings":
        if self.positive_points + self.negative_points > MAX_POINTS:
            raise ValueError(f"positive_points + negative_points is at most {MAX_POINTS}, got "
                             f"{self.positive_points} + {self.negative_points}")
        if self.trained_passes is not None and self.mask_prompt_gradient != "detach":
            raise _combination("--trained-passes leaves passes out of the backward: it needs "
                               "--mask-prompt-gradient detach")
        if self.trained_passes is not None and self.trained_passes > self.passes:
            raise _combination(f"--trained-passes {self.trained_passes} is more than the {self.passes} passes of a "
                               f"step (1 + --click-iterations + {REFINE_PASSES} with mask feedback)")
        return self


def _combination(message: str) -> PydanticCustomError:
    """The error of options that do not go together (parse turns it into OptionCombinationError)."""
    return PydanticCustomError("option_combination", message)


def _said_whole(message: str) -> PydanticCustomError:
    """An error whose message already names the option and the value (parse passes it on as it is)."""
    return PydanticCustomError("option_said_whole", message)


def _each_once(field: str, noun: str, values: list[str]) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{field} names {noun} twice: {','.join(values)}")


def _memory_policy(value: Any) -> Any:
    # YAML 1.1 reads a bare yes/no as a boolean.
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


class TrainConfig(_Options):
    """Options of `samcache train` (also the keys of its YAML config file)."""

    epochs: Annotated[Int, Field(ge=1, le=MAX_EPOCHS)] = 10
    """Passes over the training split."""
    batch_size: Annotated[Int, Field(ge=1, le=MAX_COUNT)] = 4
    """Images per optimizer step, over all processes under torchrun (the global batch: each rank
    takes its share, so a run's results do not depend on the number of processes); each image
    contributes up to objects_per_image prompts."""
    objects_per_image: Annotated[Int, Field(ge=1, le=MAX_COUNT)] = 8
    """K: objects (prompts) sampled per image and step (all of them when the image has fewer)."""
    lr: Annotated[Float, Field(gt=0)] = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: Annotated[Float, Field(ge=0)] = 0.01
    """AdamW weight decay."""
    warmup_steps: Annotated[Int, Field(ge=0, le=MAX_COUNT)] = 20
    """Linear warmup steps, then cosine decay to zero at the last step."""
    grad_clip: Annotated[Float, Field(ge=0)] = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    prompts: PromptSettings = PromptSettings()
    """How training prompts are drawn (mode, box jitter, points)."""
    loss: Literal[LOSSES] = "sam"
    """sam: the model's own recipe (SAM: 20 focal + dice + IoU MSE; SAM 2.1: 20 focal + dice + IoU L1 on
    every multimask output + object score BCE; SAM-HQ: BCE + dice on its HQ token's mask at uncertain points),
    dice-bce, or mse-threshold (the tutorial's, for comparison)."""
    trainable: Optional[Annotated[list[Literal[TRAINABLE]], BeforeValidator(_comma_list), Field(min_length=1)]] = (
        Field(None, validation_alias=AliasChoices("trainable", "train")))
    """What is trainable: mask_decoder, prompt_encoder, hq_head (SAM-HQ's HQ token, its MLP and fusion layers),
    tail (the encoder's last K blocks and its neck, from a cache made with `embed --tail-blocks K`; with
    lora_rank, LoRA adapters on the blocks' attention and MLP projections instead of their weights) or neck
    (the encoder's neck alone, the K cached blocks frozen).
    Unset: the model's default, mask_decoder (SAM-HQ: hq_head, SAM's own decoder frozen as SAM-HQ trains it).

    Called `train` in YAML files and runs' saved configs too (--train on the command line)."""
    tail_lr: Optional[Annotated[Float, Field(gt=0)]] = None
    """Peak learning rate of the encoder's tail and neck (--train tail or neck), on the same schedule as lr.
    Unset: lr / 10, since pretrained encoder blocks move further per step than the small decoder."""
    lora_rank: Optional[Annotated[Int, Field(ge=1, le=256)]] = None
    """With --train tail: train rank-R LoRA adapters (update B @ A, scale 1) on the tail blocks' attention and
    MLP projections instead of the blocks' weights (the neck trains in full); merged into the weights at
    export. Unset: the blocks' weights train in full."""
    train_split: str = TRAIN_SPLIT
    """The cache split to train on."""
    val_split: str = VAL_SPLIT
    """The cache split validated after each epoch (fixed prompts, mIoU at original resolution)."""
    val_prompt: Literal[EVAL_PROMPTS] = "box"
    """Validation prompts: box (the exact box) or point (the mask's most interior point)."""
    val_clicks: Optional[Annotated[Int, Field(ge=0, le=20)]] = None
    """Also validate with the click protocol (train/click_protocol.py) after each epoch: mIoU after click 1..N,
    logged as val_click_miou (not used to pick best.pt). Unset: 3 with --prompt interactive, else 0."""
    val_max_images: Optional[Annotated[Int, Field(ge=1, le=MAX_COUNT)]] = 200
    """Validate on at most this many images of the split, a subset fixed by the seed (null: all).

    Bounded so that a large cache starts training at once and epochs are not mostly validation;
    `samcache eval` always scores every image."""
    seed: Annotated[Int, Field(ge=0, le=MAX_SEED)] = 0
    """Seeds shuffling, object choice and prompt sampling."""
    device: Literal[DEVICES] = "auto"
    """auto (CUDA when available), cpu or cuda."""
    precision: Literal[PRECISIONS] = "auto"
    """The decoder's arithmetic in training steps. auto: bf16 autocast on CUDA and on CPUs with native bf16
    (AVX512-BF16, AMX: the demo's run 1.40x as fast as in fp32, its losses following fp32's; BENCHMARKS.md), else fp32.
    Validation decodes as `samcache eval` does (fp32 on the CPU), so that its mIoU is eval's."""
    workers: Annotated[Int, Field(ge=0, le=MAX_WORKERS)] = 2
    """DataLoader worker processes reading the cache and building targets."""
    cache_in_memory: Annotated[Literal[MEMORY_POLICIES], BeforeValidator(_memory_policy)] = "auto"
    """auto, yes or no: hold all embeddings in RAM (or GPU memory) so epochs do no I/O."""
    memory_budget_mb: Optional[Annotated[Int, Field(ge=1, le=MAX_MEMORY_MB)]] = None
    """With cache_in_memory auto, the most memory the embeddings may take (default: half the free memory)."""
    save_every: Optional[Annotated[Int, Field(ge=1, le=MAX_COUNT)]] = 50
    """Also save last.pt every this many steps inside an epoch (null: only at epoch ends)."""
    checkpoint: Optional[Path] = None
    """The base weights file, when the cache was not made with samcache's tiny or official weights."""

    @model_validator(mode="before")
    @classmethod
    def _train_is_trainable(cls, values: Any) -> Any:
        # YAML files and saved runs may say `train:`; the command line's --train sets `trainable`,
        # which overrides them, as any flag overrides its file.
        if isinstance(values, dict) and "train" in values and "trainable" in values:
            values = {k: v for k, v in values.items() if k != "train"}
        return values

    @model_validator(mode="after")
    def _unique_parts(self) -> "TrainConfig":
        _each_once("train", "a part", self.trainable or [])
        if self.lora_rank is not None and "tail" not in (self.trainable or []):
            raise _combination("--lora-rank adapts the encoder's tail blocks: add tail to --train "
                              "(--train tail,mask_decoder)")
        if "tail" in (self.trainable or []) and "neck" in self.trainable:
            raise _combination("--train tail trains the neck too: name tail or neck, not both")
        return self

    @property
    def trains_tail(self) -> bool:
        """Whether the run trains the encoder's tail or neck (and so reads the cache's tail tokens)."""
        return bool(set(TAIL_PARTS) & set(self.trainable or ()))

    @property
    def tail_lr_in_effect(self) -> float:
        return self.tail_lr if self.tail_lr is not None else self.lr / 10

    @property
    def val_clicks_in_effect(self) -> int:
        """How many clicks validation runs: val_clicks, or its default for the prompt mode when unset."""
        if self.val_clicks is not None:
            return self.val_clicks
        return 3 if self.prompts.mode == "interactive" else 0


RESUME_MAY_CHANGE = ("epochs", "workers", "device", "cache_in_memory", "memory_budget_mb", "save_every",
                     "checkpoint")
"""What --resume may change: how long and where a run goes on, never what it computes."""


def resume_changes(saved: dict, now: TrainConfig) -> list[str]:
    """The options of `now` that differ from the run's `saved` config and may not change on resume,
    as "name (saved -> now)", nested settings by dotted path."""
    before = _flatten(parse(TrainConfig, saved, source="the run's checkpoint").model_dump(mode="json"))
    after = _flatten(now.model_dump(mode="json"))
    return [f"{key} ({before.get(key)!r} -> {after.get(key)!r})" for key in sorted(before.keys() | after.keys())
            if key.split(".")[0] not in RESUME_MAY_CHANGE and before.get(key) != after.get(key)]


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ------------------------------------------------------------------------- segment everything
class EverythingSettings(_Options):
    """Segment-everything's options: SamAutomaticMaskGenerator's, with its defaults. Not offered:
    crop layers (each crop would need the encoder) and min_mask_region_area (its small-region
    clean-up; default 0 there too)."""

    model_config = ConfigDict(frozen=True)

    points_per_side: Annotated[Int, Field(ge=1, le=MAX_POINTS_PER_SIDE)] = 32
    """Segment everything: the point grid is this many points by this many over the image."""
    points_per_batch: Annotated[Int, Field(ge=1, le=MAX_POINTS_PER_SIDE**2)] = 64
    """Segment everything: points decoded together (memory, not results; at most the whole grid)."""
    pred_iou_thresh: Annotated[Float, Field(ge=0, le=1)] = 0.88
    """Segment everything: keep masks whose predicted IoU is above this."""
    stability_score_thresh: Annotated[Float, Field(ge=0, le=1)] = 0.95
    """Segment everything: keep masks whose stability score (IoU of the mask at logit +offset and
    -offset) is at least this."""
    stability_score_offset: Annotated[Float, Field(gt=0)] = 1.0
    """Segment everything: the logit offset of the stability score."""
    box_nms_thresh: Annotated[Float, Field(gt=0, le=1)] = 0.7
    """Segment everything: of two masks whose boxes overlap above this IoU, the lower-scored is dropped."""


# ------------------------------------------------------------------------------------ eval
class EvalConfig(_Options):
    """Options of `samcache eval`."""

    split: str = TEST_SPLIT
    """Cache split to score."""
    prompt: Annotated[list[Literal[EVAL_PROMPTS]], BeforeValidator(_comma_list), Field(min_length=1)] = ["box"]
    """box: each object's exact box; point: its most interior point; several, comma-separated
    (box,point), score every model with each kind (the first kind leads the report)."""
    box_jitter: Annotated[Float, Field(ge=0, le=1)] = 0.0
    """Move box sides by up to this fraction (at most 20 px), seeded; 0 keeps exact boxes."""
    seed: Annotated[Int, Field(ge=0, le=MAX_SEED)] = 0
    """Seeds the box jitter and the random overlay picks."""
    clicks: Annotated[Int, Field(ge=0, le=100)] = 0
    """Also run the click protocol with this many clicks per object (train/click_protocol.py): mIoU after each
    click and the clicks needed for IoU 0.85 / 0.90 (NoC), for each model; 0: not run."""
    weights: Literal[RUN_WEIGHTS] = "best"
    """Which checkpoint of the run: best or last."""
    batch_size: Annotated[Int, Field(ge=1, le=MAX_COUNT)] = 4
    """Images per decoder batch."""
    device: Literal[DEVICES] = "auto"
    """auto (CUDA when available), cpu or cuda."""
    checkpoint: Optional[Path] = None
    """Base weights file, when not samcache's tiny or the official weights."""
    overlays: Annotated[Int, Field(ge=0, le=MAX_OVERLAYS)] = 6
    """Objects per overlay figure (worst, best, random)."""
    everything: bool = False
    """Also segment everything in each image of the split with each model (a point grid, as
    SamAutomaticMaskGenerator) and score the masks against all the ground truth with COCO mask AP,
    AP50 and AR100 (pycocotools)."""
    generator: EverythingSettings = EverythingSettings()
    """Segment-everything's options (with everything)."""

    @model_validator(mode="after")
    def _unique_prompts(self) -> "EvalConfig":
        _each_once("prompt", "a kind", self.prompt)
        _generator_needs_everything(self.generator, self.everything)
        return self


def _generator_needs_everything(generator: "EverythingSettings", everything: bool) -> None:
    if generator != EverythingSettings() and not everything:
        raise _combination("--points-per-side and the other generator options go with --everything")


# ---------------------------------------------------------------------------------- export
class ExportConfig(_Options):
    """Options of `samcache export`."""

    format: Literal[EXPORT_FORMATS] = "pth"
    """pth or safetensors: the full model's state dict in its family's layout; onnx: decoder.onnx in
    segment-anything's official ONNX interface and encoder.onnx, with an X-AnyLabeling config and a README."""
    weights: Literal[RUN_WEIGHTS] = "best"
    """Which checkpoint of the run: best or last."""
    checkpoint: Optional[Path] = None
    """Base weights file, if not the run's."""
    return_single_mask: bool = False
    """onnx: decoder.onnx outputs one mask per prompt (SAM's choice) instead of all four."""
    quantize: bool = False
    """onnx: also write decoder.quant.onnx and encoder.quant.onnx (uint8 weights)."""

    @model_validator(mode="after")
    def _onnx_options(self) -> "ExportConfig":
        if (self.return_single_mask or self.quantize) and self.format != "onnx":
            raise _combination("--return-single-mask and --quantize are options of --format onnx")
        return self


# --------------------------------------------------------------------------------- predict
Box = tuple[float, float, float, float]
Point = tuple[float, float, int]


def check_box(box: Any, where: str = "") -> Box:
    """A box XYXY of finite numbers with x1 > x0 and y1 > y0 (ValueError, naming `where`, otherwise)."""
    prefix = f"{where}: " if where else ""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4:
        raise ValueError(f"{prefix}a box is four numbers x0,y0,x1,y1, got {box!r}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{prefix}box coordinates must be finite numbers, got {values}")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{prefix}x1 must exceed x0 and y1 must exceed y0")
    return (x0, y0, x1, y1)


def _box(value: Any) -> Any:
    """`x0,y0,x1,y1` (or four numbers) -> a checked box."""
    if value is None:
        return None
    where = f"--box {value}" if isinstance(value, str) else "--box"
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",")]
        except ValueError:
            value = []
        if len(value) != 4:
            raise _said_whole(f"--box takes x0,y0,x1,y1 in pixels, got {where[6:]!r}")
    try:
        return check_box(value, where)
    except ValueError as exc:
        raise _said_whole(str(exc)) from None


def _point(value: Any) -> Any:
    """`x,y` or `x,y,label` (1: inside the object, 0: outside) -> (x, y, label)."""
    if not isinstance(value, str):
        return value
    parts = value.split(",")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise _said_whole(f"--point takes x,y or x,y,label in pixels, got {value!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)) or label not in (0, 1):
        raise _said_whole(f"--point {value}: finite x, y and a label of 1 (inside) or 0 (outside)")
    return (x, y, label)


class PredictConfig(_Options):
    """Options of `samcache predict`: the model, the prompts (checked together here), the generator."""

    run: Optional[Path] = None
    """A training run."""
    checkpoint: Optional[Path] = None
    """A full model state dict (e.g. an export)."""
    model_type: Optional[Literal[MODEL_TYPES]] = None
    """Model type of --checkpoint (default: from its .json metadata)."""
    box: Annotated[Optional[Box], BeforeValidator(_box)] = None
    """x0,y0,x1,y1 in pixels, for every image."""
    points: list[Annotated[Point, BeforeValidator(_point)]] = []
    """x,y[,label] in pixels (label 1 inside the object, the default; 0 outside), for every image;
    repeat it for more points; with --box, one prompt of the box and the points."""
    boxes: Optional[Path] = None
    """COCO JSON whose bbox annotations are the prompts (matched by file name)."""
    cache: Optional[Path] = None
    """Take embeddings from this cache when an image is in it (default: the run's cache)."""
    everything: bool = False
    """Segment everything (a point grid, as SamAutomaticMaskGenerator) instead of prompts."""
    generator: EverythingSettings = EverythingSettings()
    """Segment-everything's options (with everything)."""
    device: Literal[DEVICES] = "auto"
    """auto (CUDA when available), cpu or cuda."""

    @model_validator(mode="after")
    def _one_model_and_one_kind_of_prompt(self) -> "PredictConfig":
        if (self.run is None) == (self.checkpoint is None):
            raise _combination("give either --run or --checkpoint")
        prompted = self.box is not None or bool(self.points) or self.boxes is not None
        if self.everything and prompted:
            raise _combination("--everything takes no --box, --point or --boxes")
        if not self.everything and (self.box is None and not self.points) == (self.boxes is None):
            raise _combination("give either --box and/or --point, or --boxes (or --everything)")
        _generator_needs_everything(self.generator, self.everything)
        return self


# ------------------------------------------------------------------------------------ flags
EVERYTHING_FLAGS = {
    "points_per_side": "--points-per-side", "points_per_batch": "--points-per-batch",
    "pred_iou_thresh": "--pred-iou-thresh", "stability_score_thresh": "--stability-score-thresh",
    "stability_score_offset": "--stability-score-offset", "box_nms_thresh": "--box-nms-thresh",
}
FLAGS: dict[type, dict[str, str]] = {
    EmbedConfig: {
        "model_type": "--model", "checkpoint": "--checkpoint", "random_init": "--random-init",
        "batch_size": "--batch-size", "device": "--device", "precision": "--precision", "backend": "--backend",
        "workers": "--workers", "intensity": "--intensity", "shard_images": "--shard-images",
        "tail_blocks": "--tail-blocks", "views": "--views",
    },
    TrainConfig: {
        "epochs": "--epochs", "batch_size": "--batch-size", "objects_per_image": "--objects-per-image", "lr": "--lr",
        "weight_decay": "--weight-decay", "warmup_steps": "--warmup-steps", "grad_clip": "--grad-clip",
        "prompts.mode": "--prompt", "prompts.box_jitter": "--box-jitter", "prompts.box_jitter_max": "--box-jitter-max",
        "prompts.point_ratio": "--point-ratio", "prompts.click_iterations": "--click-iterations",
        "prompts.mask_prompt_prob": "--mask-prompt-prob", "prompts.mask_prompt_gradient": "--mask-prompt-gradient",
        "prompts.trained_passes": "--trained-passes",
        "loss": "--loss", "trainable": "--train", "tail_lr": "--tail-lr", "lora_rank": "--lora-rank",
        "val_split": "--val-split", "val_prompt": "--val-prompt",
        "val_clicks": "--val-clicks", "val_max_images": "--val-max-images", "seed": "--seed", "device": "--device",
        "precision": "--precision", "workers": "--workers", "cache_in_memory": "--cache-in-memory",
        "save_every": "--save-every", "checkpoint": "--checkpoint",
    },
    EvalConfig: {
        "split": "--split", "prompt": "--prompt", "clicks": "--clicks", "box_jitter": "--box-jitter", "seed": "--seed",
        "weights": "--weights", "device": "--device", "checkpoint": "--checkpoint", "everything": "--everything",
        **{f"generator.{path}": flag for path, flag in EVERYTHING_FLAGS.items()},
    },
    ExportConfig: {
        "format": "--format", "weights": "--weights", "checkpoint": "--checkpoint",
        "return_single_mask": "--return-single-mask", "quantize": "--quantize",
    },
    PredictConfig: {
        "run": "--run", "checkpoint": "--checkpoint", "model_type": "--model", "box": "--box", "points": "--point",
        "boxes": "--boxes", "cache": "--cache", "everything": "--everything",
        **{f"generator.{path}": flag for path, flag in EVERYTHING_FLAGS.items()}, "device": "--device",
    },
}
"""Each command's options and their command-line flags, by config and dotted option path."""


# --------------------------------------------------------------------------------- parsing
ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse(cls: type[ConfigT], values: dict, *, source: str = "", flags: Optional[dict[str, str]] = None) -> ConfigT:
    """`cls(**values)`, with bad values reported as one line that names each option and value.

    Arguments:
      cls: the config model.
      values: option values; nested settings as nested dicts.
      source: where the values came from (a YAML file), for the message.
      flags: the options given on the command line, by path, with their flag
        ("prompts.mode" -> "--prompt"): the message names the flag for those.
    """
    try:
        return cls(**values)
    except ValidationError as exc:
        if all(error["type"] == "option_combination" for error in exc.errors()):
            raise OptionCombinationError("; ".join(error["msg"] for error in exc.errors())) from None
        if all(error["type"] == "option_said_whole" for error in exc.errors()):
            raise ConfigError("; ".join(error["msg"] for error in exc.errors())) from None
        raise ConfigError(describe_errors(cls, exc, values, source=source, flags=flags or {})) from None


def from_sources(cls: type[ConfigT], *, file: Optional[Path] = None, base: Optional[dict] = None,
                 overrides: Optional[dict[str, Any]] = None, flags: Optional[dict[str, str]] = None) -> ConfigT:
    """A config from defaults, then a YAML file (or `base` values), then command-line overrides.

    Arguments:
      file: a YAML mapping of options (nested settings nested; `-` in keys read as `_`).
      base: values to start from instead of a file (a run's saved config, on --resume).
      overrides: {"epochs": 3, "prompts.mode": "point"}: dotted paths; None values are skipped.
      flags: {path: flag} of the overrides, for messages.
    """
    values: dict = dict(base or {})
    source = ""
    if file is not None:
        source = str(file)
        try:
            loaded = yaml.safe_load(Path(file).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{file} is not a readable YAML file: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{file} must hold a mapping of option names to values")
        values = _underscored(loaded or {})
    given = {}
    for path, value in (overrides or {}).items():
        if value is None:
            continue
        node = values
        *parents, name = path.split(".")
        for parent in parents:
            if node.get(parent) is not None and not isinstance(node[parent], dict):
                raise ConfigError(f"invalid option: {parent} = {node[parent]!r}{f' (in {source})' if source else ''}: "
                                  f"a group of settings is needed ({parent}.{name}: ...)")
            node[parent] = dict(node.get(parent) or {})
            node = node[parent]
        node[name] = value
        given[path] = (flags or {}).get(path, path)
    return parse(cls, values, source=source, flags=given)


def _underscored(values: dict) -> dict:
    return {str(k).replace("-", "_"): _underscored(v) if isinstance(v, dict) else v for k, v in values.items()}


def describe_errors(cls: type[BaseModel], exc: ValidationError, values: dict, *, source: str = "",
                    flags: dict[str, str]) -> str:
    """One line for all of pydantic's errors: each names the option, the value given and the rule."""
    problems = []
    for error in exc.errors(include_url=False):
        location = [str(part) for part in error["loc"] if not isinstance(part, int)]
        # Literal and list errors add the type to the location; the option is the known prefix.
        option = _option_prefix(location, values)
        name = ".".join(option or location) or "config"
        message = error["msg"][0].lower() + error["msg"][1:]
        message = message.removeprefix("value error, ")
        if error["type"] in _BOUND_ERRORS:
            message = _range_message(cls, option or location) or message
        if error["type"] == "extra_forbidden":
            moved = _nested_home(cls, name)
            where = f" in {source}" if source else ""
            problems.append(f"unknown option {name}{where}" + (f" (did you mean {moved}?)" if moved else ""))
        elif name in flags:
            problems.append(f"{flags[name]} {error['input']!r}: {message}")
        elif option:
            where = f" (in {source})" if source else ""
            problems.append(f"{name} = {error['input']!r}{where}: {message}")
        else:
            problems.append(f"{name}: {message}")
    return f"invalid option{'s' if len(problems) > 1 else ''}: " + "; ".join(problems)


_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _range_message(cls: type[BaseModel], location: list[str]) -> str:
    """"input should be from 0 to 24" for an option bounded on both sides ("" for others: pydantic's
    message about the one bound already says the whole range)."""
    try:
        low, high = field_bounds(cls, ".".join(location))
    except (KeyError, AttributeError):
        return ""
    if low is None or high is None:
        return ""
    (low_kind, low_value), (high_kind, high_value) = low, high
    if low_kind == "ge" and high_kind == "le":
        return f"input should be from {low_value} to {high_value}"
    lower = f"at least {low_value}" if low_kind == "ge" else f"greater than {low_value}"
    upper = f"at most {high_value}" if high_kind == "le" else f"less than {high_value}"
    return f"input should be {lower} and {upper}"


def field_bounds(cls: type[BaseModel], path: str) -> tuple[Optional[tuple[str, Any]], Optional[tuple[str, Any]]]:
    """The lower and upper bound of option `path`, each as ("ge" or "gt", value) and ("le" or "lt",
    value), or None when it has none."""
    bounds: dict[str, Any] = {}
    for constraint in _constraints(_field(cls, path)):
        for kind in ("gt", "ge", "lt", "le"):
            if getattr(constraint, kind, None) is not None:
                bounds[kind] = getattr(constraint, kind)
    low = next(((kind, bounds[kind]) for kind in ("ge", "gt") if kind in bounds), None)
    high = next(((kind, bounds[kind]) for kind in ("le", "lt") if kind in bounds), None)
    return low, high


def _constraints(field) -> list:
    """The constraints of a field, also those inside Optional[Annotated[X, Field(...)]]."""
    found, pending = list(field.metadata), [field.annotation]
    while pending:
        annotation = pending.pop()
        if get_origin(annotation) is Annotated:
            annotation, *metadata = get_args(annotation)
            for item in metadata:
                found.extend(getattr(item, "metadata", [item]))  # Field(...) holds its constraints
            pending.append(annotation)
        elif get_origin(annotation) is Union:
            pending.extend(get_args(annotation))
    return found


def _nested_home(cls: type[BaseModel], name: str) -> Optional[str]:
    """Where a top-level key that is unknown lives in a nested settings model (older configs were flat)."""
    for parent, field in cls.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            key = {"prompt": "mode"}.get(name, name)  # `prompt: box` was the flat spelling of prompts.mode
            if key in nested.model_fields:
                return f"{parent}.{key}"
    return None


def _option_prefix(location: list[str], values: dict) -> list[str]:
    """The longest prefix of `location` that names an option given in `values`."""
    prefix: list[str] = []
    node: Any = values
    for part in location:
        if not isinstance(node, dict) or part not in node:
            break
        prefix.append(part)
        node = node[part]
    return prefix


def field_description(cls: type[BaseModel], path: str) -> str:
    """The docstring of option `path` ("prompts.mode" for nested settings)."""
    return _field(cls, path).description or ""


def field_default(cls: type[BaseModel], path: str) -> Any:
    return _field(cls, path).get_default(call_default_factory=True)


def field_annotation(cls: type[BaseModel], path: str) -> Any:
    return _field(cls, path).annotation


def _field(cls: type[BaseModel], path: str):
    *parents, name = path.split(".")
    for parent in parents:
        cls = cls.model_fields[parent].annotation
    return cls.model_fields[name]
