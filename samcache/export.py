"""Export: the base SAM with the fine-tuned decoder, as a state dict SAM's own code loads.

The file is a plain `{name: tensor}` dict in Meta's key layout, so for vit_b/l/h
`segment_anything.sam_model_registry[model_type](checkpoint=FILE)` and `SamPredictor` use it
as they are. A `FILE.json` beside it (`model.pth` -> `model.json`) says what it is: model type, base weights SHA-256,
samcache version, training config, validation history and the eval summary when present.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import torch

from samcache import __version__
from samcache.config import EXPORT_FORMATS
from samcache.errors import SamcacheError
from samcache.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from samcache.runs import RunCheckpoint, RunFolder


def export_run(run_dir: str | Path, out_file: str | Path, *, fmt: str = "pth", weights: str = "best",
               checkpoint: Optional[str | Path] = None) -> dict:
    """Writes the full SAM state dict with the run's decoder to `out_file`, and its metadata beside it.

    Arguments:
      run_dir: a training run.
      out_file: the weights file to write.
      fmt: "pth" (torch.save of a plain state dict) or "safetensors".
      weights: the run's "best" or "last" checkpoint.
      checkpoint: the base weights file, when not samcache's tiny or the official weights
        (default: the one the run was trained with).
    Returns the metadata written to the JSON file.
    """
    if fmt not in EXPORT_FORMATS:
        raise SamcacheError(f"--format is pth or safetensors, not {fmt!r}")
    run, out_file = RunFolder(run_dir), Path(out_file)
    model, run_checkpoint = run.load_model(weights, checkpoint)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.sam.state_dict().items()}
    if fmt == "pth":
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        atomic_write_bytes(out_file, buffer.getvalue())
    else:
        from safetensors.torch import save

        atomic_write_bytes(out_file, save(state_dict, metadata={"model_type": run_checkpoint.model_type}))
    metadata = _metadata(run, run_checkpoint, weights, out_file, fmt, model.weights_source)
    atomic_write_json(out_file.with_suffix(".json"), metadata)
    return metadata


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
        "load_with": (f"segment_anything.sam_model_registry[{model_type!r}](checkpoint=FILE)"
                      if model_type != "tiny" else "samcache.models.load_sam('tiny', checkpoint=FILE)"),
    }
