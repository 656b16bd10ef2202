"""Binary masks as COCO run-length encodings (RLE), the compact form samcache stores.

All RLEs here are compressed COCO RLEs with `counts` as an ASCII `str`, so they are
JSON- and HDF5-friendly: {"size": [height, width], "counts": "..."}.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils

Rle = dict


def encode(mask: np.ndarray) -> Rle:
    """Encodes a 2-D boolean (or 0/1) mask as a compressed COCO RLE."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _native(rle: Rle) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode(rle: Rle) -> np.ndarray:
    """Decodes a compressed COCO RLE to a (H, W) bool array (ValueError when it is malformed)."""
    if not rle["counts"]:  # pycocotools would return uninitialised memory as the mask
        raise ValueError("invalid RLE mask: empty counts")
    return mask_utils.decode(_native(rle)).astype(bool)


def coverage(rle: Rle, size: tuple[int, int]) -> np.ndarray:
    """The mask shrunk to `size` (height, width) by area: each cell the fraction of its footprint the
    mask covers, float32 in [0, 1] (cv2.resize's INTER_AREA of the 0/1 mask, within float rounding).

    Computed on the mask's bounding box alone, as two small products with the area weights of
    each axis: cells outside the box are zero. A whole-image INTER_AREA of a float mask costs
    milliseconds a mask; a training step makes one per prompt. A size larger than the mask along
    an axis (no footprint to average over) takes cv2's own resize."""
    height, width = (int(v) for v in rle["size"])
    out_h, out_w = size
    if out_h > height or out_w > width:
        import cv2

        return cv2.resize(decode(rle).astype(np.float32), (out_w, out_h), interpolation=cv2.INTER_AREA)
    out = np.zeros((out_h, out_w), np.float32)
    x, y, w, h = (int(v) for v in mask_utils.toBbox(_native(rle)))
    if w == 0 or h == 0:
        return out
    import torch

    mask = torch.from_numpy(decode(rle)[y : y + h, x : x + w].astype(np.float32))
    rows, row_weights = _area_weights(height, out_h, y, y + h)
    columns, column_weights = _area_weights(width, out_w, x, x + w)
    # torch's products, not numpy's: OpenBLAS's own threads would spin beside the model's
    out[rows, columns] = (torch.from_numpy(row_weights) @ mask @ torch.from_numpy(column_weights).T).numpy()
    return out


def _area_weights(length: int, cells: int, start: int, stop: int) -> tuple[slice, np.ndarray]:
    """Which of `cells` equal cells over `length` pixels the pixels [start, stop) fall in, and each
    one's weight in each such cell: the overlap of pixel and cell over the cell's length."""
    scale = length / cells
    first, last = int(start // scale), min(cells, int(np.ceil(stop / scale)))
    edges = np.arange(first, last + 1, dtype=np.float64) * scale
    pixels = np.arange(start, stop, dtype=np.float64)
    overlap = (np.minimum(pixels[None, :] + 1, edges[1:, None]) - np.maximum(pixels[None, :], edges[:-1, None]))
    return slice(first, last), (np.clip(overlap, 0, None) / scale).astype(np.float32)


def area(rle: Rle) -> int:
    return int(mask_utils.area(_native(rle)))


def bbox_xyxy(rle: Rle) -> tuple[float, float, float, float]:
    """Tight box of the mask in pixel-edge coordinates: (x0, y0, x1, y1), x1 = last column + 1."""
    x, y, w, h = (float(v) for v in mask_utils.toBbox(_native(rle)))
    return (x, y, x + w, y + h)


def from_coco_segmentation(segmentation, height: int, width: int) -> Rle:
    """Converts a COCO `segmentation` field (polygons, uncompressed or compressed RLE) to our RLE.

    Raises ValueError when the field is malformed or its size disagrees with (height, width).
    """
    if isinstance(segmentation, list):
        if not segmentation or not all(
            isinstance(p, Sequence) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation
        ):
            raise ValueError("polygon list must hold polygons of at least 3 (x, y) points")
        polygons = [_polygon_coordinates(p, height, width) for p in segmentation]
        rles = mask_utils.frPyObjects(polygons, height, width)
        merged = mask_utils.merge(rles)
        return {"size": [height, width], "counts": merged["counts"].decode("ascii")}
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError("segmentation is neither a polygon list nor an RLE with 'size' and 'counts'")
    size = segmentation["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        raise ValueError(f"RLE size must be [height, width], got {size!r}")
    if [int(size[0]), int(size[1])] != [height, width]:
        raise ValueError(f"RLE size {list(size)} differs from the image size [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
            raise ValueError(
                f"uncompressed RLE counts must be non-negative integers summing to {height * width}"
            )
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    if not isinstance(counts, (str, bytes)):
        raise ValueError("compressed RLE counts must be a string")
    rle = {"size": [height, width], "counts": counts if isinstance(counts, str) else counts.decode("ascii")}
    _validate_compressed(rle)
    return rle


def _polygon_coordinates(polygon: Sequence, height: int, width: int) -> list[float]:
    """The polygon's coordinates as floats, checked first: pycocotools crashes the process on NaN
    and runs out of memory on huge values (it rasterises every edge)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon):
        raise ValueError("polygon coordinates must be numbers")
    values = np.asarray(polygon, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("polygon coordinates must be finite (found NaN or infinity)")
    side = max(height, width)
    if np.abs(values).max() > 4 * side:  # a point can lie outside the image; this far out is a mistake
        raise ValueError(f"polygon coordinate {values[np.abs(values).argmax()]:g} lies far outside the "
                         f"{width}x{height} image")
    return values.tolist()


def _validate_compressed(rle: Rle) -> None:
    # pycocotools decodes garbage without complaint; a valid RLE's runs cover the image exactly.
    h, w = rle["size"]
    try:
        counts = rle["counts"].encode("ascii")
    except UnicodeEncodeError as exc:
        raise ValueError("compressed RLE counts must be ASCII") from exc
    if any(c < 48 or c > 111 for c in counts):
        raise ValueError("compressed RLE counts hold characters outside the COCO alphabet")
    total = sum(_decode_runs(counts))
    if total != h * w:
        raise ValueError(f"compressed RLE runs cover {total} pixels, the image has {h * w}")


def _decode_runs(counts: bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (LEB128-like, 5 bits a char, deltas)."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("compressed RLE counts end inside a number")
            c = counts[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError("compressed RLE holds a negative run length")
        runs.append(x)
    return runs
