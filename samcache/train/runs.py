"""The run folder: what `samcache train` writes and `eval`, `export` and `predict` read.

This module is the only one that knows the folder's layout:

    RUN/config.yaml       the resolved TrainConfig, nested as a YAML --config file takes it
    RUN/.samcache-output.json  the marker that says the folder is a samcache run (outputs.py)
    RUN/run.json          model type, base weights, the cache it was trained from, versions;
                          the result once training ends
    RUN/images.json       the cache's train and val images the run started with, by name and
                          SHA-256: --resume refuses another cache, or the same one grown since
    RUN/metrics.jsonl     one JSON line per step and per epoch
    RUN/curves.png        loss and validation mIoU
    RUN/tensorboard/      the same scalars as metrics.jsonl as TensorBoard event files, when the
                          `tensorboard` package is installed (`tensorboard --logdir runs/`)
    RUN/last.pt           the checkpoint after the last epoch (and every save_every steps):
                          what --resume continues from
    RUN/best.pt           the checkpoint of the epoch with the best validation mIoU
    RUN/eval-SPLIT.json   summaries of `samcache eval --run RUN --split SPLIT`

A checkpoint holds tensors and plain types only, so it is read with
`torch.load(weights_only=True)` and no code in it can run: `format`, `version`,
`samcache_version`, `model_type` and `base_weights_sha256` (the weights whose encoder made the
cache), `trained` (the parts that were trainable), `state_dict` (the prompt encoder's and mask
decoder's tensors, keys as in SAM's state dict; a run that trains the encoder's tail adds its
blocks' and neck's under `image_encoder.`, LoRA adapters unmerged), `tail_blocks` (K of the cache
it trained from; 0 without a tail), `optimizer`, `config` (the TrainConfig as a
dict; flat in checkpoints of version 1, nested since version 2) and `state` (a TrainState as a
dict). A run belongs to every cache made with those base
weights; `RunCheckpoint.check_cache` refuses any other.

Under torchrun only rank 0 writes (`RunWriter(enabled=...)`).
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import yaml

from samcache import __version__
from samcache.cache.format import Provenance
from samcache.config import DECODER_MODULES, RUN_WEIGHTS, TrainConfig
from samcache.errors import RunError
from samcache.fileio import append_text, atomic_write_bytes, atomic_write_json, read_json_mapping
from samcache.models.families import family_of
from samcache.models.weights import LoadedModel, load_matching
from samcache.outputs import OutputFolder
from samcache.plotting import plot_training_curves

if TYPE_CHECKING:
    from samcache.models.decoder import PromptDecoder
    from samcache.models.encoder_tail import EncoderTail

CHECKPOINT_FORMAT = "samcache-run-checkpoint"
CHECKPOINT_VERSION = 2  # 2: `config` nested as TrainConfig is (prompt settings under "prompts"); 1: flat
_CONFIG = "config.yaml"
_INFO = "run.json"
_METRICS = "metrics.jsonl"
_CURVES = "curves.png"
_TENSORBOARD = "tensorboard"
_EVAL_PREFIX = "eval-"
_IMAGES = "images.json"
RUN_KIND = "run"


@dataclass
class TrainState:
    """Where a run stands: what --resume restores besides the weights and the optimizer.

    Arguments:
      epoch: epochs completed.
      batch: batches done in the epoch after `epoch` (0 at an epoch boundary).
      global_step: optimizer steps so far (the learning rate is a function of it).
      best_miou, best_epoch: the best validation mIoU so far and its epoch (-1 before any).
      history: validation mIoU before training (first) and after each epoch.
      epoch_log: at an epoch boundary, that epoch's metrics.jsonl record: the checkpoint is written
        before the record, and --resume writes the record when a stop came between the two.
    """

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best_miou: float = -1.0
    best_epoch: int = -1
    history: list[float] = field(default_factory=list)
    epoch_log: dict = field(default_factory=dict)


@dataclass
class RunCheckpoint:
    """A checkpoint of a run (see the module docstring for its fields); `source` is the file read."""

    model_type: str
    base_weights_sha256: str
    trained: list[str]
    state_dict: dict[str, torch.Tensor]
    optimizer: dict
    config: dict
    state: TrainState
    samcache_version: str = __version__
    source: str = ""
    tail_blocks: int = 0

    @classmethod
    def capture(cls, sam, optimizer: torch.optim.Optimizer, config: TrainConfig, provenance: Provenance,
                state: TrainState, tail: Optional["EncoderTail"] = None) -> "RunCheckpoint":
        """The checkpoint of `sam`'s prompt encoder and mask decoder (and of `tail`, when the run trains
        the encoder's tail) as they are now."""
        weights = {f"{part}.{k}": v.detach().cpu().clone() for part in DECODER_MODULES
                   for k, v in getattr(sam, part).state_dict().items()}
        if tail is not None:
            weights.update({f"image_encoder.{k}": v.detach().cpu().clone()
                            for k, v in tail.encoder_state_dict().items()})
        return cls(model_type=provenance.model_type, base_weights_sha256=provenance.weights_sha256,
                   trained=list(trained_parts(config, provenance.model_type)), state_dict=weights,
                   optimizer=optimizer.state_dict(),
                   config=config.model_dump(mode="json"), state=copy.deepcopy(state),
                   tail_blocks=len(tail.blocks) if tail is not None else 0)

    def to_bytes(self) -> bytes:
        payload = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "samcache_version": self.samcache_version,
            "model_type": self.model_type, "base_weights_sha256": self.base_weights_sha256,
            "trained": self.trained, "state_dict": self.state_dict, "optimizer": self.optimizer,
            "config": self.config, "state": asdict(self.state), "tail_blocks": self.tail_blocks,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    @classmethod
    def read(cls, path: str | Path) -> "RunCheckpoint":
        """Reads a checkpoint with weights_only=True (tensors and plain types; no code runs)."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt or unsafe files
            raise RunError(f"{path} is not a readable samcache checkpoint: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise RunError(f"{path} is not a samcache run checkpoint")
        try:
            return cls(model_type=payload["model_type"], base_weights_sha256=payload["base_weights_sha256"],
                       trained=list(payload["trained"]), state_dict=payload["state_dict"],
                       optimizer=payload["optimizer"], config=payload["config"],
                       state=TrainState(**payload["state"]), samcache_version=payload.get("samcache_version", ""),
                       source=str(path), tail_blocks=int(payload.get("tail_blocks", 0)))
        except (KeyError, TypeError) as exc:
            raise RunError(f"{path} is a samcache checkpoint with a field missing or malformed ({exc})") from exc

    @property
    def base_checkpoint(self) -> Optional[str]:
        """The base weights file the run was trained from, when it was given explicitly."""
        return self.config.get("checkpoint")

    def check_cache(self, provenance: Provenance) -> None:
        """Refuses a cache whose embeddings were made by other weights than this run's base."""
        if self.base_weights_sha256 != provenance.weights_sha256:
            raise RunError(
                f"the run {Path(self.source).parent} was trained from weights {self.base_weights_sha256[:12]}..., "
                f"but the cache holds embeddings of weights {provenance.weights_sha256[:12]}...: they do not "
                "belong together"
            )


def trained_parts(config: TrainConfig, model_type: str) -> tuple[str, ...]:
    """What a run trains: `--train`'s parts, else its model family's default."""
    return tuple(config.trainable) if config.trainable else family_of(model_type).default_trainable


def _written_by_samcache(folder: Path) -> bool:
    """A run folder from before runs carried the output marker: its run.json is samcache's."""
    info = read_json_mapping(folder / _INFO)
    return "samcache_version" in info and "model_type" in info


def apply_weights(sam, checkpoint: RunCheckpoint, tail: Optional["EncoderTail"] = None) -> None:
    """Loads a run's prompt encoder and mask decoder into `sam` (strict keys): the one way a run's
    weights reach a model, for resume, eval, predict and export.

    A run that trained the encoder's tail loads it too: into `tail` as training holds it (resume:
    LoRA adapters kept apart), else into `sam`'s own encoder with LoRA merged, so `sam` is then the
    fine-tuned model in its official layout (what export writes and predict runs on new images)."""
    if checkpoint.tail_blocks:
        _apply_tail(sam, checkpoint, tail)
    for part in DECODER_MODULES:
        prefix = f"{part}."
        weights = {k[len(prefix):]: v for k, v in checkpoint.state_dict.items() if k.startswith(prefix)}
        try:
            getattr(sam, part).load_state_dict(weights, strict=True)
        except RuntimeError as exc:  # torch lists every key; one line is enough to say what is wrong
            raise RunError(f"{checkpoint.source}: its {part} does not fit the {checkpoint.model_type} model "
                           f"({' '.join(str(exc).split())[:300]})") from exc


def _apply_tail(sam, checkpoint: RunCheckpoint, tail: Optional["EncoderTail"]) -> None:
    from samcache.models.encoder_tail import add_lora, merge_lora

    weights = {k[len("image_encoder."):]: v for k, v in checkpoint.state_dict.items() if k.startswith("image_encoder.")}
    target = tail
    if target is None:
        target = family_of(checkpoint.model_type).encoder_tail(sam, checkpoint.tail_blocks)
        rank = checkpoint.config.get("lora_rank")
        if rank:
            add_lora(target.blocks, rank=rank, alpha=rank)
    try:
        target.load_encoder_state_dict(weights)
    except (KeyError, RuntimeError) as exc:
        raise RunError(f"{checkpoint.source}: its encoder tail does not fit the {checkpoint.model_type} model "
                       f"({' '.join(str(exc).split())[:300]})") from exc
    if tail is None:
        merge_lora(target)


def run_decoder(model: LoadedModel, checkpoint: RunCheckpoint) -> "PromptDecoder":
    """The decoder a run's fine-tuned model decodes cached images with: its family's, behind the
    trained encoder tail (which then reads the cache's tail tokens) when the run trained one."""
    decoder = model.decoder()
    if not checkpoint.tail_blocks:
        return decoder
    from samcache.models.encoder_tail import TailedDecoder

    return TailedDecoder(decoder, model.family.encoder_tail(model.sam, checkpoint.tail_blocks))


class RunFolder:
    """A run folder (see the module docstring), read side.

    Arguments:
      path: the folder.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def checkpoint_path(self, which: str) -> Path:
        if which not in RUN_WEIGHTS:
            raise RunError(f"a run's weights are {' or '.join(RUN_WEIGHTS)}, not {which!r}")
        return self.path / f"{which}.pt"

    def has_checkpoint(self, which: str = "last") -> bool:
        return self.checkpoint_path(which).is_file()

    def read_checkpoint(self, which: str = "best") -> RunCheckpoint:
        path = self.checkpoint_path(which)
        if not path.is_file():
            raise RunError(f"{path} does not exist: is {self.path} a samcache run (weights {which})?")
        return RunCheckpoint.read(path)

    def load_model(self, which: str = "best",
                   checkpoint: Optional[str | Path] = None) -> tuple[LoadedModel, RunCheckpoint]:
        """The run's base SAM (the very weights that made its cache) with the run's decoder applied.

        Arguments:
          which: "best" or "last".
          checkpoint: the base weights file, when not samcache's tiny or the official weights
            (default: the one the run was trained with).
        """
        run_checkpoint = self.read_checkpoint(which)
        base = load_matching(run_checkpoint.model_type, run_checkpoint.base_weights_sha256,
                             checkpoint or run_checkpoint.base_checkpoint,
                             recorded_source=self.info().get("base_weights_source", ""))
        apply_weights(base.sam, run_checkpoint)
        return base, run_checkpoint

    def check_writable(self, resume: bool) -> None:
        """Refuses, before anything is written (the lock file included), a folder that is neither new,
        empty nor a samcache run, and a run that `resume` cannot continue or a new run would replace."""
        OutputFolder(self.path, RUN_KIND).check(again=True, legacy=_written_by_samcache)
        if resume:
            if not self.has_checkpoint("last"):
                raise RunError(f"--resume: {self.path} has no {self.checkpoint_path('last').name} to resume from")
        elif self.has_checkpoint("last"):
            raise RunError(f"{self.path} already holds a run: pass --resume to continue it, or choose another --out")

    def prepare(self, resume: bool) -> None:
        """Checks the folder again, now under its lock, marks it as a samcache run, and, for a new run
        in a run folder that stopped before its first checkpoint, removes that run's logs."""
        self.check_writable(resume)
        folder = OutputFolder(self.path, RUN_KIND)
        if not resume:
            # Only samcache's own run files, in a folder the check above proved to be a samcache run.
            for path in (self.path / _METRICS, self.path / _INFO, self.path / _CONFIG, self.path / _CURVES,
                         self.path / _IMAGES, self.checkpoint_path("best")):
                path.unlink(missing_ok=True)
        folder.mark()

    def after_failure(self) -> str:
        """What the folder holds after a run stopped on an error, and what the user can do."""
        if self.has_checkpoint("last"):
            state = RunCheckpoint.read(self.checkpoint_path("last")).state
            return (f"The last good checkpoint {self.checkpoint_path('last')} (epoch {state.epoch}, step "
                    f"{state.global_step}) is kept; resuming would repeat the same steps, so start a new run "
                    "(another --out) with a lower --lr")
        return (f"No checkpoint was saved yet, so {self.path} holds logs only: run the same command again "
                "with a lower --lr (it starts over in the same folder)")

    def after_write_failure(self) -> str:
        """What the folder holds after a write failed (disk full), and how to go on: nothing the
        run saved is damaged, since checkpoints are replaced atomically."""
        if self.has_checkpoint("last"):
            state = RunCheckpoint.read(self.checkpoint_path("last")).state
            return (f"{self.checkpoint_path('last')} (epoch {state.epoch}, step {state.global_step}) is intact: "
                    "free space, then run the same command with --resume to continue from it")
        return (f"No checkpoint was saved yet: free space, then run the same command again "
                f"(it starts over in {self.path})")

    def saved_config(self) -> Optional[dict]:
        """The options the run was started with (config.yaml), or None when it has none yet."""
        path = self.path / _CONFIG
        if not path.is_file():
            return None
        try:
            values = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RunError(f"{path} is unreadable: {exc}") from exc
        return upgrade_saved_config(values) if isinstance(values, dict) else {}

    @property
    def config_path(self) -> Path:
        return self.path / _CONFIG

    def info(self) -> dict:
        """run.json: model, base weights, cache, versions and (once finished) the result; {} if absent."""
        return read_json_mapping(self.path / _INFO)

    def trained_images(self) -> Optional[dict[str, dict[str, str]]]:
        """{"train": {name: SHA-256}, "val": {...}}: the cache's images the run started with (None for
        runs that did not record them)."""
        path = self.path / _IMAGES
        if not path.is_file():
            return None
        images = read_json_mapping(path)
        return {split: dict(images.get(split, {})) for split in ("train", "val")}

    def check_same_cache(self, cache_dir: Path, images: dict[str, dict[str, str]]) -> None:
        """Refuses to resume on other images than the run started with: another cache, or the same
        cache grown or changed since (the epochs' batches and the validation set would differ)."""
        started_on = self.cache_dir()
        recorded = self.trained_images()
        here = str(Path(cache_dir).resolve())
        if recorded is None:  # a run from before the images were recorded: the path is all there is
            if started_on is not None and started_on != here:
                raise RunError(f"--resume: {self.path} was trained from the cache {started_on}, not {here}: "
                               "resume it with that cache, or start a new run (another --out)")
            return
        problems = []
        for split in ("train", "val"):
            before, now = recorded[split], images[split]
            if before == now:
                continue
            added, gone = now.keys() - before.keys(), before.keys() - now.keys()
            changed = [name for name in before.keys() & now.keys() if before[name] != now[name]]
            if not gone and not changed:
                problems.append(f"{len(added)} {split} images were added to it since")
            else:
                problems.append(f"its {split} split differs ({len(gone)} of the run's {len(before)} images are not "
                                f"in it, {len(changed)} changed, {len(added)} new; e.g. "
                                f"{sorted(gone | set(changed) | added)[0]})")
        if not problems:
            return
        same_place = started_on == here
        what = "the cache it started from has changed" if same_place else f"it was trained from the cache {started_on}"
        raise RunError(f"--resume: {self.path} cannot continue on {here}: {what}, and {'; '.join(problems)}. "
                       "Resuming would train and validate on other images than the run's; start a new run "
                       "(another --out) to train on them")

    def cache_dir(self) -> Optional[str]:
        """The cache the run was trained from, as recorded when it started."""
        return self.info().get("cache")

    def metrics(self) -> list[dict]:
        """metrics.jsonl's records: {"type": "step" | "epoch", "epoch", "global_step", ...}."""
        path = self.path / _METRICS
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def result(self) -> Optional[dict]:
        """The training result, once the run has finished."""
        return self.info().get("result")

    def write_eval_summary(self, split: str, summary: dict) -> Path:
        path = self.path / f"{_EVAL_PREFIX}{split}.json"
        atomic_write_json(path, summary)
        return path

    def eval_summaries(self) -> dict[str, dict]:
        """{split: summary} of every `samcache eval --run` of this run."""
        return {p.stem.removeprefix(_EVAL_PREFIX): read_json_mapping(p)
                for p in sorted(self.path.glob(f"{_EVAL_PREFIX}*.json"))}


class RunWriter:
    """Everything training writes into a run folder; a no-op unless `enabled` (rank 0)."""

    def __init__(self, run: RunFolder, *, enabled: bool):
        self.run, self.enabled = run, enabled
        self.metrics = run.path / _METRICS
        self._events = None  # the TensorBoard writer, made at the first record; False: none (not installed, failed)
        self._purge_step: Optional[int] = None

    def start(self, config: TrainConfig, base: LoadedModel, cache_dir: Path, *,
              images: dict[str, dict[str, str]], embeddings_in_memory: bool) -> None:
        """Writes config.yaml, images.json (the train and val images, by name and SHA-256: what
        --resume checks) and run.json's header."""
        if not self.enabled:
            return
        self.update_config(config)
        atomic_write_json(self.run.path / _IMAGES, images)
        train_images, val_images = len(images["train"]), len(images["val"])
        atomic_write_json(self.run.path / _INFO, {
            "samcache_version": __version__, "torch_version": torch.__version__,
            "model_type": base.model_type, "base_weights_sha256": base.weights_sha256,
            "base_weights_source": base.weights_source, "cache": str(Path(cache_dir).resolve()),
            "train_images": train_images, "val_images": val_images, "embeddings_in_memory": embeddings_in_memory,
        })

    def update_config(self, config: TrainConfig) -> None:
        """Writes config.yaml: at the start, and after --resume changed what may change (more epochs)."""
        if self.enabled:
            atomic_write_bytes(self.run.path / _CONFIG,
                               yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())

    def log(self, record: dict) -> None:
        """Appends a record to metrics.jsonl and its scalars to the TensorBoard events."""
        if not self.enabled:
            return
        append_text(self.metrics, json.dumps(record) + "\n")
        events = self._event_writer()
        if events is None:
            return
        try:
            for tag, value in tensorboard_scalars(record).items():
                events.add_scalar(tag, value, record["global_step"])
            if record["type"] == "epoch":  # an epoch's figures are on disk when it ends
                events.flush()
        except OSError as exc:  # a copy of metrics.jsonl: losing it must not stop training
            self._stop_events(exc)

    def _event_writer(self):
        if self._events is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: metrics.jsonl and curves.png hold it all
                self._events = False
                return None
            # On resume, purge_step hides the events an interrupted run wrote after its checkpoint.
            self._events = SummaryWriter(str(self.run.path / _TENSORBOARD), purge_step=self._purge_step)
        return self._events or None

    def _stop_events(self, exc: OSError) -> None:
        warnings.warn(f"TensorBoard events in {self.run.path / _TENSORBOARD} stopped ({exc}); "
                      f"{_METRICS} has every figure", stacklevel=3)
        try:
            self._events.close()
        except OSError:
            pass
        self._events = False

    def close(self) -> None:
        """Flushes and closes the TensorBoard events (idempotent)."""
        if self._events:
            try:
                self._events.close()
            except OSError as exc:
                self._stop_events(exc)
        self._events = None

    def truncate_metrics(self, state: TrainState) -> None:
        """Drops log lines written after the checkpoint a resumed run starts from (and, in
        TensorBoard, the events from that step on); writes the checkpoint's epoch record when the
        run stopped after the checkpoint but before its record."""
        self._purge_step = state.global_step + 1
        if not self.enabled:
            return
        kept, epochs = [], set()
        for line in self.metrics.read_text().splitlines() if self.metrics.exists() else []:
            record = json.loads(line)
            if record["global_step"] < state.global_step or (record["global_step"] == state.global_step and (
                    record["type"] == "step" or record["epoch"] <= state.epoch)):
                kept.append(line)
                epochs.update([record["epoch"]] if record["type"] == "epoch" else [])
        atomic_write_bytes(self.metrics, ("\n".join(kept) + "\n").encode() if kept else b"")
        if state.epoch_log and state.batch == 0 and state.epoch not in epochs:
            self.log(state.epoch_log)

    def save_checkpoint(self, which: str, checkpoint: RunCheckpoint) -> None:
        if self.enabled:
            atomic_write_bytes(self.run.checkpoint_path(which), checkpoint.to_bytes())

    def plot(self) -> None:
        if self.enabled:
            plot_training_curves(self.metrics, self.run.path / _CURVES)

    def finish(self, result: dict) -> None:
        if not self.enabled:
            return
        info = self.run.info()
        info["result"] = result
        atomic_write_json(self.run.path / _INFO, info)


def tensorboard_scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's numbers as TensorBoard tags: "step" records under train/, "epoch"
    records under val/ without their "val_" prefix (val_miou -> val/miou); a list, such as mIoU per
    click, one tag per position, from 1."""
    group = "train" if record["type"] == "step" else "val"
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("type", "epoch", "step", "global_step"):
            continue
        tag = f"{group}/{key.removeprefix('val_')}"
        entries = enumerate(value, start=1) if isinstance(value, (list, tuple)) else [(None, value)]
        for position, v in entries:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[tag if position is None else f"{tag}/{position}"] = float(v)
    return out


# Runs started before the prompt settings became a nested group saved them flat; read those
# the new way, so that such a run still resumes.
_FLAT_PROMPT_KEYS = {"prompt": "mode", "box_jitter": "box_jitter", "box_jitter_max": "box_jitter_max",
                     "positive_points": "positive_points", "negative_points": "negative_points",
                     "point_ratio": "point_ratio"}


def upgrade_saved_config(values: dict) -> dict:
    """A config saved by an older samcache in today's layout, meaning what it meant then: flat
    prompt keys (checkpoints of version 1) nested, options added since set to what those runs did."""
    if "val_max_images" not in values:  # runs before the option validated on every image
        values = {**values, "val_max_images": None}
    if "precision" not in values:  # runs before the option trained in fp32 on the CPU, bf16 on CUDA
        values = {**values, "precision": "bf16" if values.get("device") == "cuda" else "fp32"}
    if "prompts" in values or not set(values) & set(_FLAT_PROMPT_KEYS):
        return values
    values = dict(values)
    values["prompts"] = {new: values.pop(old) for old, new in _FLAT_PROMPT_KEYS.items() if old in values}
    if values.get("save_every") == 0:  # 0 meant "only at epoch ends", now spelt null
        values["save_every"] = None
    if values.get("memory_budget_mb") == 0:  # 0 meant "the default budget", now spelt null
        values["memory_budget_mb"] = None
    return values
