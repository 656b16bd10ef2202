"""Views: the augmentations `samcache embed --views` embeds once per image, besides the original.

A view is defined on the model input that `models.preprocess.resize_image` returns (uint8
(h, w, C), longest side 1024, padded bottom-right to 1024x1024 later) and on the annotations
(masks at original resolution, XYXY boxes in original pixels):

- `hflip`, `vflip`: mirror left-right, top-bottom.
- `rot90`, `rot180`, `rot270`: rotate counter-clockwise by that angle, as `np.rot90(a, k)` with
  k = 1, 2, 3 does (rows first: the top row of a `rot90` view is the image's right column).
  rot90 and rot270 swap h/w and H/W.
- `scaleS`, 0 < S < 1 (`scale0.5`): the input shrunk by S inside the 1024 frame (cv2.INTER_AREA,
  to half-up rounded (h*S, w*S)), so objects look S times smaller to the encoder. The original
  frame (H, W) and the masks stay; only the input size changes, and prompts and targets follow
  because they map original pixels to the input frame by input_size / original_size per axis.

Boxes use samcache's pixel-edge convention (a mask's box is (xmin, ymin, xmax + 1, ymax + 1)),
in which a flip or rotation maps a mask's box exactly onto the box of the moved mask.
The original image is always embedded, so it is no view and has no name here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import cv2
import numpy as np

from samcache.data import masks
from samcache.data.records import ObjectRecord
from samcache.errors import SamcacheError

# Each flip or rotation as the map of a point (x, y), in pixel-edge coordinates, of an (H, W) frame.
_POINT_MAPS = {
    "hflip": lambda x, y, h, w: (w - x, y),
    "vflip": lambda x, y, h, w: (x, h - y),
    "rot90": lambda x, y, h, w: (y, w - x),
    "rot180": lambda x, y, h, w: (w - x, h - y),
    "rot270": lambda x, y, h, w: (h - y, x),
}
_ROTATIONS = {"rot90": 1, "rot180": 2, "rot270": 3}
_SCALE = re.compile(r"scale(\d+(?:\.\d*)?|\.\d+)")
VALID_NAMES = "hflip, vflip, rot90, rot180, rot270, scaleS with 0 < S < 1 (e.g. scale0.5)"


def _scale_of(name: str) -> Optional[float]:
    """S of a `scaleS` name, None for another name; SamcacheError when S is outside (0, 1)."""
    match = _SCALE.fullmatch(name)
    if match is None:
        return None
    scale = float(match.group(1))
    if not 0.0 < scale < 1.0:
        raise SamcacheError(f"view {name!r}: the scale must lie strictly between 0 and 1; valid views: {VALID_NAMES}")
    return scale


def _scaled(length: int, scale: float) -> int:
    return max(1, int(length * scale + 0.5))  # half up, as models.preprocess.input_size rounds


@dataclass(frozen=True, kw_only=True)
class View:
    """One augmentation of an image and its annotations (see the module's docstring).

    Arguments:
      name: `hflip`, `vflip`, `rot90`, `rot180`, `rot270` or `scaleS` (0 < S < 1); a scale's name
        is canonical (`scale.5` becomes `scale0.5`), so equal views have equal names.
    """

    name: str

    def __post_init__(self) -> None:
        scale = _scale_of(self.name)
        if scale is not None:
            object.__setattr__(self, "name", f"scale{scale!r}")
        elif self.name not in _POINT_MAPS:
            hint = " (the original is always embedded)" if self.name.lower() in ("original", "identity") else ""
            raise SamcacheError(f"unknown view {self.name!r}{hint}; valid views: {VALID_NAMES}")

    @property
    def scale(self) -> Optional[float]:
        """S of a scale view; None for a flip or rotation."""
        return _scale_of(self.name)

    @property
    def swaps_axes(self) -> bool:
        """The view turns an (h, w) image into a (w, h) one (rot90, rot270)."""
        return self.name in ("rot90", "rot270")

    def _move(self, array: np.ndarray) -> np.ndarray:
        """A flip or rotation of the first two axes; C-contiguous, a copy."""
        if self.name == "hflip":
            moved = array[:, ::-1]
        elif self.name == "vflip":
            moved = array[::-1]
        else:
            moved = np.rot90(array, _ROTATIONS[self.name], axes=(0, 1))
        return np.ascontiguousarray(moved)

    def input_image(self, resized: np.ndarray) -> np.ndarray:
        """The resized model input (h, w, C) uint8 -> this view's input (C-contiguous, a new array)."""
        if resized.ndim != 3:
            raise ValueError(f"expected an image (h, w, C), got shape {resized.shape}")
        scale = self.scale
        if scale is None:
            return self._move(resized)
        h, w = self.input_size(resized.shape[:2])
        shrunk = cv2.resize(np.ascontiguousarray(resized), (w, h), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(shrunk.reshape(h, w, resized.shape[2]))  # cv2 drops a single channel's axis

    def input_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the original's input -> (h, w) of this view's input."""
        h, w = (int(v) for v in input_size)
        scale = self.scale
        if scale is not None:
            return _scaled(h, scale), _scaled(w, scale)
        return (w, h) if self.swaps_axes else (h, w)

    def original_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the original image -> of this view's annotations (a scale keeps it)."""
        height, width = (int(v) for v in original_size)
        return (width, height) if self.swaps_axes else (height, width)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """An (H, W) mask at original resolution -> this view's (a new C-contiguous array)."""
        if mask.ndim != 2:
            raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
        return mask.copy() if self.scale is not None else self._move(mask)

    def box(self, box, original_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """An XYXY box in original pixel edges of an (H, W) image -> this view's box."""
        x0, y0, x1, y1 = (float(v) for v in box)
        if self.scale is not None:
            return x0, y0, x1, y1
        height, width = (int(v) for v in original_size)
        point = _POINT_MAPS[self.name]
        (ax, ay), (bx, by) = point(x0, y0, height, width), point(x1, y1, height, width)
        return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)

    def objects(self, objects: list[ObjectRecord], original_size: tuple[int, int]) -> list[ObjectRecord]:
        """The image's objects in this view: masks (RLE) and boxes moved, ids and categories kept."""
        if self.scale is not None:
            return list(objects)
        return [replace(o, rle=masks.encode(self.mask(masks.decode(o.rle))), box=self.box(o.box, original_size))
                for o in objects]


def parse_views(text: str | Sequence[str], *, option: str = "--views") -> tuple[View, ...]:
    """Views named in a comma-separated list ("hflip,rot90,scale0.5"), or in a sequence of such
    lists, in the given order; "" or an empty sequence: none.

    Raises SamcacheError, naming `option` and the bad entry, for an unknown name, a scale outside
    (0, 1), an empty entry or a view listed twice.
    """
    parts = [text] if isinstance(text, str) else list(text)
    entries = [entry.strip() for part in parts for entry in str(part).split(",")]
    if entries == [""]:
        return ()
    views: list[View] = []
    for entry in entries:
        if not entry:
            raise SamcacheError(f"{option}: empty view name in {','.join(entries)!r}; valid views: {VALID_NAMES}")
        try:
            view = View(name=entry)
        except SamcacheError as exc:
            raise SamcacheError(f"{option}: {exc}") from None
        if view in views:
            raise SamcacheError(f"{option}: view {entry!r} is listed twice (as {view.name}); "
                                f"valid views: {VALID_NAMES}")
        views.append(view)
    return tuple(views)
