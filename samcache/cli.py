"""The `samcache` command line: thin click wrappers over typed functions in the other modules."""

from __future__ import annotations

import errno
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

# Large CPU tensors (vit_b's attention maps) on transparent huge pages: without it, every
# encoder block maps and unmaps ~0.8 GB, and page faults take half of the fp32 time.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import typing
from typing import Any, Literal, Union, get_args, get_origin

import click
from pydantic import BaseModel

from samcache import __version__
from samcache.config import (
    FLAGS,
    EmbedConfig,
    EvalConfig,
    ExportConfig,
    PredictConfig,
    TrainConfig,
    field_annotation,
    field_default,
    field_description,
    from_sources,
)
from samcache.data.datasets import MASK_MODES
from samcache.errors import OptionCombinationError, SamcacheError
from samcache.models.specs import MODEL_TYPES, OFFICIAL_MODEL_TYPES

SPLIT_FRACTIONS_HELP = "train,val,test fractions for datasets without explicit splits."


# What the machine did, never a bug: a full disk, a read-only folder, missing permissions, a
# file where a folder belongs. The writes samcache knows of raise OutputError with more to say;
# this catches the rest.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                       errno.ENOTDIR, errno.EISDIR}


class _Group(click.Group):
    """Turns samcache's own errors into a one-line message and exit code 1 (bugs keep tracebacks)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SamcacheError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:
            if exc.errno not in _ENVIRONMENT_ERRNOS:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from exc


@contextmanager
def _process_group():
    """torchrun's process group for the length of a command (a group of one without torchrun)."""
    from samcache import distributed

    dist = distributed.from_environment()
    try:
        yield dist
    finally:
        distributed.shutdown()


def _computed(counts: dict[str, int]) -> str:
    """`info`'s "computed" (images per recipe) in words: "bf16 by openvino", or each with its count."""
    if len(counts) <= 1:
        return next(iter(counts), "nothing yet")
    return ", ".join(f"{recipe} ({n} images)" for recipe, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _warn_if_being_written(cache_dir: Path) -> None:
    """A reader of a cache that `samcache embed` is still adding to says so, and what it reads."""
    from samcache.cache.format import is_cache
    from samcache.cache.reader import EmbeddingCache
    from samcache.locks import describe, holder_of

    if not is_cache(cache_dir):
        return  # the command itself says what is wrong
    holder = holder_of(cache_dir)  # an instant's lock probe: the cache is opened only when it is busy
    if holder is not None:
        click.echo(f"warning: {cache_dir} is being written ({describe(holder)}); reading the "
                   f"{len(EmbeddingCache(cache_dir))} images committed so far", err=True)


def _fractions(value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected three numbers like 0.8,0.1,0.1, got {value!r}") from None
    if len(parts) != 3:
        raise click.BadParameter(f"expected three numbers like 0.8,0.1,0.1, got {value!r}")
    return parts  # type: ignore[return-value]


def config_option(flag: str, model: type[BaseModel], path: str, *, default_in_help: bool = False, **kwargs):
    """A click option for config field `path` of `model`: its type, choices, help and default all
    come from the field, so the command line never restates them.

    With `default_in_help`, click gets no default (None means "not given": a YAML file or the
    config's default decides) and the help shows the config's default; otherwise the default
    is the field's.
    """
    annotation = field_annotation(model, path)
    default = field_default(model, path)
    description = field_description(model, path)
    help_text = description.split("\n\n")[0].replace("\n", " ")
    options: dict[str, Any] = {"help": help_text}
    base = _unwrap(annotation)
    if base is bool:
        options.update(is_flag=True, default=default)
    else:
        options["type"] = _click_type(base)
        if default_in_help:
            options["help"] = f"{help_text} [default: {_shown(default)}]"
        elif default is not None and default != []:
            options.update(default=_shown(default) if isinstance(default, list) else default, show_default=True)
    options.update(kwargs)
    return click.option(flag, path.replace(".", "__"), **options)


def _unwrap(annotation):
    """Optional[X] -> X, Annotated[X, ...] -> X (repeatedly)."""
    while True:
        origin = get_origin(annotation)
        if origin is typing.Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union:
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation


def _click_type(annotation):
    if get_origin(annotation) is Literal:
        return click.Choice(get_args(annotation))
    if annotation is Path:
        return click.Path(path_type=Path)
    if get_origin(annotation) is list:  # a comma-separated list, split by the config
        return str
    return annotation if annotation in (int, float, str) else str


def _shown(default) -> str:
    if isinstance(default, list):
        return ",".join(map(str, default))
    return "none" if default is None else str(default)


def _config_values(options: dict) -> dict:
    """Click's keyword arguments of config options ("prompts__mode") -> dotted paths."""
    return {k.replace("__", "."): v for k, v in options.items()}


def config_options(model: type[BaseModel], *, default_in_help: bool | tuple[str, ...] = False, **per_option):
    """Every option of `model` as the flag `config.FLAGS` gives it. `default_in_help`: for all
    options, or for those whose path starts with one of these prefixes; `per_option`: extra click
    settings by path, e.g. `points={"multiple": True}`."""
    def decorate(command):
        for path, flag in reversed(FLAGS[model].items()):
            in_help = default_in_help if isinstance(default_in_help, bool) else path.startswith(default_in_help)
            command = config_option(flag, model, path, default_in_help=in_help, **per_option.get(path, {}))(command)
        return command
    return decorate


def _options(model: type[BaseModel], options: dict, **sources):
    """The config of a command from its click options (and `sources`: file=, base=). Options that do
    not go together are a usage error (exit code 2, with the command's usage line)."""
    try:
        return from_sources(model, overrides=_config_values(options), flags=FLAGS[model], **sources)
    except OptionCombinationError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="samcache")
def main() -> None:
    """Fine-tune Segment Anything's mask decoder on your images, from an HDF5 embedding cache.

    \b
    Typical session:
      samcache data stamps --out data/stamps --n 60      # or bring COCO JSON / mask folders
      samcache data check data/stamps
      samcache embed data/stamps --out cache/stamps --model tiny
      samcache info cache/stamps
      samcache train cache/stamps --out runs/stamps
      samcache eval cache/stamps --run runs/stamps --out reports/stamps
      samcache export --run runs/stamps --out sam_stamps.pth
    """


def dataset_options(command):
    """The options every command that reads a dataset takes."""
    command = click.option("--mask-mode", type=click.Choice(MASK_MODES),
                           default="auto", show_default=True, help="How mask folders become objects.")(command)
    command = click.option("--split-fractions", default="0.8,0.1,0.1", show_default=True,
                           help=SPLIT_FRACTIONS_HELP)(command)
    command = click.option("--image-root", type=click.Path(path_type=Path),
                           help="Folder COCO file_names are relative to.")(command)
    return command


def _load_dataset(dataset: Path, image_root, split_fractions: str, mask_mode: str, strict: bool = False):
    from samcache.data.datasets import load_dataset

    return load_dataset(dataset, image_root=image_root, fractions=_fractions(split_fractions),
                        mask_mode=mask_mode, strict=strict)


# --------------------------------------------------------------------------------------- data
@main.group(cls=_Group)
def data() -> None:
    """Datasets: generate the synthetic stamps or cells set, check a dataset."""


@data.command("stamps")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write (COCO layout).")
@click.option("--n", "n_images", type=click.IntRange(min=1), default=60, show_default=True, help="Pages.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Same seed, same pages, byte for byte.")
@click.option("--overwrite", is_flag=True, help="Replace what --out holds.")
def data_stamps(out: Path, n_images: int, seed: int, overwrite: bool) -> None:
    """Generate a synthetic "stamps on scanned documents" set.

    Writes OUT/images/*.jpg and OUT/train.json, OUT/val.json, OUT/test.json with exact masks.

    \b
    Example:
      samcache data stamps --out data/stamps --n 60 --seed 0
    """
    from samcache.data.stamps import generate_stamps

    summary = generate_stamps(out, n_images, seed, overwrite=overwrite)
    splits = ", ".join(f"{k} {v['images']} images/{v['objects']} objects" for k, v in summary["splits"].items())
    click.echo(f"wrote {summary['images']} pages with {summary['objects']} stamps to {out} ({splits})")


@data.command("cells")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write (COCO layout).")
@click.option("--n", "n_images", type=click.IntRange(min=1), default=60, show_default=True, help="Images.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Same seed, same images, byte for byte.")
@click.option("--overwrite", is_flag=True, help="Replace what --out holds.")
def data_cells(out: Path, n_images: int, seed: int, overwrite: bool) -> None:
    """Generate a synthetic "cells under a microscope" set: 16-bit, low contrast, touching nuclei.

    Writes OUT/images/*.png (uint16 gray) and OUT/train.json, OUT/val.json, OUT/test.json with exact masks.

    \b
    Example:
      samcache data cells --out data/cells --n 60 --seed 0
    """
    from samcache.data.cells import generate_cells

    summary = generate_cells(out, n_images, seed, overwrite=overwrite)
    splits = ", ".join(f"{k} {v['images']} images/{v['objects']} objects" for k, v in summary["splits"].items())
    click.echo(f"wrote {summary['images']} images with {summary['objects']} cells to {out} ({splits})")


@data.command("check")
@click.argument("dataset", type=click.Path(path_type=Path))
@dataset_options
@click.option("--strict", is_flag=True, help="Any problem is an error (exit code 1).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def data_check(dataset: Path, image_root, split_fractions: str, mask_mode: str, strict: bool, as_json: bool) -> None:
    """Count images, objects, splits and categories, and list every problem found.

    DATASET is a COCO JSON file, a folder with train.json/val.json/test.json, or a folder
    with images/ and masks/. Exit code 1 when the dataset cannot be read, or with --strict
    when it has any problem.

    \b
    Example:
      samcache data check data/stamps --json
    """
    ds = _load_dataset(dataset, image_root, split_fractions, mask_mode)
    summary = ds.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"{dataset} ({summary['format']}): {summary['images']} images, {summary['objects']} objects")
        for split, counts in summary["splits"].items():
            click.echo(f"  split {split:<6} {counts['images']:>6} images {counts['objects']:>7} objects")
        for category, count in summary["categories"].items():
            click.echo(f"  category {category:<20} {count:>7} objects")
        if summary["ignored_crowd"]:
            click.echo(f"  {summary['ignored_crowd']} crowd annotations ignored")
        click.echo(f"  {len(ds.problems)} problem(s)")
        for problem in ds.problems:
            click.echo(f"  - {problem}")
    if strict:
        ds.raise_if_problems()


# -------------------------------------------------------------------------------------- embed


@main.command("embed")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--out", "cache_dir", type=click.Path(path_type=Path), required=True, help="Cache folder.")
@config_options(EmbedConfig)
@dataset_options
@click.option("--strict", is_flag=True, help="Any dataset problem or unreadable image is an error.")
@click.option("--switch-dataset", is_flag=True,
              help="Make the cache follow DATASET even though it lacks images the cache holds (they leave the "
                   "cache's view; their embeddings stay in its shards).")
def embed_cmd(dataset: Path, cache_dir: Path, image_root, split_fractions: str, mask_mode: str, strict: bool,
              switch_dataset: bool, **options) -> None:
    """Run the image encoder once per image and store embeddings, geometry and objects in CACHE.

    Crash-safe and resumable: re-run the same command after an interruption and it embeds only
    what was not committed; images added to the dataset later are embedded on the next run, and
    images it no longer has leave the cache's view. A cache follows one dataset: another one that
    lacks some of its images is refused unless --switch-dataset.

    \b
    Example:
      samcache embed data/stamps --out cache/stamps --model tiny
      samcache embed my_coco/ --out cache/mine --model vit_b --checkpoint sam_vit_b_01ec64.pth
      samcache embed my_coco/ --out cache/mine2 --model sam2.1_hiera_t
    """
    from samcache.embed.pipeline import embed_dataset

    config = _options(EmbedConfig, {**options, "strict": strict})
    with _process_group() as dist:
        ds = _load_dataset(dataset, image_root, split_fractions, mask_mode, strict=strict)
        if dist.is_main:
            for problem in ds.problems:
                click.echo(f"warning: {problem}", err=True)
        summary = embed_dataset(ds, cache_dir, config, dataset_path=dataset, switch_dataset=switch_dataset, dist=dist)
        if dist.is_main:
            click.echo(summary.line() + (f" ({dist.world_size} processes)" if dist.enabled else ""))


@main.command("info")
@click.argument("cache_dir", metavar="CACHE", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def info_cmd(cache_dir: Path, as_json: bool) -> None:
    """Describe a cache: images, objects, splits, model, weights, dtype, size, failed images.

    \b
    Example:
      samcache info cache/stamps --json
    """
    from samcache.cache.reader import EmbeddingCache

    _warn_if_being_written(cache_dir)
    info = EmbeddingCache(cache_dir).info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['cache']}: {info['images']} images, {info['objects']} objects "
               f"(schema v{info['schema_version']})")
    for split, counts in info["splits"].items():
        click.echo(f"  split {split:<6} {counts['images']:>6} images {counts['objects']:>7} objects")
    click.echo(f"  model {info['model_type']}, weights SHA-256 {info['weights_sha256']}")
    maps = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in info["stored_maps"].items())
    click.echo(f"  {info['embedding_dtype']} {maps}, computed in {_computed(info['computed'])}, "
               f"intensity {info['intensity']}")
    if info["tail_blocks"]:
        click.echo(f"  tail tokens before the encoder's last {info['tail_blocks']} block(s) (train --train tail)")
    if info["views"]:
        click.echo(f"  views besides the original: {', '.join(info['views'])}")
    click.echo(f"  {info['bytes_on_disk'] / 2**20:.1f} MiB on disk, "
               f"{info['bytes_per_image'] / 2**20:.2f} MiB per image, "
               f"{info['shards']} shard(s), {info['superseded_records']} superseded record(s)")
    if info["removed"]:
        click.echo(f"  {info['removed']} image(s) taken out (no longer in the dataset, or damaged)")
    click.echo(f"  {len(info['failed'])} failed image(s)")
    for failure in info["failed"]:
        click.echo(f"  - {failure['name']}: {failure['error']}")


@main.command("verify")
@click.argument("cache_dir", metavar="CACHE", type=click.Path(path_type=Path))
@click.option("--check-only", is_flag=True, help="Report damaged images and unreadable shards, but change nothing.")
def verify_cmd(cache_dir: Path, check_only: bool) -> None:
    """Read and check every shard and image of CACHE: embedding checksums and finite values, mask
    encodings, previews.

    Damaged images are taken out of the cache (a record in a new shard); a shard that cannot be
    read is moved into CACHE/damaged/. Nothing is deleted, and the next `samcache embed` embeds
    them again. Exit code 1 when anything was damaged.

    \b
    Example:
      samcache verify cache/stamps
    """
    from samcache.cache.verify import verify

    report = verify(cache_dir, take_out=not check_only)
    click.echo(f"verified {report.images} images in {report.shards} shard(s): {len(report.damaged)} damaged")
    for name, shard, problem in report.damaged:
        click.echo(f"  - {name} in {shard}: {problem}")
    if report.damaged:
        action = ("they are out of the cache now: run `samcache embed` on the dataset again to embed them anew"
                  if report.taken_out else "nothing was changed (--check-only)")
        raise click.ClickException(f"{len(report.damaged)} damaged image(s) in {cache_dir}; {action}")


# -------------------------------------------------------------------------------------- train


@main.command("train")
@click.argument("cache_dir", metavar="CACHE", type=click.Path(path_type=Path))
@click.option("--out", "run_dir", type=click.Path(path_type=Path), required=True, help="Run folder.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML file of options (the fields of TrainConfig, prompt settings under prompts:); "
                   "the command line overrides it.")
@config_options(TrainConfig, default_in_help=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
def train_cmd(cache_dir: Path, run_dir: Path, config_file, resume: bool, **options) -> None:
    """Fine-tune the mask decoder from CACHE (the image encoder never runs).

    A SAM 2.1 cache trains SAM 2.1's prompt encoder and mask decoder with its high-resolution
    features; the decoder's conv_s0 / conv_s1 stay frozen, since their outputs are what the cache
    holds.

    Writes RUN/config.yaml, metrics.jsonl, curves.png, best.pt and last.pt. Options come
    from the defaults, then --config FILE.yaml, then the command line; --resume without
    --config continues with the run's own config.yaml.

    \b
    Example:
      samcache train cache/stamps --out runs/stamps --epochs 10
      samcache train cache/stamps --out runs/clicks --prompt interactive   # SAM's recipe
      samcache train cache/stamps --out runs/stamps --config train.yaml --lr 2e-4
      samcache train cache/stamps --out runs/stamps --resume
    """
    from samcache.train.runs import RunFolder
    from samcache.train.trainer import train

    saved = RunFolder(run_dir).saved_config() if resume and config_file is None else None
    config = _options(TrainConfig, options, file=config_file, base=saved)
    _warn_if_being_written(cache_dir)
    with _process_group() as dist:
        result = train(cache_dir, run_dir, config, resume=resume, dist=dist)
    if not dist.is_main:
        return
    history = " -> ".join(f"{v:.3f}" for v in result.history)
    click.echo(f"validation mIoU {result.val_miou_start:.4f} before, {result.val_miou_last:.4f} after "
               f"(best {result.val_miou_best:.4f} at epoch {result.best_epoch}); per epoch: {history}")
    processes = f" over {dist.world_size} processes" if dist.enabled else ""
    click.echo(f"trained {result.epochs_run} epochs in {result.seconds:.1f} s ({result.samples_per_second:.1f} "
               f"samples/s{processes}); run: {run_dir}")


# ----------------------------------------------------------------------- eval, export, predict


@main.command("eval")
@click.argument("cache_dir", metavar="CACHE", type=click.Path(path_type=Path))
@click.option("--run", "run_dir", type=click.Path(path_type=Path), help="A training run (omit: base model only).")
@click.option("--out", "report_dir", type=click.Path(path_type=Path), required=True, help="Report folder.")
@config_options(EvalConfig)
@click.option("--overwrite", is_flag=True, help="Replace the report in --out when there is one.")
def eval_cmd(cache_dir: Path, run_dir, report_dir: Path, overwrite: bool, **options) -> None:
    """Score the zero-shot model and the fine-tuned decoder on the same prompts, at original resolution.

    Reads only the cache and the run (no image file, no encoder). Writes summary.json,
    objects.csv, report.md, before/after overlays, an IoU histogram and a scatter plot.

    \b
    Example:
      samcache eval cache/stamps --run runs/stamps --out reports/stamps --split test
    """
    from samcache.evaluate.evaluator import evaluate
    from samcache.evaluate.report import format_table

    config = _options(EvalConfig, options)
    _warn_if_being_written(cache_dir)
    summary = evaluate(cache_dir, report_dir, config, run_dir=run_dir, overwrite=overwrite)
    for warning in summary.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    click.echo(format_table(summary))
    click.echo(f"report: {report_dir / 'report.md'}")


@main.command("export")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True, help="A training run.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True,
              help="Weights file to write (pth, safetensors), or the folder of the ONNX files (onnx).")
@config_options(ExportConfig)
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier export when they exist.")
def export_cmd(run_dir: Path, out_path: Path, overwrite: bool, **options) -> None:
    """Write the full model's state dict with the fine-tuned decoder, plus FILE.json metadata; or ONNX files.

    For vit_b/l/h the state dict loads with segment_anything.sam_model_registry[TYPE](checkpoint=FILE)
    and works with SamPredictor as it is; vit_t with MobileSAM's, hq_vit_* with segment_anything_hq's
    (the metadata says how each model type loads). With
    --format onnx, --out is a folder (see its README.md).

    \b
    Example:
      samcache export --run runs/stamps --out sam_stamps.pth
      samcache export --run runs/stamps --format onnx --out onnx/stamps
    """
    config = _options(ExportConfig, options)
    if config.format == "onnx":
        from samcache.deploy.onnx import export_onnx

        metadata = export_onnx(run_dir, out_path, weights=config.weights, checkpoint=config.checkpoint,
                               return_single_mask=config.return_single_mask, quantize=config.quantize,
                               overwrite=overwrite)
        click.echo(f"wrote {', '.join(metadata['files'])}, xanylabeling.yaml, README.md and export.json "
                   f"to {out_path} ({metadata['model_type']})")
        return
    from samcache.deploy.export import export_run, metadata_path

    metadata = export_run(run_dir, out_path, fmt=config.format, weights=config.weights, checkpoint=config.checkpoint,
                          overwrite=overwrite)
    click.echo(f"wrote {out_path} ({metadata['model_type']}, SHA-256 {metadata['sha256']}) and "
               f"{metadata_path(out_path)}; load with {metadata['load_with']}")


@main.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@config_options(PredictConfig, default_in_help=("generator.",), points={"multiple": True},
                boxes={"type": click.Path(exists=True, dir_okay=False, path_type=Path)})
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Write into --out even when it holds earlier predictions.")
def predict_cmd(images, out_dir: Path, overwrite: bool, **options) -> None:
    """Predict masks for IMAGES from box and point prompts: PNG masks, overlays and COCO RLE JSON.

    With --everything: every object in each image, from a grid of points (SamAutomaticMaskGenerator's
    steps and defaults); predictions.json holds COCO results (RLE, score = predicted IoU, stability).
    An image in the run's cache (or --cache) takes its embedding from there: no encoder runs.

    \b
    Example:
      samcache predict page.jpg --run runs/stamps --box 100,200,400,500 --out predictions/
      samcache predict page.jpg --run runs/stamps --box 100,200,400,500 --point 250,350 --point 120,210,0 --out p/
      samcache predict scans/*.jpg --checkpoint sam_stamps.pth --boxes boxes.json --out predictions/
      samcache predict page.jpg --run runs/stamps --everything --points-per-side 16 --out everything/
    """
    from samcache.deploy import predict as predict_module

    options["points"] = list(options["points"]) or None  # click gives () for a repeatable option not given
    config = _options(PredictConfig, options)
    cache_dir = config.cache
    if config.run is not None:
        from samcache.train.runs import RunFolder

        predictor = predict_module.predictor_from_run(config.run)
        if cache_dir is None:
            cache_dir = RunFolder(config.run).cache_dir()
    else:
        predictor = predict_module.predictor_from_checkpoint(config.checkpoint, config.model_type)
    if config.everything:
        result = predict_module.predict_everything(predictor, list(images), out_dir, settings=config.generator,
                                                   cache_dir=cache_dir, device=config.device, overwrite=overwrite)
        click.echo(f"{len(result['predictions'])} masks for {result['images']} images in {out_dir} "
                   f"({result['seconds']:.1f} s, {len(result['predictions']) / max(result['seconds'], 1e-9):.1f} "
                   f"masks/s)")
        return
    result = predict_module.predict_images(
        predictor, list(images), out_dir, box=config.box, points=config.points or None,
        boxes_by_name=predict_module.boxes_from_coco(config.boxes) if config.boxes else None,
        cache_dir=cache_dir, device=config.device, overwrite=overwrite,
    )
    for warning in result["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    sources = {}
    for p in result["predictions"]:
        sources[p["embedding_from"]] = sources.get(p["embedding_from"], 0) + 1
    click.echo(f"{len(result['predictions'])} masks for {result['images']} images in {out_dir} "
               f"(embeddings: {', '.join(f'{v} from {k}' for k, v in sources.items()) or 'none'})")


# -------------------------------------------------------------------------------------- serve


@main.command("serve")
@click.argument("cache_dir", metavar="CACHE", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A run trained on CACHE: its decoder is the fine_tuned model.")
@click.option("--dataset", type=click.Path(exists=True, path_type=Path),
              help="The COCO dataset corrections are saved into (default: the one CACHE follows).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Where to listen: localhost only by default (the app has no login).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="TCP port (0: any free).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the decoder runs.")
def serve_cmd(cache_dir: Path, run_dir, dataset, host: str, port: int, device: str) -> None:
    """A local web app over CACHE: its images, and masks from box and point prompts decoded from the
    cached embeddings (one decoder pass; the image encoder never runs).

    \b
    The page: GET / . JSON API (images are named as GET /api/images lists them; requests never
    name paths):
      GET  /api/images
      POST /api/predict  {"image": NAME, "model": "zero_shot" | "fine_tuned",
                          "box": [x0, y0, x1, y1], "points": [[x, y, label], ...]}
      GET  /api/objects?image=NAME;  POST /api/objects;  PATCH, DELETE /api/objects/ID
      POST /api/finetune {"epochs", "split"};  GET /api/finetune[/events];  POST /api/finetune/cancel

    \b
    Example:
      samcache serve cache/stamps --run runs/stamps
    """
    try:
        import uvicorn
    except ImportError:
        raise SamcacheError("samcache serve needs the serve extra: pip install 'samcache[serve]' "
                            "(make install installs it)") from None
    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    session = ServeSession(cache_dir, run_dir, dataset=dataset, device=device)
    app = create_app(session)
    click.echo(f"serving {cache_dir} ({len(session.cache)} images; models: {', '.join(session.decoders)}) "
               f"at http://{host}:{port}/ (Ctrl+C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


# ------------------------------------------------------------------------------------- models
@main.command("models")
def models_cmd() -> None:
    """List the model types and where their weights are.

    \b
    Example:
      samcache models
    """
    from samcache.models import weights as models
    from samcache.models.families import family_of

    home = models.samcache_home()
    click.echo(f"weights folder (SAMCACHE_HOME): {home}")
    for model_type in MODEL_TYPES:
        official = models.OFFICIAL_WEIGHTS.get(model_type)
        if official is None:
            family = family_of(model_type)
            if not family.ships_pretrained:
                click.echo(f"  {model_type:<15} samcache's {family.label(model_type)} SAM-shaped model for tests, "
                           "random weights from a seed")
                continue
            weights = (f"pretrained on synthetic shapes, {models.TINY_PRETRAINED.name}"
                       if models.tiny_pretrained_available() else "random weights (pretrained file not installed)")
            click.echo(f"  {model_type:<15} samcache's small SAM-shaped model, {weights}; --random-init for random")
            continue
        state = "present" if (home / official.filename).is_file() else "not downloaded"
        click.echo(f"  {model_type:<15} {official.filename} ({official.size_bytes / 1e9:.2f} GB, {state})")


@main.command("fetch")
@click.argument("model_type", type=click.Choice(OFFICIAL_MODEL_TYPES))
def fetch_cmd(model_type: str) -> None:
    """Download a model's official weights (Meta's; MobileSAM's and SAM-HQ's authors') into SAMCACHE_HOME and
    verify their SHA-256.

    \b
    Example:
      samcache fetch vit_b
      samcache fetch sam2.1_hiera_t
    """
    from samcache.models import weights as models

    path = models.resolve_checkpoint(model_type, None, download=True)
    click.echo(f"{model_type}: {path} (SHA-256 verified)")


if __name__ == "__main__":
    sys.exit(main())
