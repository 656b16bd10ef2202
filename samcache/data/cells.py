"""A synthetic "cells under a fluorescence microscope" dataset in COCO instance layout.

`generate_cells(out_dir, n, seed)` draws `n` 16-bit single-channel images (512..768 px a side)
of 8-30 nuclei each and writes:

    out_dir/images/cell_00000.png ...           uint16 gray PNG
    out_dir/train.json, val.json, test.json     COCO instances, one category ("cell"), RLE masks

It is the domain the stamps set is not: nothing like a natural photograph or a scanned page, and
where a model pretrained on everyday shapes is weak. What is drawn, and why:

- a dim, uneven background: a smooth illumination gradient times vignetting, faint blotches, a
  camera offset, Poisson (shot) and Gaussian (read) noise. The whole image uses a small part of
  the 16-bit range (about 5-20%), as real microscopy does, so readers must stretch it
  (`images.read_image`'s per-image percentiles do);
- nuclei only slightly brighter than the background (8-30% of its level): irregular blobs (an
  ellipse whose radius is perturbed by low-frequency noise) with internal texture (a brighter
  rim, a dome, granular chromatin, a few nucleoli); some out of focus (their own Gaussian blur);
- most nuclei in clusters, touching or slightly overlapping: a later nucleus lies on top, and the
  mask of a covered nucleus is its visible part, so masks of different objects never overlap
  and every mask is one connected region;
- a few debris specks, bright or dark, on the background, which are not objects.

Every mask is rasterised from the same polygon that shapes the nucleus' intensities, and the
intensities of a nucleus are drawn only where its mask is (before optics blur and noise), so
the masks are exact.

Image k depends only on (seed, k): its generator is seeded with both, so generating more images
never changes earlier ones, and the same (n, seed) gives byte-identical files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from samcache.data.synthetic import write_synthetic_set

CELLS_KIND = "cells dataset"
_DESCRIPTION = "samcache synthetic cells"

CATEGORIES = ({"id": 1, "name": "cell", "supercategory": "cell"},)
CELL = 1

# A nucleus placed against another keeps at least this share of its own area visible, and
# covers at most this share of its own area of others: touching clusters, not stacks.
_MIN_VISIBLE = 0.7
_MAX_COVERING = 0.2
_OUTLINE_POINTS = 96


# --------------------------------------------------------------------------- public API


@dataclass
class CellImage:
    """One rendered image: its uint16 pixels, their PNG bytes, and one mask per nucleus."""

    image: np.ndarray  # (H, W) uint16, exactly what the PNG holds
    png: bytes
    masks: list[np.ndarray] = field(default_factory=list)  # (H, W) bool, visible parts, disjoint

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def generate_cells(
    out_dir: Path,
    n_images: int,
    seed: int = 0,
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Writes `n_images` synthetic microscopy images and their COCO train/val/test JSONs under `out_dir`.

    Images are assigned to splits by index as `generate_stamps` assigns pages (see
    `synthetic.split_counts`). Image ids are image index + 1; annotation ids count from 1 across
    all three files.

    Returns {"images", "objects", "splits": {split: {"images", "objects"}}, "out"}. `out_dir` is
    new, empty, or samcache's earlier cells dataset, which only `overwrite` replaces (its files
    removed first: see outputs.py). More than `synthetic.MAX_IMAGES` images is a ConfigError;
    images are written one at a time, and memory does not grow with `n_images`.
    """
    def render(index: int) -> tuple:
        rendered = render_image(seed, index)
        return (f"cell_{index:05d}.png", rendered.png, rendered.height, rendered.width, rendered.masks,
                [CELL] * len(rendered.masks))

    return write_synthetic_set(out_dir, n_images, seed, kind=CELLS_KIND, description=_DESCRIPTION,
                               categories=CATEGORIES, unit="image", render=render, fractions=fractions,
                               progress=progress, overwrite=overwrite)


def render_image(seed: int, index: int) -> CellImage:
    """Renders image `index` of the dataset with `seed`; the same pair always gives the same image."""
    rng = np.random.default_rng([seed, index])
    height, width = int(rng.integers(512, 769)), int(rng.integers(512, 769))
    labels, cells = _place_cells(rng, height, width)
    level = _u(rng, 3500, 10000)  # the background's level, in camera units
    signal = np.zeros((height, width), np.float32)
    for number, cell in enumerate(cells, start=1):
        _draw_cell(rng, signal, labels, number, cell, level)
    _draw_debris(rng, signal, labels, level)
    image = _camera(rng, signal, level)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("cv2 could not PNG-encode an image")
    masks = [labels == number for number in range(1, len(cells) + 1)]
    return CellImage(image, buf.tobytes(), masks)


# --------------------------------------------------------------------------- small helpers


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Zero-mean, unit-ish noise that varies over about `cell` pixels."""
    h, w = shape
    coarse = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Cell:
    """A nucleus' full footprint (before anything covers it), in its box of the image."""

    box: tuple[int, int, int, int]  # y0, y1, x0, x1; a zero border of at least one pixel around it
    footprint: np.ndarray  # bool, the box's shape
    center: tuple[float, float]  # x, y
    radius: float  # mean radius, for placing neighbours

    @property
    def slices(self) -> tuple[slice, slice]:
        y0, y1, x0, x1 = self.box
        return slice(y0, y1), slice(x0, x1)


def _outline(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A blobby outline around (0, 0): an ellipse with low-frequency radial noise, (N, 2) x, y."""
    phi = np.linspace(0, 2 * math.pi, _OUTLINE_POINTS, endpoint=False)
    elongation = _u(rng, 1.0, 1.6)
    a, b = radius * math.sqrt(elongation), radius / math.sqrt(elongation)
    turn = _u(rng, 0, math.pi)
    ellipse = a * b / np.sqrt((b * np.cos(phi - turn)) ** 2 + (a * np.sin(phi - turn)) ** 2)
    wobble = np.zeros_like(phi)
    for k in range(2, 7):  # low frequencies only: lobes and dents, no spikes
        wobble += _u(rng, 0.0, 0.16 / k) * np.cos(k * phi + _u(rng, 0, 2 * math.pi))
    r = ellipse * np.clip(1.0 + wobble, 0.6, None)
    return np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)


def _rasterise(outline: np.ndarray, center: tuple[float, float], shape: tuple[int, int]) -> _Cell | None:
    """The outline at `center` filled, in its box; None when it would not lie wholly inside the image."""
    pts = outline + np.asarray(center)
    x0, y0 = (int(math.floor(v)) - 1 for v in pts.min(axis=0))
    x1, y1 = (int(math.ceil(v)) + 2 for v in pts.max(axis=0))
    if x0 < 0 or y0 < 0 or x1 > shape[1] or y1 > shape[0]:
        return None
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    # Fixed point (shift=4) keeps the outline sub-pixel exact.
    fixed = np.round((pts - (x0, y0)) * 16).astype(np.int32)
    cv2.fillPoly(canvas, [fixed], 1, cv2.LINE_8, 4)
    radius = float(np.hypot(outline[:, 0], outline[:, 1]).mean())
    return _Cell((y0, y1, x0, x1), canvas > 0, (float(center[0]), float(center[1])), radius)


def _place_cells(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[_Cell]]:
    """Places 8-30 nuclei, most against another; returns the label image (0: background) and the cells.

    A later nucleus lies on top: it takes the pixels it covers, and is refused when it would
    leave a covered one less than _MIN_VISIBLE of its area, or cut it in two.
    """
    target = int(rng.integers(8, 31))
    mean_radius = _u(rng, 13, 24)
    attach = _u(rng, 0.65, 0.85)  # how clustered this image is
    labels = np.zeros((h, w), np.int32)
    cells: list[_Cell] = []
    full_area: list[int] = []
    for _ in range(40 * target):
        if len(cells) == target:
            break
        radius = mean_radius * _u(rng, 0.75, 1.3)
        outline = _outline(rng, radius)
        if cells and rng.random() < attach:
            other = cells[int(rng.integers(len(cells)))]
            angle = _u(rng, 0, 2 * math.pi)
            # Centre distance a bit under the sum of radii: touching, or overlapping a little.
            dist = (other.radius + radius) * _u(rng, 0.78, 1.0)
            center = (other.center[0] + dist * math.cos(angle), other.center[1] + dist * math.sin(angle))
        else:
            center = (_u(rng, 0, w), _u(rng, 0, h))
        cell = _rasterise(outline, center, (h, w))
        if cell is None or not _fits(labels, cell, cells, full_area):
            continue
        labels[cell.slices][cell.footprint] = len(cells) + 1
        cells.append(cell)
        full_area.append(int(cell.footprint.sum()))
    return labels, cells


def _fits(labels: np.ndarray, cell: _Cell, cells: list[_Cell], full_area: list[int]) -> bool:
    """Whether `cell`, laid on top, leaves every nucleus it covers mostly visible and in one piece."""
    under = labels[cell.slices][cell.footprint]
    covered, counts = np.unique(under[under > 0], return_counts=True)
    if counts.sum() > _MAX_COVERING * cell.footprint.sum():
        return False
    if covered.size == 0:
        return True
    boxes = [cell.box] + [cells[number - 1].box for number in covered]
    y0, y1 = min(b[0] for b in boxes), max(b[1] for b in boxes)
    x0, x1 = min(b[2] for b in boxes), max(b[3] for b in boxes)
    trial = labels[y0:y1, x0:x1].copy()
    cy0, cy1, cx0, cx1 = cell.box
    trial[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0][cell.footprint] = -1
    for number in covered:
        visible = (trial == number).astype(np.uint8)
        if visible.sum() < _MIN_VISIBLE * full_area[number - 1]:
            return False
        if cv2.connectedComponents(visible, connectivity=4)[0] != 2:
            return False
    return True


# --------------------------------------------------------------------------- intensities


def _draw_cell(rng: np.random.Generator, signal: np.ndarray, labels: np.ndarray, number: int, cell: _Cell,
               level: float) -> None:
    """Adds the nucleus' intensity above background to `signal`, drawn on its visible part only."""
    fp = cell.footprint.astype(np.uint8)
    dist = cv2.distanceTransform(fp, cv2.DIST_L2, 3)  # the box has a zero border, so the rim is real
    depth = dist / max(float(dist.max()), 1.0)
    body = (0.75 + _u(rng, 0.0, 0.3) * np.sqrt(depth)
            + _u(rng, 0.0, 0.6) * np.exp(-dist / _u(rng, 1.2, 3.0)))  # dome and brighter rim
    grain = cv2.GaussianBlur(rng.standard_normal(fp.shape).astype(np.float32), (0, 0), _u(rng, 0.8, 1.8))
    grain /= max(float(grain.std()), 1e-6)
    body *= 1.0 + _u(rng, 0.05, 0.3) * grain  # granular chromatin
    ys, xs = np.nonzero(dist > 3)
    yy, xx = np.mgrid[0:fp.shape[0], 0:fp.shape[1]].astype(np.float32)
    for _ in range(int(rng.integers(0, 4)) if ys.size else 0):  # nucleoli
        k = int(rng.integers(ys.size))
        sigma = _u(rng, 1.2, 2.5)
        body += _u(rng, 0.2, 0.5) * np.exp(-((yy - ys[k]) ** 2 + (xx - xs[k]) ** 2) / (2 * sigma**2))
    visible = labels[cell.slices] == number
    layer = np.where(visible, np.clip(body, 0.0, None) * level * _u(rng, 0.08, 0.3), 0.0).astype(np.float32)
    y0, y1, x0, x1 = cell.box
    if rng.random() < 0.35:  # out of focus: its light spreads past its outline, its mask does not
        sigma = _u(rng, 1.0, 3.0)
        pad = int(math.ceil(3 * sigma))
        py0, py1 = max(0, y0 - pad), min(signal.shape[0], y1 + pad)
        px0, px1 = max(0, x0 - pad), min(signal.shape[1], x1 + pad)
        canvas = np.zeros((py1 - py0, px1 - px0), np.float32)
        canvas[y0 - py0:y1 - py0, x0 - px0:x1 - px0] = layer
        signal[py0:py1, px0:px1] += cv2.GaussianBlur(canvas, (0, 0), sigma)
    else:
        signal[y0:y1, x0:x1] += layer


def _draw_debris(rng: np.random.Generator, signal: np.ndarray, labels: np.ndarray, level: float) -> None:
    """A few small bright or dark specks on the background, clear of every nucleus: not objects."""
    h, w = signal.shape
    for _ in range(int(rng.integers(2, 9))):
        axes = (_u(rng, 0.8, 3.5), _u(rng, 0.8, 2.0))
        amplitude = level * (_u(rng, 0.15, 0.8) if rng.random() < 0.7 else -_u(rng, 0.1, 0.3))
        angle, blur = _u(rng, 0, 180), _u(rng, 0.5, 1.5)
        for _ in range(20):
            cx, cy = int(rng.integers(8, w - 8)), int(rng.integers(8, h - 8))
            if not labels[cy - 8:cy + 9, cx - 8:cx + 9].any():
                break
        else:
            continue
        canvas = np.zeros((17, 17), np.float32)
        cv2.ellipse(canvas, ((8.0, 8.0), (2 * axes[0], 2 * axes[1]), angle), 1.0, -1, cv2.LINE_AA)
        signal[cy - 8:cy + 9, cx - 8:cx + 9] += cv2.GaussianBlur(canvas, (0, 0), blur) * amplitude


def _camera(rng: np.random.Generator, signal: np.ndarray, level: float) -> np.ndarray:
    """Uneven illumination, optics blur, shot and read noise, offset; returns uint16 (H, W)."""
    h, w = signal.shape
    angle = _u(rng, 0, 2 * math.pi)
    x = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    y = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    ramp = x * math.cos(angle) + y * math.sin(angle)
    cx, cy = _u(rng, -0.15, 0.15), _u(rng, -0.15, 0.15)
    vignette = 1.0 - _u(rng, 0.15, 0.4) * ((x - cx) ** 2 + (y - cy) ** 2) / 0.5
    illumination = (1.0 + _u(rng, 0.1, 0.45) * ramp) * vignette
    background = level * (1.0 + 0.03 * _smooth_noise(rng, (h, w), 64))
    scene = cv2.GaussianBlur(illumination * (background + signal), (0, 0), _u(rng, 0.6, 1.1))
    units_per_electron = _u(rng, 2.0, 6.0)
    electrons = rng.poisson(np.clip(scene, 0, None) / units_per_electron).astype(np.float32)
    image = electrons * units_per_electron + _u(rng, 100, 400)
    image += rng.standard_normal((h, w), dtype=np.float32) * _u(rng, 15, 50)
    return np.clip(np.rint(image), 0, 65535).astype(np.uint16)
