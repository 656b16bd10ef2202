"""The cache's on-disk format: its folder layout, header, records and names (no h5py handles kept).

A cache is a folder (format in docs/cache-format.md):

    CACHE/cache.json                 header: schema version and provenance, written once
    CACHE/dataset.json               the dataset the cache follows (its path, its format)
    CACHE/index.npz                  the shards' tables as columns (index.py; derived, optional)
    CACHE/shards/g00001-r0000-s000000.h5   committed shards: embeddings, images, objects, failures
    CACHE/shards/*.h5.tmp            a shard being written (ignored by readers, removed on restart)

Shard names sort by (generation, rank, sequence); a generation is one run, so when an image
appears in several shards (its file or its annotations changed) the latest record wins. Only the
modules of this folder import h5py: `writer.py` writes shards, `reader.py` reads them, `verify.py`
checks them.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from samcache import __version__
from samcache.data.records import ObjectRecord
from samcache.errors import CacheError
from samcache.fileio import FileIdentity, atomic_write_json
from samcache.models.families import FAMILIES, ModelFamily, family_of
from samcache.models.feature_layout import CacheLayout

SCHEMA_VERSIONS = {family.layout_of(t).name: family.layout_of(t).schema_version for family in FAMILIES
                   for t in family.model_types}
"""The schema version of each cache layout (feature_layout.CacheLayout): a SAM 2.1 cache holds two
more maps per image, a SAM-HQ cache one. What a shard stores per image is its family's
`layout_of(model_type).stored_maps`."""


HEADER_NAME = "cache.json"


SHARD_DIR = "shards"


FP16_MAX = float(np.finfo(np.float16).max)


PREVIEW_SIZE = 640


_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class Provenance:
    """What made the embeddings; a cache accepts new images only from the same recipe.

    Arguments:
      model_type: one of specs.MODEL_TYPES; its family (families.py) decides the cache layout,
        hence the schema version and what a shard stores.
      weights_sha256: SHA-256 of the weights (see weights.LoadedModel).
      preprocessing: specs.Preprocessing.as_dict().
      intensity: how images with more than 8 bits were mapped to uint8 (images.read_image).
      embedding_dtype: the stored dtype, "float16".
      compute_precision: "fp32" or "bf16" (autocast) for the encoder.
      encoder_backend: "torch" or "openvino": who ran the encoder (informative; not compared:
        the backends agree within float tolerance, tested).
      weights_source: where the weights came from (informative; not compared).
      samcache_version: the version that created the cache (informative; not compared).
      tail_blocks: K > 0 when each image also holds the encoder's tokens before its last K blocks
        (`embed --tail-blocks`, the `tail_tokens` dataset); a header leaves it out when 0.
      views: the names of the views each image also holds (`embed --views`, data/views.py), in
        their stored order; a header leaves it out when there are none.
    """

    model_type: str
    weights_sha256: str
    preprocessing: dict
    intensity: str
    embedding_dtype: str = "float16"
    compute_precision: str = "fp32"
    encoder_backend: str = "torch"
    weights_source: str = ""
    samcache_version: str = __version__
    tail_blocks: int = 0
    views: tuple[str, ...] = ()

    # These must agree for two sets of embeddings to be one dataset.
    COMPARED = ("model_type", "weights_sha256", "preprocessing", "intensity", "embedding_dtype", "tail_blocks",
                "views")

    @property
    def family(self) -> ModelFamily:
        """The model family of `model_type` (families.py)."""
        return family_of(self.model_type)

    @property
    def layout(self) -> CacheLayout:
        """What a shard stores per image, and the schema version."""
        return self.family.layout_of(self.model_type, self.tail_blocks, len(self.views))

    @property
    def made_by(self) -> str:
        """How the embeddings were computed, in words: "bf16 by openvino" (the index's made_by column)."""
        return f"{self.compute_precision} by {self.encoder_backend}"

    def mismatch(self, other: "Provenance") -> Optional[str]:
        for key in self.COMPARED:
            if getattr(self, key) != getattr(other, key):
                return f"{key} is {getattr(self, key)!r} in the cache, {getattr(other, key)!r} now"
        return None


@dataclass(kw_only=True)
class ImageEntry:
    """One image as a shard holds it: the dataset's `ImageRecord` fields, in its order, then what
    the cache adds. Objects are the dataset's own `ObjectRecord`s.

    Arguments:
      image_id: the dataset's id of the image.
      name: the dataset's key for the image (its path relative to the image root).
      file: the source file and its content identity (SHA-256, size, mtime).
      original_size: (H, W) of the decoded image.
      split: from the dataset.
      objects: the image's objects.
      input_size: (h, w) after the encoder's resize, before padding.
      annotations_sha256: a hash of the objects, to notice edited annotations.
      preview_jpeg: a small JPEG of the image (longest side PREVIEW_SIZE) for reports, so
        evaluation never needs the original files.
    """

    image_id: int
    name: str
    file: FileIdentity
    original_size: tuple[int, int]
    split: str
    objects: list[ObjectRecord]
    input_size: tuple[int, int]
    annotations_sha256: str
    preview_jpeg: bytes = b""


@dataclass
class FailedEntry:
    """An image that could not be embedded, with the reason."""

    name: str
    file: FileIdentity
    error: str


# ----------------------------------------------------------------------------------- writing
def open_for_writing(cache_dir: Path, provenance: Provenance) -> None:
    """Creates the cache folder and header, or checks an existing header matches `provenance`."""
    cache_dir = Path(cache_dir)
    header_path = cache_dir / HEADER_NAME
    if cache_dir.exists() and not cache_dir.is_dir():
        raise CacheError(f"{cache_dir} exists and is not a cache folder")
    if header_path.exists():
        existing = read_header(cache_dir)
        reason = existing.mismatch(provenance)
        if reason:
            raise CacheError(
                f"refusing to add to {cache_dir}: it was made with other settings ({reason}). "
                "Embeddings from different models or weights cannot be mixed; use another --out"
            )
        return
    if cache_dir.exists() and any(not p.name.startswith(".samcache") for p in cache_dir.iterdir()):
        raise CacheError(f"{cache_dir} is a non-empty folder without {HEADER_NAME}: not a samcache cache")
    (cache_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(header_path, {"schema_version": provenance.layout.schema_version,
                                    "provenance": provenance_to_dict(provenance)})


def provenance_to_dict(provenance: Provenance) -> dict:
    """The header's form: `tail_blocks` only when the cache holds tail tokens, so a cache without
    them has the header every earlier samcache reads."""
    values = asdict(provenance)
    for optional in ("tail_blocks", "views"):
        if not values[optional]:
            del values[optional]
    return values


DATASET_NAME = "dataset.json"
DAMAGED_REMOVAL = "damaged"
"""How the reason of a removal record that `verify` wrote starts: such an image is never restored."""


def read_followed_dataset(cache_dir: str | Path) -> Optional[dict]:
    """{"path", "format", "switched_from": [earlier paths]}: the dataset whose images the cache
    holds (embed follows it: images it drops leave the cache's view); None for a cache made before
    caches recorded it, or a new one."""
    try:
        record = json.loads((Path(cache_dir) / DATASET_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{Path(cache_dir) / DATASET_NAME} is unreadable: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        raise CacheError(f"{Path(cache_dir) / DATASET_NAME} is not a samcache dataset record (no path)")
    return record


def write_followed_dataset(cache_dir: str | Path, path: str, dataset_format: str) -> None:
    """Records that the cache follows the dataset at `path` from now on (the one before, if any,
    joins `switched_from`)."""
    before = read_followed_dataset(cache_dir)
    history = list(before.get("switched_from", [])) + [before["path"]] if before else []
    atomic_write_json(Path(cache_dir) / DATASET_NAME,
                      {"path": path, "format": dataset_format, "switched_from": history})


def is_cache(cache_dir: str | Path) -> bool:
    """True when `cache_dir` has a cache header (it may still be empty or being written)."""
    return (Path(cache_dir) / HEADER_NAME).is_file()


def read_header(cache_dir: Path) -> Provenance:
    path = Path(cache_dir) / HEADER_NAME
    try:
        header = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{cache_dir} is not a samcache cache (no {HEADER_NAME})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("provenance"), dict):
        raise CacheError(f"{path} is not a samcache cache header (no provenance mapping)")
    version = header.get("schema_version")
    readable = ", ".join(f"{v} ({k})" for k, v in SCHEMA_VERSIONS.items())
    # "1" is no 1, though both print as 1; and True would pass for 1.
    if type(version) is not int:
        raise CacheError(f"{path}: schema_version is {_json_kind(header, 'schema_version')}, not an integer as "
                         f"samcache writes it (was the file edited?); this samcache reads {readable}")
    if version not in SCHEMA_VERSIONS.values():
        raise CacheError(f"{cache_dir} has cache schema version {version}, this samcache reads {readable}")
    provenance = provenance_from_dict(header["provenance"], source=path)
    if version != provenance.layout.schema_version:
        raise CacheError(f"{path}: schema version {version} with model {provenance.model_type!r}, whose caches are "
                         f"version {provenance.layout.schema_version}: not a header this samcache wrote")
    return provenance


def _json_kind(mapping: dict, key: str) -> str:
    """`mapping[key]` in words, with its JSON type: "the string '1'", "missing"."""
    if key not in mapping:
        return "missing"
    value = mapping[key]
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    kinds = {bool: "boolean", float: "number", list: "list", dict: "mapping"}
    return f"the {kinds.get(type(value), type(value).__name__)} {json.dumps(value)[:40]}"


def provenance_from_dict(values: dict, *, source: Path) -> Provenance:
    """A Provenance from its JSON form; a missing or unknown key is a message naming `source`."""
    known = {f.name for f in fields(Provenance)}
    required = {f.name for f in fields(Provenance) if f.default is MISSING}
    missing, unknown = sorted(required - set(values)), sorted(set(values) - known)
    if missing or unknown:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else [])
        raise CacheError(f"{source}: the provenance has {'; '.join(problems)}: not a header this samcache wrote")
    views = values.get("views", [])
    if not isinstance(views, list) or not all(isinstance(v, str) for v in views):
        raise CacheError(f"{source}: views is {_json_kind(values, 'views')}, not a list of view names: not a header "
                         "this samcache wrote")
    provenance = Provenance(**{**values, "views": tuple(views)})
    tail_blocks = values.get("tail_blocks", 0)
    if type(tail_blocks) is not int or not 0 <= tail_blocks <= provenance.family.tail_shape(provenance.model_type)[0]:
        raise CacheError(f"{source}: tail_blocks is {_json_kind(values, 'tail_blocks')}, not a block count of "
                         f"{provenance.model_type}'s encoder: not a header this samcache wrote")
    return provenance


def write_strings(group: h5py.Group, name: str, values: list[str]) -> None:
    group.create_dataset(name, data=np.array(values, dtype=object), dtype=_STR)


# Shards written before names had a random part match too; `x (copy).h5` and the like do not.
SHARD_NAME = re.compile(r"g\d{5}-r\d{4}-s\d{6}(-[0-9a-f]{8})?\.h5")


def shard_paths(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (Path(cache_dir) / SHARD_DIR).glob("g*.h5") if SHARD_NAME.fullmatch(p.name))


# ----------------------------------------------------------------------------------- reading
@dataclass(kw_only=True)
class ImageInfo(ImageEntry):
    """What the cache knows of one image, as written, plus its index in the cache (sorted by name).
    The embedding and the preview are read on demand (`embedding`, `preview`)."""

    index: int = -1


def text(value: bytes) -> str:
    return value.decode("utf-8")
