"""Model building and weight loading: the only module that knows where SAM weights come from.

`load_sam(model_type, checkpoint)` is the entry point. It builds the architecture with
segment_anything's own modules, finds the weights (an explicit path, `$SAMCACHE_HOME`, or
a verified download of the official file), loads them without executing pickled code
(`weights_only=True`, or safetensors) and with strict keys, and says which weights it used
(`weights_sha256`), so caches and runs can refuse to mix models.

A weights file's SHA-256 is remembered in `$SAMCACHE_HOME/hashes/` (one small JSON file per
weights file, keyed by its resolved path, size and modification time), so a 2.5 GB checkpoint is
hashed once, not at every command. Only files samcache accepted are remembered, and nothing is
ever written beside the user's file.

`tiny` is samcache's own SAM-shaped model: SAM's geometry (1024 px input, 256x64x64
embeddings) and SAM's exact prompt encoder and mask decoder, with a small convolutional image
encoder (tiny_encoder.py), so every stage runs at real sizes in seconds on a CPU. Two sets of weights exist for it:

- samcache's own pretrained weights, `samcache/weights/tiny_shapes.safetensors`, trained end to
  end on synthetic shapes by `scripts/pretrain_tiny.py` (provenance in `tiny_shapes.json`; NOT
  Meta's SAM). `load_sam("tiny")` uses them when the file is installed and its SHA-256 is
  `TINY_PRETRAINED_SHA256`; like any weights file they are identified by the file's SHA-256.
- random weights, deterministic from a seed (`build_tiny(seed)`, `load_sam("tiny",
  random_init=True)`), identified by the SHA-256 of the state dict's tensors.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from samcache.errors import CheckpointError, OutputError
from samcache.fileio import atomic_write_json, read_json_mapping, sha256_file
from samcache.models.families import ModelFamily, family_of, recognise_model_type
from samcache.models.specs import OFFICIAL_WEIGHTS, OfficialWeights
from samcache.progress import progress_bar

if TYPE_CHECKING:  # segment_anything imports torchvision (a second or more): only where a model is built
    from segment_anything.modeling import Sam

    from samcache.models.decoder import PromptDecoder

# samcache's own tiny weights, pretrained on synthetic shapes (scripts/pretrain_tiny.py), shipped
# in the package. The SHA-256 pins the exact file; a file that differs is refused, never used.
TINY_PRETRAINED = Path(__file__).resolve().parents[1] / "weights" / "tiny_shapes.safetensors"
# The shipped file's SHA-256 (scripts/pretrain_tiny.py prints it); caches made with it record it.
TINY_PRETRAINED_SHA256 = "70e815d32d4017c1d265f1f1b93b7763102ba427c6b518818d569994354d1444"


@dataclass
class LoadedModel:
    """A SAM model and the identity of its weights.

    Arguments:
      sam: the model, in eval mode, on the CPU.
      model_type: one of specs.MODEL_TYPES.
      weights_sha256: SHA-256 of the checkpoint file, or for generated weights (tiny) of the
        state dict's tensors; caches and runs record it and refuse a mismatch.
      weights_source: a human-readable origin: a path, or "tiny random init (seed 0)".
    """

    sam: Sam
    model_type: str
    weights_sha256: str
    weights_source: str

    @property
    def family(self) -> ModelFamily:
        return family_of(self.model_type)

    def decoder(self) -> PromptDecoder:
        """The model's prompt encoder and mask decoder as its family decodes them."""
        return self.family.decoder(self.sam, self.model_type)


def samcache_home() -> Path:
    """Where downloaded weights live: `$SAMCACHE_HOME`, default `~/.cache/samcache`."""
    return Path(os.environ.get("SAMCACHE_HOME", Path.home() / ".cache" / "samcache")).expanduser()


def build_sam(model_type: str) -> Sam:
    """An untrained model of `model_type` (eval mode, CPU), as its family builds it (families.py)."""
    return family_of(model_type).build(model_type)


def build_seeded(model_type: str, seed: int = 0) -> Sam:
    """`model_type` with random weights, identical for the same seed on any machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam(model_type)


def build_tiny(seed: int = 0) -> Sam:
    """The tiny model with random weights, identical for the same seed on any machine."""
    return build_seeded("tiny", seed)


def tiny_pretrained_available() -> bool:
    """True when the shipped pretrained tiny weights are installed (file present, SHA-256 pinned).

    A present file whose SHA-256 differs from `TINY_PRETRAINED_SHA256` raises CheckpointError:
    silently falling back to random weights would change every result without a word.
    """
    if not TINY_PRETRAINED_SHA256 or not TINY_PRETRAINED.is_file():
        return False
    digest = sha256_file(TINY_PRETRAINED)  # small: hashed each time, no sidecar inside the package
    if digest != TINY_PRETRAINED_SHA256:
        raise CheckpointError(
            f"{TINY_PRETRAINED} has SHA-256 {digest}, but this samcache expects "
            f"{TINY_PRETRAINED_SHA256}: the installed file is damaged or from another version. Reinstall "
            "samcache, pass --checkpoint, or use random_init=True"
        )
    return True


@dataclass(frozen=True)
class WeightsIdentity:
    """Which weights a command will use, found and hashed without building the model.

    `samcache embed` needs only this when its encoder was converted to OpenVINO before
    (encoders.py): then SAM is never built, and segment_anything is never imported.

    Arguments:
      model_type: one of specs.MODEL_TYPES.
      weights_sha256: as in LoadedModel.
      weights_source: as in LoadedModel.
      path: the weights file, or None for tiny's random weights.
      seed: the seed of tiny's random weights (path None).
    """

    model_type: str
    weights_sha256: str
    weights_source: str
    path: Optional[Path]
    seed: int = 0


def identify_weights(
    model_type: str,
    checkpoint: Optional[str | Path] = None,
    *,
    seed: int = 0,
    download: bool = True,
    random_init: bool = False,
) -> WeightsIdentity:
    """The weights `load_sam` would load with the same arguments (see there), and their SHA-256."""
    family = family_of(model_type)
    family.check_installed(model_type)  # before anything is written: a cache, a run folder
    if random_init and (not family.own_weights or checkpoint is not None):
        raise CheckpointError("random_init applies to the tiny model without a checkpoint only")
    if family.own_weights and checkpoint is None:
        if random_init or not family.ships_pretrained or not tiny_pretrained_available():
            digest = state_dict_sha256(build_seeded(model_type, seed).state_dict())  # built in milliseconds
            return WeightsIdentity(model_type, digest, f"{model_type} random init (seed {seed})", None, seed)
        if seed != 0:  # a seed only picks random weights: say so rather than ignore it
            raise CheckpointError(f"seed={seed} selects {model_type}'s random weights; pass random_init=True for them")
        return WeightsIdentity(model_type, TINY_PRETRAINED_SHA256, str(TINY_PRETRAINED), TINY_PRETRAINED)
    path = resolve_checkpoint(model_type, checkpoint, download=download)
    # The absolute path: caches record it, and later commands find the file again from anywhere.
    return WeightsIdentity(model_type, file_sha256_cached(path), str(path.resolve()), path)


def load_identified(weights: WeightsIdentity) -> LoadedModel:
    """Builds the model of `weights` and loads them (strict keys, no pickled code)."""
    if weights.path is None:
        sam = build_seeded(weights.model_type, weights.seed)
    else:
        state_dict = read_state_dict(weights.path)  # first: a refused file costs no model build
        sam = build_sam(weights.model_type)
        load_weights_into(family_of(weights.model_type).weights_module(sam), state_dict,
                          model_type=weights.model_type, source=weights.path)
        remember_sha256(weights.path)  # loaded: worth remembering; a refused file is not
    return LoadedModel(sam, weights.model_type, weights.weights_sha256, weights.weights_source)


def load_sam(
    model_type: str,
    checkpoint: Optional[str | Path] = None,
    *,
    seed: int = 0,
    download: bool = True,
    random_init: bool = False,
) -> LoadedModel:
    """Builds `model_type` and loads its weights.

    Arguments:
      model_type: one of specs.MODEL_TYPES.
      checkpoint: a state dict file (.pth/.pt weights-only, or .safetensors). Without it, real
        models use `$SAMCACHE_HOME/<official file>` or download it; tiny uses its shipped
        pretrained weights (`TINY_PRETRAINED`) when installed, else random weights.
      seed: the seed of tiny's random weights (with `random_init`, or when no pretrained tiny
        weights are installed; another seed than 0 with the pretrained ones is an error).
      download: allow downloading the official weights when they are not in `$SAMCACHE_HOME`.
      random_init: tiny only: the random weights of `build_tiny(seed)`, even when the pretrained
        ones are installed.
    """
    return load_identified(identify_weights(model_type, checkpoint, seed=seed, download=download,
                                            random_init=random_init))


def resolve_checkpoint(model_type: str, checkpoint: Optional[str | Path], *, download: bool = True) -> Path:
    """The checkpoint file to load: the explicit path, a verified file in `$SAMCACHE_HOME`, or a download."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
        return path
    official = OFFICIAL_WEIGHTS.get(model_type)
    if official is None:
        raise CheckpointError(f"model type {model_type!r} has no official weights; pass --checkpoint PATH")
    path = samcache_home() / official.filename
    if path.is_file():
        digest = file_sha256_cached(path)
        if digest != official.sha256:
            raise CheckpointError(
                f"{path} has SHA-256 {digest}, but the official {model_type} file has {official.sha256}; "
                f"delete it to download again, or pass it explicitly with --checkpoint {path}"
            )
        remember_sha256(path)
        return path
    if not download:
        raise CheckpointError(_offline_message(model_type, official, reason="downloads are disabled"))
    return download_official(model_type)


def download_official(model_type: str) -> Path:
    """Downloads the official checkpoint for `model_type` into `$SAMCACHE_HOME`, verifying its SHA-256.

    The file is written as `<name>.part` and renamed only once verified, so an interrupted or
    corrupted download never leaves a file that looks complete.
    """
    official = OFFICIAL_WEIGHTS[model_type]
    home = samcache_home()
    home.mkdir(parents=True, exist_ok=True)
    target = home / official.filename
    partial_path = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(official.url, timeout=60) as response, open(partial_path, "wb") as out:
            total = int(response.headers.get("Content-Length") or official.size_bytes)
            with progress_bar(total, desc=f"downloading {official.filename}", unit="B", unit_scale=True) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        partial_path.unlink(missing_ok=True)
        raise CheckpointError(_offline_message(model_type, official, reason=f"download failed: {exc}")) from exc
    if digest.hexdigest() != official.sha256:
        partial_path.unlink(missing_ok=True)
        raise CheckpointError(
            f"downloaded {official.url} has SHA-256 {digest.hexdigest()}, expected {official.sha256}; "
            "the file was deleted, try again"
        )
    os.replace(partial_path, target)
    _HASHED[_file_key(target)] = official.sha256  # just verified: no need to read 2.5 GB again
    remember_sha256(target)
    return target


def _offline_message(model_type: str, official: OfficialWeights, *, reason: str) -> str:
    return (
        f"no {model_type} weights: {reason}. Download {official.url} on a machine with internet "
        f"(SHA-256 {official.sha256}) and either put it in {samcache_home()} (set SAMCACHE_HOME to "
        f"change that folder) or pass --checkpoint PATH"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a state dict without ever executing pickled code.

    `.safetensors` files are read with safetensors; anything else with
    `torch.load(weights_only=True)`, which refuses objects other than tensors and plain types.
    A `{"model": state_dict}` or `{"state_dict": ...}` wrapper, common in training checkpoints,
    is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    # torch.save writes a zip archive ("PK"); older files are a pickle (protocol byte 0x80). For
    # anything else torch's weights-only loader would speak of unsafe code: say what it is instead.
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither the zip archive torch.save writes "
                              "nor a pickle): is it the right file?")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain types, and loading "
            f"them would run code from the file ({str(exc).splitlines()[0]})"
        ) from exc
    except Exception as exc:  # torch.load fails in many ways on a file that is no checkpoint (KeyError, IndexError...)
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict) and len(obj) <= 3:
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def load_weights_into(sam: Sam, state_dict: dict[str, torch.Tensor], *, model_type: str, source: str | Path) -> None:
    """`load_state_dict(strict=True)`, with an error that names the model type expected and, when it
    can tell, the type the file looks like."""
    expected = sam.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong_shape:
        looks_like = recognise_model_type(state_dict)
        hint = f"; it looks like a {looks_like} checkpoint" if looks_like and looks_like != model_type else ""
        details = []
        if wrong_shape:
            k = wrong_shape[0]
            details.append(
                f"{len(wrong_shape)} tensor(s) of the wrong shape, e.g. {k}: "
                f"{tuple(state_dict[k].shape)} in the file, {tuple(expected[k].shape)} expected"
            )
        if missing:
            details.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise CheckpointError(
            f"{source} does not fit the {model_type} model{hint}: " + "; ".join(details)
            + f". Pass --model with the checkpoint's type, or a {model_type} checkpoint"
        )
    sam.load_state_dict(state_dict, strict=True)


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict: names, dtypes, shapes and bytes, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


_HASHED: dict[tuple[str, int, int], str] = {}
"""SHA-256 of the weights files this process hashed, by (resolved path, size, mtime_ns)."""


def file_sha256_cached(path: str | Path) -> str:
    """SHA-256 of a (large) weights file: from the hash cache ($SAMCACHE_HOME/hashes) while the file's
    size and modification time are those recorded, else hashed. Only `remember_sha256` writes the
    cache, once the file is accepted: a refused file leaves nothing behind."""
    key = _file_key(path)
    if key in _HASHED:
        return _HASHED[key]
    entry = read_json_mapping(_hash_entry(key[0]))
    digest = entry.get("sha256")
    if (entry.get("path"), entry.get("size"), entry.get("mtime_ns")) == key and _is_sha256(digest):
        return digest
    _HASHED[key] = sha256_file(key[0])
    return _HASHED[key]


def remember_sha256(path: str | Path) -> None:
    """Records the SHA-256 this process computed for `path` in the hash cache, unless the file has
    changed since. A hash cache that cannot be written (read-only home) only costs hashing again."""
    try:
        key = _file_key(path)
    except OSError:
        return  # gone since it was loaded: nothing to remember
    digest = _HASHED.get(key)
    if digest is None:
        return  # read from the hash cache, or changed since it was hashed
    resolved, size, mtime_ns = key
    try:
        atomic_write_json(_hash_entry(resolved), {"path": resolved, "size": size, "mtime_ns": mtime_ns,
                                                  "sha256": digest})
    except OutputError:
        pass


def _file_key(path: str | Path) -> tuple[str, int, int]:
    """What identifies a weights file's content without reading it: resolved path, size, mtime_ns."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_size, stat.st_mtime_ns


def _hash_entry(resolved: str) -> Path:
    """The hash cache's file for the weights file at (resolved) path `resolved`."""
    return samcache_home() / "hashes" / f"{hashlib.sha256(resolved.encode('utf-8')).hexdigest()}.json"


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def load_matching(model_type: str, weights_sha256: str, checkpoint: Optional[str | Path] = None, *,
                  recorded_source: str = "") -> LoadedModel:
    """The model whose weights made a cache (same type, same SHA-256); anything else is refused.

    Training and evaluation start from the prompt encoder and mask decoder of those weights,
    since the embeddings they read were made by that model's image encoder. Without `checkpoint`,
    the weights are found again: the file the cache recorded (`recorded_source`, when it is
    still there with that SHA-256), the official file when the SHA-256 is its, and for
    tiny both of samcache's own weight sets (the shipped pretrained file, and the random init of
    seed 0, identified by its state dict's SHA-256). Weights that are none of these are never
    downloaded in their place: the error names the file and SHA-256 to pass with --checkpoint.
    """
    if checkpoint is None and recorded_source:
        checkpoint = _recorded_file(recorded_source, weights_sha256)
    official = OFFICIAL_WEIGHTS.get(model_type)
    if checkpoint is None and official is not None and official.sha256 != weights_sha256:
        raise CheckpointError(_missing_weights_message(model_type, weights_sha256, recorded_source))
    random_init = family_of(model_type).own_weights and checkpoint is None and weights_sha256 != TINY_PRETRAINED_SHA256
    loaded = load_sam(model_type, checkpoint, random_init=random_init)
    if loaded.weights_sha256 != weights_sha256:
        if checkpoint is None:
            raise CheckpointError(_missing_weights_message(model_type, weights_sha256, recorded_source))
        raise CheckpointError(
            f"the cache was made with {model_type} weights of SHA-256 {weights_sha256}, but "
            f"{loaded.weights_source} has SHA-256 {loaded.weights_sha256}. The decoder must start from the "
            "weights whose encoder made the embeddings: pass those with --checkpoint, or re-embed"
        )
    return loaded


def _recorded_file(source: str, weights_sha256: str) -> Optional[Path]:
    """The weights file a cache recorded, if it is still there with the same content."""
    path = Path(source)
    if path == TINY_PRETRAINED:  # the shipped file: load_sam finds it itself
        return None
    try:
        if path.is_file() and file_sha256_cached(path) == weights_sha256:
            return path
    except OSError:
        pass
    return None


def _missing_weights_message(model_type: str, weights_sha256: str, recorded_source: str) -> str:
    where = ""
    if recorded_source and Path(recorded_source).is_file():
        where = f" from {recorded_source}, which has changed since (its SHA-256 differs now)"
    elif recorded_source and Path(recorded_source).is_absolute():
        where = f" from {recorded_source}, which is not there any more"
    return (f"the cache was made with {model_type} weights of SHA-256 {weights_sha256}{where}. The decoder must "
            "start from those very weights: pass the file with that SHA-256 with --checkpoint")
