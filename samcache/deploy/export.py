"""Export: the base SAM with the fine-tuned decoder, as a state dict SAM's own code loads.

The file is a plain `{name: tensor}` dict in Meta's key layout, so for vit_b/l/h
`segment_anything.sam_model_registry[model_type](checkpoint=FILE)` and `SamPredictor` use it
as they are. A SAM 2.1 run is written as Meta's sam2.1_hiera_*.pt are, `{"model": state_dict}` in
sam2's layout, which `sam2.build_sam.build_sam2(CONFIG, FILE)` and `SAM2ImagePredictor` load (as
safetensors: the same keys, loaded with `load_state_dict`; the metadata says how).
A `FILE.json` beside it (`model.pth` -> `model.json`) says what it is: model type, base weights
SHA-256, samcache version, training config, validation history and the eval summary when present.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import torch

from samcache import __version__
from samcache.errors import SamcacheError
from samcache.fileio import atomic_write_bytes, atomic_write_json, read_json_mapping, refuse_to_replace, sha256_file
from samcache.models.families import family_of
from samcache.train.runs import RunCheckpoint, RunFolder

STATE_DICT_FORMATS = ("pth", "safetensors")


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
    """Writes the full SAM state dict with the run's decoder to `out_file`, and its metadata beside it.

    Arguments:
      run_dir: a training run.
      out_file: the weights file to write.
      fmt: "pth" (torch.save of a plain state dict) or "safetensors".
      weights: the run's "best" or "last" checkpoint.
      checkpoint: the base weights file, when not samcache's tiny or the official weights
        (default: the one the run was trained with).
      overwrite: replace `out_file` (and its metadata) when they exist; a JSON file of another
        kind under the metadata's name (a dataset's train.json, say) is never replaced.
    Returns the metadata written to the JSON file.
    """
    if fmt not in STATE_DICT_FORMATS:
        raise SamcacheError(f"a state dict is written as pth or safetensors, not {fmt!r} (onnx: deploy/onnx.py)")
    run, out_file = RunFolder(run_dir), Path(out_file)
    _check_outputs(out_file, overwrite=overwrite)
    model, run_checkpoint = run.load_model(weights, checkpoint)
    family = model.family
    family.require(fmt, run_checkpoint.model_type)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in family.weights_module(model.sam).state_dict().items()}
    if fmt == "pth":
        buffer = io.BytesIO()
        torch.save(family.checkpoint_payload(state_dict), buffer)
        atomic_write_bytes(out_file, buffer.getvalue())
    else:
        from safetensors.torch import save

        atomic_write_bytes(out_file, save(state_dict, metadata={"model_type": run_checkpoint.model_type}))
    metadata = _metadata(run, run_checkpoint, weights, out_file, fmt, model.weights_source)
    atomic_write_json(metadata_path(out_file), metadata)
    return metadata


def _check_outputs(out_file: Path, *, overwrite: bool) -> None:
    sidecar = metadata_path(out_file)
    if sidecar == out_file:
        raise SamcacheError(f"--out {out_file}: the metadata goes to {sidecar.name}, the very file asked for; "
                            "name the weights file model.pth or model.safetensors")
    refuse_to_replace(out_file, overwrite=overwrite)
    if sidecar.exists() and not read_metadata(out_file):
        raise SamcacheError(f"--out {out_file} would write its metadata over {sidecar}, which is not a samcache "
                            "export's metadata: choose another --out")
    refuse_to_replace(sidecar, overwrite=overwrite)


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
