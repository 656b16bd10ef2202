"""Export: the base SAM with the fine-tuned decoder, as a state dict SAM's own code loads.

A run that trained the encoder's tail (`--train tail`) exports it too, LoRA adapters merged into
the blocks' own weights (runs.apply_weights), so the file is still the model's plain layout; the
metadata's `tail_blocks` says which of the encoder's blocks differ from the base's.

The file is a plain `{name: tensor}` dict in Meta's key layout, so for vit_b/l/h
`segment_anything.sam_model_registry[model_type](checkpoint=FILE)` and `SamPredictor` use it
as they are. A SAM 2.1 run is written as Meta's sam2.1_hiera_*.pt are, `{"model": state_dict}` in
sam2's layout, which `sam2.build_sam.build_sam2(CONFIG, FILE)` and `SAM2ImagePredictor` load (as
safetensors: the same keys, loaded with `load_state_dict`; the metadata says how).
A `FILE.json` beside it (`model.pth` -> `model.json`) says what it is: model type, base weights
SHA-256, samcache version, training config, validation history and the eval summary when present.

The file is written under a staging name beside `FILE` (`.FILE.samcache-export-PID-...`), loaded
back with the loader its metadata names and checked against the run's model in memory (the
same state dict, bit for bit, and the same mask for one prompt on a fixed random embedding)
before it is renamed onto `FILE`; the metadata is written last. A staging file left by a killed
export is removed by the next export to the same `FILE`. An existing `FILE` is replaced only when
it is an earlier export (its metadata beside it, recording the SHA-256 it still has), never
when it is one of the export's own inputs.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from samcache import __version__
from samcache.config import RUN_WEIGHTS
from samcache.errors import OutputError, SamcacheError
from samcache.faults import crash_point
from samcache.fileio import atomic_write_json, read_json_mapping, refuse_to_replace, sha256_file, write_failure
from samcache.models.families import SAM2_CONFIGS, family_of
from samcache.models.prompts import Prompt, PromptBatch, make_prompt
from samcache.models.specs import PROMPT_EMBED_DIM
from samcache.models.weights import LoadedModel
from samcache.train.inference import predict_masks
from samcache.train.runs import RunCheckpoint, RunFolder

STATE_DICT_FORMATS = ("pth", "safetensors")
STAGING_MARK = "samcache-export"
"""In the name of every staging file or folder an export makes, with the exporting process's id."""
# The check's prompt: a box with a point inside it, on a 480x640 image whose embedding is random.
CHECK_SIZE = (480, 640)
CHECK_BOX = (160.0, 120.0, 480.0, 360.0)
CHECK_POINT = (300.0, 220.0)
# Two decoders with the same weights differ by float rounding only: a few pixels at the mask's edge.
MIN_MASK_AGREEMENT = 0.999
MAX_SCORE_DIFFERENCE = 1e-3


def metadata_path(weights_file: str | Path) -> Path:
    """Where an export's metadata goes: `model.pth` -> `model.json`."""
    return Path(weights_file).with_suffix(".json")


def read_metadata(weights_file: str | Path) -> dict:
    """The metadata beside an exported weights file; {} when there is none (or the JSON file of
    that name is something else, a dataset's train.json beside train.pth, say)."""
    metadata = read_json_mapping(metadata_path(weights_file))
    return metadata if "load_with" in metadata else {}


def export_run(run_dir: str | Path, out_file: str | Path, *, fmt: str = "pth", weights: str = "best",
               checkpoint: Optional[str | Path] = None, overwrite: bool = False) -> dict:
    """Writes the full SAM state dict with the run's decoder to `out_file`, checked, and its metadata beside it.

    Arguments:
      run_dir: a training run (its trained encoder tail, if any, is part of the model written).
      out_file: the weights file to write.
      fmt: "pth" (torch.save of a plain state dict) or "safetensors".
      weights: the run's "best" or "last" checkpoint.
      checkpoint: the base weights file, when not samcache's tiny or the official weights
        (default: the one the run was trained with).
      overwrite: replace `out_file` (and its metadata) when they are an earlier export; anything
        else there (a run's checkpoint, a cache or dataset file, the base weights) is never replaced.
    Returns the metadata written to the JSON file.
    """
    if fmt not in STATE_DICT_FORMATS:
        raise SamcacheError(f"a state dict is written as pth or safetensors, not {fmt!r} (onnx: deploy/onnx.py)")
    run, out_file = RunFolder(run_dir), Path(out_file)
    _check_outputs(out_file, command_inputs(run, weights, checkpoint), overwrite=overwrite)
    model, run_checkpoint = run.load_model(weights, checkpoint)
    model.family.require(fmt, run_checkpoint.model_type)
    remove_leftovers(out_file.parent, _leftover_pattern(out_file))
    staging = _write_staging(out_file, _serialise(model, fmt))
    try:
        crash_point("export-staged")
        check = check_export(staging, model, fmt, out_file)
        os.replace(staging, out_file)
    except OSError as exc:
        raise write_failure(out_file, exc) from exc
    finally:
        _remove(staging)
    metadata = {**_metadata(run, run_checkpoint, weights, out_file, fmt, model.weights_source), "check": check}
    atomic_write_json(metadata_path(out_file), metadata)
    return metadata


# ------------------------------------------------------------------------ what may be replaced
def command_inputs(run: RunFolder, weights: str, checkpoint: Optional[str | Path]) -> dict[Path, str]:
    """{file: what it is} of the files an export reads: the run's checkpoints and the base weights
    (given, or the ones the run was trained from), which no output may replace."""
    inputs = {Path(checkpoint).expanduser(): "the base weights file given with --checkpoint"} if checkpoint else {}
    for which in RUN_WEIGHTS:
        inputs[run.checkpoint_path(which)] = f"the run's checkpoint ({which}.pt)"
    for path in (run.read_checkpoint(weights).base_checkpoint, run.info().get("base_weights_source")):
        if path:
            inputs.setdefault(Path(path).expanduser(), "the run's base weights file")
    return inputs


def input_named(path: Path, inputs: dict[Path, str]) -> Optional[str]:
    """What `path` is when it is one of `inputs` (the same file, by any name), else None."""
    for source, what in inputs.items():
        try:
            if os.path.samefile(path, source):
                return what
        except OSError:  # either is missing: nothing there to write over
            continue
    return None


def _check_outputs(out_file: Path, inputs: dict[Path, str], *, overwrite: bool) -> None:
    sidecar = metadata_path(out_file)
    if sidecar == out_file:
        raise SamcacheError(f"--out {out_file}: the metadata goes to {sidecar.name}, the very file asked for; "
                            "name the weights file model.pth or model.safetensors")
    if out_file.is_dir():
        raise OutputError(f"--out {out_file} is a folder; --format pth and safetensors write a file")
    if out_file.exists():
        what = input_named(out_file, inputs)
        if what:
            raise OutputError(f"--out {out_file} is {what}: an export never replaces its own inputs; "
                              "choose another --out")
        problem = _not_an_earlier_export(out_file)
        if problem:
            raise OutputError(f"--out {out_file} {problem}: samcache replaces only its own earlier exports; "
                              "choose another --out")
        refuse_to_replace(out_file, overwrite=overwrite)
    if sidecar.exists() and not read_metadata(out_file):
        raise SamcacheError(f"--out {out_file} would write its metadata over {sidecar}, which is not a samcache "
                            "export's metadata: choose another --out")
    refuse_to_replace(sidecar, overwrite=overwrite)


def _not_an_earlier_export(path: Path) -> Optional[str]:
    """Why the existing `path` is not an export samcache may replace (None when it is one)."""
    metadata = read_metadata(path)
    if metadata.get("format") not in STATE_DICT_FORMATS:
        return "is not a samcache export"
    if metadata.get("sha256") != sha256_file(path):
        return (f"is not the samcache export {metadata_path(path).name} describes (its SHA-256 differs: "
                "it was changed or replaced since)")
    return None


# --------------------------------------------------------------------------- staging files
def staging_tag() -> str:
    """The part of a staging name that says it is samcache's and whose: `samcache-export-PID-RANDOM`."""
    return f"{STAGING_MARK}-{os.getpid()}-{secrets.token_hex(4)}"


def _leftover_pattern(out_file: Path) -> re.Pattern:
    # This export's staging files, and the temporary files of atomic writes of the file and its
    # metadata (fileio: `.NAME.` + tempfile's 8 characters + `.tmp`), which carry no process id.
    names = "|".join(re.escape(name) for name in (out_file.name, metadata_path(out_file).name))
    return re.compile(rf"\.{re.escape(out_file.name)}\.{STAGING_MARK}-(?P<pid>\d+)-[0-9a-f]+"
                      rf"{re.escape(out_file.suffix)}|\.(?:{names})\.[a-z0-9_]{{8}}\.tmp")


def remove_leftovers(folder: Path, pattern: re.Pattern,
                     recognise: Callable[[Path], bool] = lambda path: True) -> list[Path]:
    """Removes what exports killed before they finished left in `folder`: the entries whose whole
    name matches `pattern` (and that `recognise` accepts), unless the process named in them (the
    group "pid", when the pattern has one) still runs: that is an export at work. Returns them."""
    removed = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if not match or not recognise(path) or _still_running(match.groupdict().get("pid")):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            _remove(path)  # one that cannot be removed only takes space: the export goes on
        removed.append(path)
    return removed


def _still_running(pid: Optional[str]) -> bool:
    if pid is None or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: running
        return True
    return True


def _write_staging(out_file: Path, data: bytes) -> Path:
    """Writes `data` to a new staging file beside `out_file` (the same folder, so the final rename is
    atomic; the same suffix, which loaders read the format from) and returns its path."""
    staging = out_file.with_name(f".{out_file.name}.{staging_tag()}{out_file.suffix}")
    created = False
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        with open(staging, "xb") as f:
            created = True
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        if created:
            _remove(staging)
        if isinstance(exc, OSError):
            raise write_failure(out_file, exc) from exc
        raise
    return staging


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # the error that stopped the export is the one to report
        path.unlink(missing_ok=True)


def _serialise(model: LoadedModel, fmt: str) -> bytes:
    family = model.family
    state_dict = {k: v.detach().cpu().contiguous() for k, v in family.weights_module(model.sam).state_dict().items()}
    if fmt == "pth":
        buffer = io.BytesIO()
        torch.save(family.checkpoint_payload(state_dict), buffer)
        return buffer.getvalue()
    from safetensors.torch import save

    return save(state_dict, metadata={"model_type": model.model_type})


# ------------------------------------------------------------------------------- the check
@dataclass
class CheckCase:
    """The check's prompt on a fixed random embedding, and the run's own mask for it.

    Arguments:
      features: (1, C, 64, 64) as the family's cache holds them.
      prompt: the box and point (points[0]) in the encoder's input frame.
      input_size: the image in that frame; the image is CHECK_SIZE.
      mask: the run's mask (CHECK_SIZE) through samcache's decode path; score: its predicted IoU.
    """

    features: torch.Tensor
    prompt: Prompt
    input_size: tuple[int, int]
    mask: np.ndarray
    score: float


def check_case(model: LoadedModel) -> CheckCase:
    """The run's prediction for the check's prompt, as `samcache predict` makes it."""
    family = model.family
    features = torch.randn((1, *family.layout_of(model.model_type).feature_shape),
                           generator=torch.Generator().manual_seed(0))
    frame = family.input_size(CHECK_SIZE)
    prompt = make_prompt(np.array(CHECK_BOX), np.array([CHECK_POINT]), np.array([1]), is_box=True,
                         original_size=CHECK_SIZE, frame=frame)
    model.sam.eval()
    (prediction,) = predict_masks(model.decoder(), features,
                                  PromptBatch.from_prompts([prompt], torch.zeros(1, dtype=torch.long)),
                                  [(frame, CHECK_SIZE)])
    return CheckCase(features, prompt, frame, prediction.mask, prediction.score)


def compare_masks(case: CheckCase, mask: np.ndarray, score: float, what: str) -> dict:
    """{"mask_agreement", "score_difference"} of a reloaded export's prediction against the run's;
    an OutputError (one line, starting with `what`) when they are not the same prediction."""
    agreement = float((mask == case.mask).mean()) if mask.shape == case.mask.shape else 0.0
    difference = abs(score - case.score)
    if agreement < MIN_MASK_AGREEMENT or not difference <= MAX_SCORE_DIFFERENCE:
        raise OutputError(f"{what} predicts another mask than the run for the same prompt and embedding (pixels "
                          f"agreeing: {agreement:.4f}; predicted IoU {score:.4f}, the run's {case.score:.4f})")
    return {"mask_agreement": round(agreement, 6), "score_difference": float(f"{difference:.3g}")}


@torch.no_grad()
def check_export(path: Path, model: LoadedModel, fmt: str, out_file: Path) -> dict:
    """Loads the file at `path` as its metadata's `load_with` says and compares it with `model`:
    the same state dict, key for key and bit for bit, and the same mask for the check's prompt
    through the loader's own predictor. Any difference is an OutputError naming `out_file` and
    what differed. Returns what was compared."""
    family = model.family
    load_with = family.load_with(model.model_type, fmt)
    failed = f"{out_file} was not written: the export read back with {load_with}"
    try:
        loaded, predict = _READERS[family.export_reader](path, model.model_type, fmt)
    except Exception as exc:  # each loader raises its own types (RuntimeError, KeyError, pickle's) on a bad file
        raise OutputError(f"{out_file} was not written: {load_with} cannot load the export "
                          f"({_first_line(exc).replace(str(path), out_file.name)})") from exc
    difference = state_dict_difference(family.weights_module(model.sam).state_dict(), loaded.state_dict())
    if difference:
        raise OutputError(f"{failed} {difference} than the run's model")
    case = check_case(model)
    return {"loaded_with": load_with, **compare_masks(case, *predict(case), failed)}


def state_dict_difference(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """How `got` differs from `expected` ("" when every key holds the same tensor, bit for bit)."""
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or extra:
        key = (missing or extra)[0]
        return f"has {len(missing)} key(s) fewer and {len(extra)} more (e.g. {key})"
    for key in sorted(expected):
        a, b = expected[key], got[key]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
            return f"holds another {key}"
    return ""


def _first_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


# A reloader: (file, model type, format) -> (the loaded module whose state dict is the family's
# layout, a function from a CheckCase to that module's (mask, score) through its own predictor).
Reloaded = tuple[torch.nn.Module, Callable[[CheckCase], tuple[np.ndarray, float]]]


def _reload_with_segment_anything(path: Path, model_type: str, fmt: str) -> Reloaded:
    from segment_anything import sam_model_registry

    if fmt == "pth":
        sam = sam_model_registry[model_type](checkpoint=str(path))
    else:
        from safetensors.torch import load_file

        sam = sam_model_registry[model_type]()
        sam.load_state_dict(load_file(str(path)), strict=True)
    return sam, _sam_predictor(sam)


def _reload_with_samcache(path: Path, model_type: str, fmt: str) -> Reloaded:
    from samcache.models.weights import build_sam, read_state_dict

    # load_sam's own steps, without the SHA-256 sidecar it keeps beside a file (here a staging file)
    sam = build_sam(model_type)
    sam.load_state_dict(read_state_dict(path), strict=True)
    return sam, _sam_predictor(sam)


def _sam_predictor(sam: torch.nn.Module, predictor_class=None, *,
                   early_feature: bool = False) -> Callable[[CheckCase], tuple[np.ndarray, float]]:
    """`predictor_class` (segment_anything's SamPredictor by default) on the check's features; with
    `early_feature`, SAM-HQ's: the embedding, then its `interm_features` from the features' other channels."""
    if predictor_class is None:
        from segment_anything import SamPredictor as predictor_class

    def predict(case: CheckCase) -> tuple[np.ndarray, float]:
        predictor = predictor_class(sam.eval())
        # set_image's state, with the check's embedding in place of the encoder's
        predictor.features, predictor.is_image_set = case.features, True
        if early_feature:
            embedding, early = case.features[:, :PROMPT_EMBED_DIM], case.features[:, PROMPT_EMBED_DIM:]
            predictor.features, predictor.interm_features = embedding, [early.permute(0, 2, 3, 1)]
        predictor.original_size, predictor.input_size = CHECK_SIZE, case.input_size
        masks, scores, _ = predictor.predict(point_coords=np.array([CHECK_POINT]), point_labels=np.array([1]),
                                             box=np.array(CHECK_BOX), multimask_output=False)
        return masks[0], float(scores[0])

    return predict


def import_mobile_sam():
    """MobileSAM's own package: `mobile_sam` (installed from its GitHub repository), else the same code
    as published on PyPI inside mobilesam-lite (`mobilesam_lite.mobile_sam`, identical to MobileSAM's
    but for one import line). ImportError when neither is installed."""
    from samcache.models.mobile_sam import quiet_tiny_vit_import

    with quiet_tiny_vit_import():
        try:
            import mobile_sam
        except ImportError:
            from mobilesam_lite import mobile_sam
    return mobile_sam


def _reload_with_mobile_sam(path: Path, model_type: str, fmt: str) -> Reloaded:
    try:
        mobile_sam = import_mobile_sam()
    except ImportError:
        raise OutputError("reading a MobileSAM export back needs MobileSAM's package: pip install "
                          "git+https://github.com/ChaoningZhang/MobileSAM, or pip install --no-deps "
                          "mobilesam-lite (make install does)") from None
    if fmt == "pth":
        sam = mobile_sam.sam_model_registry[model_type](checkpoint=str(path))
    else:
        from safetensors.torch import load_file

        sam = mobile_sam.sam_model_registry[model_type]()
        sam.load_state_dict(load_file(str(path)), strict=True)
    sam.eval()  # after loading: TinyViT's eval-mode attention biases are copied by .eval() (mobile_sam.py)
    return sam, _sam_predictor(sam, mobile_sam.SamPredictor)


def _reload_with_segment_anything_hq(path: Path, model_type: str, fmt: str) -> Reloaded:
    from samcache.models.mobile_sam import quiet_tiny_vit_import

    with quiet_tiny_vit_import():
        from segment_anything_hq import SamPredictor, sam_model_registry

    registry_key = model_type.removeprefix("hq_")
    with contextlib.redirect_stdout(io.StringIO()):  # its builders print load_state_dict's result
        if fmt == "pth":
            sam = sam_model_registry[registry_key](checkpoint=str(path))
        else:
            from safetensors.torch import load_file

            sam = sam_model_registry[registry_key]()
            sam.load_state_dict(load_file(str(path)), strict=True)
    sam.eval()  # after loading, for hq_vit_tiny's TinyViT (mobile_sam.py)
    return sam, _sam_predictor(sam, SamPredictor, early_feature=True)


def _reload_with_sam2(path: Path, model_type: str, fmt: str) -> Reloaded:
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from samcache.models.feature_layout import unpack_sam2

    if fmt == "pth":
        model = build_sam2(SAM2_CONFIGS[model_type], str(path), device="cpu")
    else:
        from safetensors.torch import load_file

        model = build_sam2(SAM2_CONFIGS[model_type], None, device="cpu")
        model.load_state_dict(load_file(str(path)), strict=True)

    def predict(case: CheckCase) -> tuple[np.ndarray, float]:
        predictor = SAM2ImagePredictor(model)
        maps = unpack_sam2(case.features)  # set_image's state, with the check's features
        predictor._features = {"image_embed": maps["image_embed"],
                               "high_res_feats": [maps["high_res_s0"], maps["high_res_s1"]]}
        predictor._orig_hw, predictor._is_image_set = [CHECK_SIZE], True
        masks, scores, _ = predictor.predict(point_coords=np.array([CHECK_POINT]), point_labels=np.array([1]),
                                             box=np.array(CHECK_BOX), multimask_output=False)
        return masks[0] > 0, float(scores[0])

    return model, predict


# What each family's `load_with` names, by family name.
_READERS = {"segment_anything": _reload_with_segment_anything, "samcache": _reload_with_samcache,
            "sam2": _reload_with_sam2, "mobile_sam": _reload_with_mobile_sam,
            "segment_anything_hq": _reload_with_segment_anything_hq}


def _metadata(run: RunFolder, run_checkpoint: RunCheckpoint, weights: str, out_file: Path, fmt: str,
              base_source: str) -> dict:
    model_type = run_checkpoint.model_type
    return {
        "format": fmt,
        "file": out_file.name,
        "sha256": sha256_file(out_file),
        "model_type": model_type,
        "base_weights_sha256": run_checkpoint.base_weights_sha256,
        "base_weights_source": base_source,
        "fine_tuned": run_checkpoint.trained,
        "tail_blocks": run_checkpoint.tail_blocks,
        "run": str(run.path.resolve()),
        "run_weights": weights,
        "epoch": run_checkpoint.state.epoch,
        "validation_miou_per_epoch": run_checkpoint.state.history,
        "training_config": run_checkpoint.config,
        "cache": run.cache_dir(),
        "samcache_version": __version__,
        "eval": run.eval_summaries(),
        "load_with": family_of(model_type).load_with(model_type, fmt),
    }
