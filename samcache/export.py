"""Export: the base SAM with the fine-tuned decoder, as a state dict SAM's own code loads.

The file is a plain `{name: tensor}` dict in Meta's key layout, so for vit_b/l/h
`segment_anything.sam_model_registry[model_type](checkpoint=FILE)` and `SamPredictor` use it
as they are. A `FILE.json` beside it (`model.pth` -> `model.json`) says what it is: model type, base weights SHA-256,
samcache version, training config, validation history and the eval summary when present.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import torch

from samcache import __version__
from samcache.errors import SamcacheError
from samcache.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from samcache.models import load_matching

FORMATS = ("pth", "safetensors")


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
    from samcache.train import read_run_checkpoint

    if fmt not in FORMATS:
        raise SamcacheError(f"--format is pth or safetensors, not {fmt!r}")
    run_dir, out_file = Path(run_dir), Path(out_file)
    source = run_dir / f"{weights}.pt"
    if not source.is_file():
        raise SamcacheError(f"{source} does not exist: is {run_dir} a samcache run?")
    payload = read_run_checkpoint(source)
    base = load_matching(payload["model_type"], payload["base_weights_sha256"],
                         checkpoint or payload["config"].get("checkpoint"))
    state_dict = base.sam.state_dict()
    unknown = sorted(set(payload["state_dict"]) - set(state_dict))
    if unknown:
        raise SamcacheError(f"{source} holds keys the {payload['model_type']} model does not have, e.g. {unknown[0]}")
    state_dict.update(payload["state_dict"])
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}

    if fmt == "pth":
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        atomic_write_bytes(out_file, buffer.getvalue())
    else:
        from safetensors.torch import save

        atomic_write_bytes(out_file, save(state_dict, metadata={"model_type": payload["model_type"]}))

    run_info = _read_json(run_dir / "run.json")
    metadata = {
        "format": fmt,
        "file": out_file.name,
        "sha256": sha256_file(out_file),
        "model_type": payload["model_type"],
        "base_weights_sha256": payload["base_weights_sha256"],
        "base_weights_source": base.weights_source,
        "fine_tuned": payload["trained"],
        "run": str(run_dir.resolve()),
        "run_weights": weights,
        "epoch": payload["state"]["epoch"],
        "validation_miou_per_epoch": payload["state"]["history"],
        "training_config": payload["config"],
        "cache": run_info.get("cache"),
        "samcache_version": __version__,
        "eval": {p.stem.removeprefix("eval-"): _read_json(p) for p in sorted(run_dir.glob("eval-*.json"))},
        "load_with": (f"segment_anything.sam_model_registry[{payload['model_type']!r}](checkpoint=FILE)"
                      if payload["model_type"] != "tiny" else "samcache.models.load_sam('tiny', checkpoint=FILE)"),
    }
    atomic_write_json(out_file.with_suffix(".json"), metadata)
    return metadata


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
