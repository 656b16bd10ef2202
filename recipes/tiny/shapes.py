"""A generic synthetic data set of shapes on textures, for pretraining the tiny model.

`render_shapes(seed, index)` draws one image with 1-6 objects (polygons, ellipses, smooth
random blobs), each filled or outlined, painted over a random background (noise, gradients,
stripes, checkers, blurred clutter, flat colour), then scanned-looking effects (blur, noise,
contrast, some grayscale, some JPEG). It returns the RGB image and one boolean mask per object.

What a mask is: an object's footprint, the region inside its outer edge, like the stamps data
set's masks. An outlined shape (a ring of paint, its inside see-through or faintly tinted)
still owns its inside. Objects are painted bottom to top and a pixel belongs to the topmost
footprint that covers it, so a mask is the object's *visible* part and masks never overlap.
Objects left with too little visible area are dropped from the annotations (their paint stays).

`generate_shapes(out_dir, n, seed)` writes the same images as a COCO data set folder
(`images/`, `train.json`, `val.json`, `test.json`), which `samcache.data.datasets.load_dataset`
reads, so the pretraining data can be inspected, checked and embedded like any data set.

Image `index` of `seed` depends only on that pair: the same pair gives identical arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from samcache.data.synthetic import CocoSplits, split_plan
from samcache.progress import progress_bar

CATEGORIES = (
    {"id": 1, "name": "polygon", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "blob", "supercategory": "shape"},
)
POLYGON, ELLIPSE, BLOB = 1, 2, 3


@dataclass(frozen=True)
class ShapesSettings:
    """How images are drawn.

    Arguments:
      min_side, max_side: the longest image side is drawn uniformly in this range (pixels).
      min_objects, max_objects: objects painted per image (before dropping hidden ones).
      min_visible: an object is annotated only if at least this fraction of its footprint is
        visible and it covers at least `min_pixels` pixels.
      grayscale: probability that the whole image is converted to gray.
      text: probability that the image carries text-like clutter: rows of random letters and
        digits in the background, and with the same probability a few words over the objects
        (not part of any mask), as print crosses what is annotated on a page. 0 (the default)
        draws the images of the first tiny's pretraining unchanged.
    """

    min_side: int = 512
    max_side: int = 1024
    min_objects: int = 1
    max_objects: int = 6
    min_visible: float = 0.3
    min_pixels: int = 100
    grayscale: float = 0.2
    text: float = 0.0

    def __post_init__(self):
        if not 32 <= self.min_side <= self.max_side:
            raise ValueError(f"need 32 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")


@dataclass
class ShapesImage:
    """One rendered image: RGB uint8 (H, W, 3), its objects' visible masks and categories."""

    image: np.ndarray
    masks: list[np.ndarray] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)


def render_shapes(seed: int, index: int, settings: ShapesSettings = ShapesSettings()) -> ShapesImage:
    """Renders image `index` of the data set with `seed`; the same arguments give the same arrays."""
    rng = np.random.default_rng([int(seed), int(index)])
    height, width = _image_size(rng, settings)
    canvas = _texture(rng, height, width)
    # Drawn only when enabled, so text=0 leaves every other draw of the generator as it was.
    if settings.text and rng.random() < settings.text:
        _text(rng, canvas, rows=int(rng.integers(3, 40)))
    labels = np.zeros((height, width), np.int16)
    footprints: list[np.ndarray] = []
    kinds: list[int] = []
    for _ in range(int(rng.integers(settings.min_objects, settings.max_objects + 1))):
        kind, alpha = _shape_alpha(rng, height, width)
        footprint = alpha >= 128
        if not footprint.any():
            continue
        _paint(rng, canvas, alpha)
        footprints.append(footprint)
        kinds.append(kind)
        labels[footprint] = len(footprints)
    if settings.text and rng.random() < settings.text:
        _text(rng, canvas, rows=int(rng.integers(1, 4)))
    image = _finish(rng, canvas, settings)
    out = ShapesImage(image)
    for k, (footprint, kind) in enumerate(zip(footprints, kinds), start=1):
        visible = labels == k
        count = int(visible.sum())
        if count >= settings.min_pixels and count >= settings.min_visible * int(footprint.sum()):
            out.masks.append(visible)
            out.category_ids.append(kind)
    return out


def generate_shapes(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    settings: ShapesSettings = ShapesSettings(),
    progress: bool = True,
) -> dict:
    """Writes `n` shapes images (PNG) and COCO train/val/test JSONs under `out_dir`.

    Splits, image ids and annotation ids follow `generate_stamps`: images by index (first
    train, then val, then test), image id = index + 1, annotation ids from 1 across the files.
    Returns {"images", "objects", "splits": {split: {"images", "objects"}}, "out"}.
    """
    split_of = split_plan(n, seed, fractions)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    coco = CocoSplits(description="samcache synthetic shapes", seed=int(seed), categories=CATEGORIES)
    bar = progress_bar(len(split_of), desc="shapes", unit="image", enabled=progress)
    for index in range(len(split_of)):
        item = render_shapes(seed, index, settings)
        name = f"shapes_{index:05d}.png"
        if not cv2.imwrite(str(out_dir / "images" / name), item.image[..., ::-1]):
            raise OSError(f"could not write {out_dir / 'images' / name}")
        height, width = item.image.shape[:2]
        coco.add_image(split_of[index], image_id=index + 1, file_name=name, width=width, height=height,
                       masks=item.masks, category_ids=item.category_ids)
        bar.update(1)
    bar.close()
    return coco.write(out_dir)


# --------------------------------------------------------------------------- geometry


def _image_size(rng: np.random.Generator, settings: ShapesSettings) -> tuple[int, int]:
    long_side = int(rng.integers(settings.min_side, settings.max_side + 1))
    short_side = int(round(long_side * rng.uniform(0.6, 1.0)))
    return (long_side, short_side) if rng.random() < 0.35 else (short_side, long_side)


def _fx(points: np.ndarray) -> np.ndarray:
    # Fixed point (shift=4) keeps sub-pixel geometry, so small shapes are not snapped to a grid.
    return np.round(points * 16).astype(np.int32)


def _outline(rng: np.random.Generator, kind: int, center: np.ndarray, radius: float) -> np.ndarray:
    """The closed outer contour (M, 2) of a random shape of `kind`, in pixels."""
    angle = rng.uniform(0, 2 * math.pi)
    if kind == ELLIPSE:
        theta = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        a, b = radius, radius * rng.uniform(0.35, 1.0)
        local = np.stack([a * np.cos(theta), b * np.sin(theta)], 1)
    elif kind == POLYGON:
        n = int(rng.integers(3, 10))
        if rng.random() < 0.3:  # rectangles and squares, common in real scenes (and stamps)
            w, h = radius, radius * rng.uniform(0.3, 1.0)
            local = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
        else:
            theta = np.sort(rng.uniform(0, 2 * math.pi, n))
            # Radii below 1 make star-like, non-convex polygons; equal radii make convex ones.
            radii = radius * (rng.uniform(0.45, 1.0, n) if rng.random() < 0.5 else np.ones(n))
            local = np.stack([radii * np.cos(theta), radii * np.sin(theta)], 1)
    else:
        theta = np.linspace(0, 2 * math.pi, 128, endpoint=False)
        r = np.ones_like(theta)
        for k in range(2, 6):  # a few low harmonics: a smooth closed curve that never self-crosses
            r += rng.uniform(0, 0.35 / k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
        local = np.stack([radius * r * np.cos(theta), radius * r * np.sin(theta)], 1) / r.max()
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return local @ rotation.T + center


def _shape_alpha(rng: np.random.Generator, height: int, width: int) -> tuple[int, np.ndarray]:
    """(kind, uint8 coverage of the footprint with anti-aliased edges)."""
    kind = int(rng.choice([POLYGON, ELLIPSE, BLOB]))
    short = min(height, width)
    radius = short * math.exp(rng.uniform(math.log(0.04), math.log(0.3)))
    center = np.array([rng.uniform(0, width), rng.uniform(0, height)])
    alpha = np.zeros((height, width), np.uint8)
    cv2.fillPoly(alpha, [_fx(_outline(rng, kind, center, radius))], 255, cv2.LINE_AA, 4)
    return kind, alpha


# --------------------------------------------------------------------------- appearance


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 1, 3).astype(np.float32)


def _pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (H, W) float pattern in [0, 1]: flat, gradient, stripes, checker or smooth noise."""
    choice = int(rng.integers(5))
    if choice == 0:
        return np.zeros((height, width), np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    if choice == 1:
        return (u - u.min()) / max(float(np.ptp(u)), 1.0)
    period = rng.uniform(6, 80)
    if choice == 2:
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
        return (wave > 0.5).astype(np.float32) if rng.random() < 0.5 else wave
    if choice == 3:
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    cell = rng.uniform(4, 64)
    small = rng.random((int(height / cell) + 2, int(width / cell) + 2)).astype(np.float32)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _clutter(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Blurred random strokes and blobs: a busy background that is not made of objects."""
    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = _colour(rng)
    for _ in range(int(rng.integers(20, 60))):
        colour = tuple(float(c) for c in _colour(rng))
        p = (int(rng.integers(width)), int(rng.integers(height)))
        size = int(rng.integers(3, max(4, min(height, width) // 8)))
        if rng.random() < 0.5:
            q = (int(rng.integers(width)), int(rng.integers(height)))
            cv2.line(canvas, p, q, colour, int(rng.integers(1, 6)), cv2.LINE_AA)
        else:
            cv2.circle(canvas, p, size, colour, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(canvas, (0, 0), rng.uniform(1.5, 8))


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (H, W, 3) float32 texture in [0, 1]: two colours mixed by a pattern, or clutter."""
    if rng.random() < 0.2:
        return _clutter(rng, height, width)
    pattern = _pattern(rng, height, width)[..., None]
    first = _colour(rng)
    # Low-contrast patterns are common in backgrounds; strong ones test the model too.
    second = np.clip(first + rng.normal(0, rng.uniform(0.05, 0.5), 3), 0, 1).astype(np.float32)
    return first * (1 - pattern) + second * pattern


def _paint(rng: np.random.Generator, canvas: np.ndarray, alpha: np.ndarray) -> None:
    """Paints one object (filled or outlined) with coverage `alpha` onto `canvas`, in place."""
    ys, xs = np.nonzero(alpha)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    region = canvas[y0:y1, x0:x1]
    cover = alpha[y0:y1, x0:x1].astype(np.float32) / 255.0
    fill = _texture(rng, y1 - y0, x1 - x0)
    if rng.random() < 0.7:  # filled
        weight = cover * rng.uniform(0.85, 1.0)
    else:  # outlined: a ring inside the footprint's edge, the inside see-through or lightly tinted
        width = max(2, int(round(min(y1 - y0, x1 - x0) * rng.uniform(0.03, 0.12))))
        eroded = cv2.erode(alpha[y0:y1, x0:x1], np.ones((2 * width + 1, 2 * width + 1), np.uint8))
        inner = eroded.astype(np.float32) / 255.0
        weight = (cover - inner) + inner * rng.uniform(0.0, 0.3)
    region += (fill - region) * weight[..., None]


GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.,:-/()"
FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
         cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_COMPLEX_SMALL, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX)


def _text(rng: np.random.Generator, canvas: np.ndarray, *, rows: int) -> None:
    """Paints `rows` runs of random words (one font, size and ink each) onto `canvas`, in place.

    Why: documents, labels and screens are full of print, thin high-contrast strokes that are
    not objects; a model that never saw it takes it for edges of what it is asked to segment.
    """
    height, width = canvas.shape[:2]
    for _ in range(rows):
        font = FONTS[int(rng.integers(len(FONTS)))]
        glyph_px = float(np.exp(rng.uniform(np.log(7), np.log(40))))
        scale = glyph_px / 22.0  # Hershey glyphs are about 22 px high at scale 1
        thickness = max(1, int(round(glyph_px / rng.uniform(8, 16))))
        ink = tuple(float(c) for c in (_colour(rng) * rng.uniform(0.0, 0.6) if rng.random() < 0.7 else _colour(rng)))
        words = [''.join(GLYPHS[int(g)] for g in rng.integers(len(GLYPHS), size=int(rng.integers(1, 10))))
                 for _ in range(int(rng.integers(1, 12)))]
        line = " ".join(words)
        (w, h), baseline = cv2.getTextSize(line, font, scale, thickness)
        # putText draws on uint8 only: the row is drawn as coverage on its own patch, then blended.
        patch = np.zeros((h + baseline + 2 * thickness, w + 2 * thickness), np.uint8)
        cv2.putText(patch, line, (thickness, h + thickness), font, scale, 255, thickness, cv2.LINE_AA)
        x0, y0 = int(rng.integers(-w // 2, width)), int(rng.integers(-h, height))
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + patch.shape[1], width), min(y0 + patch.shape[0], height)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        cover = patch[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0, None].astype(np.float32) / 255.0
        region = canvas[cy0:cy1, cx0:cx1]
        region += (np.asarray(ink, np.float32) - region) * cover


def _finish(rng: np.random.Generator, canvas: np.ndarray, settings: ShapesSettings) -> np.ndarray:
    """Camera-ish effects, then RGB uint8: blur, contrast and brightness, noise, gray, JPEG."""
    image = canvas
    if rng.random() < 0.5:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 1.5))
    image = (image - 0.5) * rng.uniform(0.6, 1.2) + 0.5 + rng.uniform(-0.1, 0.1)
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(0.0, 0.05)
    if rng.random() < settings.grayscale:
        image = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)
    out = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        ok, buf = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(50, 95))])
        if ok:
            out = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    return out
