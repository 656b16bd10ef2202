"""What `samcache serve` works with, and every check a request meets before it touches a model.

A session opens the cache, the run (optional) and their decoders once, at start; a request names
an image of the cache by its name, never a path, and a mask is decoded from the cached embedding
(one decoder pass: the image encoder never runs while serving). Masks are decoded exactly as
`samcache predict` decodes them (deploy/predict.py `image_prompts` and `predict_masks`, fp32), so
the two agree pixel for pixel for the same prompt.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch

from samcache.cache.format import text
from samcache.cache.reader import EmbeddingCache
from samcache.config import MAX_POINTS, EvalConfig
from samcache.data import masks
from samcache.deploy.predict import image_prompts
from samcache.devices import resolve_device
from samcache.errors import SamcacheError
from samcache.evaluate.evaluator import load_decoders
from samcache.models.specs import LOW_RES_SIZE
from samcache.serve.corrections import Annotations
from samcache.train.inference import predict_masks
from samcache.train.runs import RunFolder

MODELS = ("zero_shot", "fine_tuned")
KEPT_STATES = 256
"""Predictions whose low-res logits the session keeps for a further click (256 KiB each)."""


class RequestError(SamcacheError):
    """A request the session refuses; `status` is its HTTP status (400: malformed, 404: unknown image)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ServeSession:
    """The cache, the run and their decoders, opened once for every request.

    Arguments:
      cache_dir: the cache whose images are served.
      run_dir: a run trained on it, whose decoder is the "fine_tuned" model (optional).
      dataset: the COCO dataset corrections are saved into (default: the one the cache follows).
      device: where the decoders run ("auto", "cpu", "cuda").
    """

    def __init__(self, cache_dir: str | Path, run_dir: Optional[str | Path] = None, *,
                 dataset: Optional[str | Path] = None, device: str = "cpu"):
        self.cache = EmbeddingCache(cache_dir)
        self._dataset, self._annotations = dataset, None
        self.run = RunFolder(run_dir) if run_dir is not None else None
        self.device = resolve_device(device)
        self.decoders = load_decoders(self.cache, self.run, EvalConfig(), self.device)
        self.family = self.cache.provenance.family
        self._lock = threading.Lock()  # one h5py handle and one decoder: requests take turns
        self._states: OrderedDict[str, tuple] = OrderedDict()  # token -> (image, model, low-res logits)

    def images(self) -> list[dict]:
        """Every image of the cache: name, split, width, height, number of objects, categories, and
        `scores` ({model: mean IoU of its objects}) from the run's latest eval of its split, if any."""
        evals = self.run.eval_summaries() if self.run is not None else {}
        out = []
        cache = self.cache
        for index in range(len(cache)):  # from the cache's columns: no shard is read to list the images
            name, split = cache.name_of(index), text(cache.split_column[index])
            (height, width), _ = cache.sizes_of(index)
            scores = evals.get(split, {}).get("per_image", {}).get(name)
            out.append({"name": name, "split": split, "width": width, "height": height,
                        "objects": int(cache.object_count[index]), "categories": cache.categories_of(index),
                        "scores": scores or {}})
        return out

    def predict(self, request: Any) -> dict:
        """A mask for a prompt on a cached image.

        Arguments:
          request: {"image": NAME, "model": "zero_shot" | "fine_tuned", "box": [x0, y0, x1, y1]
            (optional), "points": [[x, y, label], ...] (optional), "previous": the "state" of the
            prediction before this click (optional: its mask is fed back as SamPredictor's
            mask_input)}, in the image's original pixels; a box, points, or both.
        Returns {"image", "model", "segmentation" (COCO RLE at the original resolution), "score"
        (the predicted IoU), "area", "state"}.
        """
        if not isinstance(request, dict):
            raise RequestError("the request body must be a JSON object")
        unknown = sorted(set(request) - {"image", "model", "box", "points", "previous"})
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(unknown)}: a prediction takes image, model, box, points, "
                               "previous")
        index = self._image_index(request.get("image"))
        model = request.get("model", "zero_shot")
        if model not in self.decoders:
            known = ", ".join(self.decoders)
            why = " (the server was started without --run)" if model == "fine_tuned" else ""
            raise RequestError(f"model {model!r} is not served{why}; served: {known}")
        (height, width), frame = self.cache.sizes_of(index)
        box = _box(request.get("box"), width, height)
        points = _points(request.get("points"), width, height)
        if box is None and not points:
            raise RequestError("give a box, points, or both")
        name = self.cache.name_of(index)
        prompts = image_prompts((height, width), frame, boxes=[box] if box else [], points=points)
        previous = request.get("previous")
        with self._lock:
            if previous is not None:  # the mask before this click, fed back as SamPredictor's mask_input
                prompts = dataclasses.replace(prompts, masks=self._previous_logits(previous, name, model)[None])
            decoder = self.decoders[model]  # a run that trained the encoder's tail reads the tail tokens
            features = torch.from_numpy(self.cache.features(index, decoder.reads)).float()[None].to(self.device)
            (prediction,) = predict_masks(decoder, features, prompts.to(self.device),
                                          [(frame, (height, width))])
            state = self._remember(name, model, prediction.low_res_logits)
        return {"image": name, "model": model, "segmentation": masks.encode(prediction.mask),
                "score": prediction.score, "area": int(prediction.mask.sum()), "state": state}

    def _remember(self, image: str, model: str, logits: torch.Tensor) -> str:
        """Keeps a prediction's low-res logits for a further click on the same object; returns its token."""
        token = secrets.token_hex(8)
        self._states[token] = (image, model, logits.reshape(LOW_RES_SIZE, LOW_RES_SIZE).cpu())
        while len(self._states) > KEPT_STATES:
            self._states.popitem(last=False)
        return token

    def _previous_logits(self, token: Any, image: str, model: str) -> torch.Tensor:
        kept = self._states.get(token) if isinstance(token, str) else None
        if kept is None:
            raise RequestError("previous must be the state of a recent prediction (a prediction's \"state\"); "
                               "this one is unknown or expired: predict again without it")
        if kept[:2] != (image, model):
            raise RequestError(f"previous is a prediction for {kept[0]!r} by {kept[1]}, not {image!r} by {model}")
        return kept[2]

    @property
    def dataset(self) -> Optional[Path]:
        """The dataset corrections go into when it was given (--dataset); None: the one the cache follows."""
        return Path(self._dataset) if self._dataset is not None else None

    def use_run(self, run_dir: str | Path) -> None:
        """Serves `run_dir`'s decoder as "fine_tuned" from now on, over the cache reopened (a fine-tune
        refreshed it first): built outside the lock, swapped in under it, the old cache closed."""
        cache = EmbeddingCache(self.cache.cache_dir)
        run = RunFolder(run_dir)
        decoders = load_decoders(cache, run, EvalConfig(), self.device)
        with self._lock:
            old, self.cache, self.run, self.decoders = self.cache, cache, run, decoders
            self._states.clear()  # logits of the old decoders do not prompt the new ones
        old.close()

    def preview(self, image: Any) -> bytes:
        """The image's preview JPEG as the cache holds it (longest side PREVIEW_SIZE)."""
        index = self._image_index(image)
        with self._lock:  # the cache's h5py handles are shared with the decoder passes
            return self.cache.preview_bytes(index)

    def annotations(self) -> Annotations:
        """The dataset's annotations, opened at the first correction (a cache whose dataset is not
        COCO still serves masks)."""
        if self._annotations is None:
            try:
                self._annotations = Annotations.of_cache(self.cache.cache_dir, self._dataset)
            except SamcacheError as exc:
                raise RequestError(f"corrections cannot be saved: {exc}", status=409) from None
        return self._annotations

    def objects(self, image: Any) -> dict:
        """{"image", "version", "width", "height", "objects"}: the image's objects in the dataset now."""
        index = self._image_index(image)
        return self.annotations().load(self.cache.name_of(index)).to_json()

    def edit(self, request: Any, object_id: Optional[int] = None, *, delete: bool = False) -> dict:
        """Saves one correction into the dataset: a new object (no `object_id`), a replaced mask and/or
        category, or a deletion. `request`: {"image", "version" (from `objects`), "segmentation"
        (COCO RLE, as /api/predict answers), "category"}. Returns {"version", "object_id"}."""
        if not isinstance(request, dict):
            raise RequestError("the request body must be a JSON object")
        unknown = sorted(set(request) - {"image", "version", "segmentation", "category"})
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(unknown)}: an edit takes image, version, segmentation, "
                               "category")
        name = self.cache.name_of(self._image_index(request.get("image")))
        annotations, version = self.annotations(), request.get("version")
        segmentation, category = request.get("segmentation"), request.get("category")
        if delete:
            return annotations.delete_object(name, object_id, version=version).to_json()
        if object_id is None:
            if segmentation is None or category is None:
                raise RequestError("a new object needs a segmentation and a category")
            return annotations.add_object(name, segmentation, category, version=version).to_json()
        if segmentation is None and category is None:
            raise RequestError("give a segmentation, a category, or both")
        saved = None
        if segmentation is not None:
            saved = annotations.replace_object(name, object_id, segmentation, version=version)
            version = saved.version
        if category is not None:
            saved = annotations.set_category(name, object_id, category, version=version)
        return saved.to_json()

    def _image_index(self, name: Any) -> int:
        if not isinstance(name, str) or not name:
            raise RequestError("image must be the name of an image of the cache (GET /api/images lists them)")
        index = self.cache.index_of(name)
        if index is None:
            raise RequestError(f"no image {name!r} in the cache (GET /api/images lists them); images are named, "
                               "never given by path", status=404)
        return index


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _box(value: Any, width: int, height: int) -> Optional[tuple[float, float, float, float]]:
    """The box, checked: four finite numbers, x1 > x0 and y1 > y0, inside the image."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 4:
        raise RequestError(f"box must be [x0, y0, x1, y1] in image pixels, got {value!r}")
    x0, y0, x1, y1 = (_number(v, "a box coordinate") for v in value)
    if x1 <= x0 or y1 <= y0:
        raise RequestError(f"box {value}: x1 must exceed x0 and y1 must exceed y0")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise RequestError(f"box {value} reaches outside the {width}x{height} image")
    return (x0, y0, x1, y1)


def _points(value: Any, width: int, height: int) -> list[tuple[float, float, int]]:
    """The points, checked: [x, y, label] with label 1 (on the object) or 0 (not), inside the image."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_POINTS:
        raise RequestError(f"points must be a list of at most {MAX_POINTS} [x, y, label], got {value!r}")
    points = []
    for point in value:
        if not isinstance(point, list) or len(point) != 3 or point[2] not in (0, 1) or isinstance(point[2], bool):
            raise RequestError(f"a point is [x, y, label] with label 1 (object) or 0 (background), got {point!r}")
        x, y = _number(point[0], "a point's x"), _number(point[1], "a point's y")
        if not (0 <= x < width and 0 <= y < height):
            raise RequestError(f"point {point} lies outside the {width}x{height} image")
        points.append((x, y, int(point[2])))
    return points
