"""Reading users' image files as the RGB uint8 (H, W, 3) arrays Segment Anything expects.

`read_image` accepts PNG, JPEG, TIFF and BMP (and whatever else OpenCV or Pillow decode:
GIF, WebP, ...) and always returns a writable, C-contiguous (H, W, 3) uint8 array in RGB
order:

- gray is replicated to 3 channels; palette images are expanded to their colours;
- transparency (RGBA, gray+alpha, palettes with a transparent entry) is composited over
  white, the background documents and natural images with transparency are shown on;
- the EXIF orientation (tag 0x0112, all 8 values) is applied, so the array is what a photo
  viewer shows, and `read_image_size` reports that same (height, width) from the header;
- images deeper than 8 bits (uint16, int32, float) are mapped to uint8 by `intensity`:

  ``"percentile"`` (the default)
      per image, the 0.5th..99.5th percentiles -> 0..255, clipped. 16-bit data from
      microscopes, medical scanners and remote sensing rarely fills its range (a camera with
      a 12-bit sensor, a dim stain: values 0..300 out of 65535), so scaling by the full range
      would make it near-black. Per-image percentile normalization is the common practice in
      those fields, and unlike min..max it ignores the few hot or dead pixels most sensors
      have, which would otherwise squash every other value into a few gray levels.
  ``"minmax"``
      per image, min..max -> 0..255. Exact, but one hot pixel sets the whole scale.
  ``"dtype"``
      the dtype's full range -> 0..255 (uint16: v / 65535 * 255; float: 0..1, clipped).
      Keeps absolute intensities comparable across images, for data that fills the range.

  8-bit images are never rescaled, in any mode: they are returned as decoded. When an image
  has no range to stretch (a constant image, or one whose 0.5th and 99.5th percentiles are
  equal), pixels at that level become black (0) and any above it white (255), so a constant
  image is black and a few bright objects on an empty background still show.

Pixels are decoded with OpenCV (fast; 16-bit colour and alpha; unicode paths, as we hand it
the bytes), with Pillow as the fallback for files OpenCV cannot decode and for 8-bit TIFFs
with alpha, which OpenCV mis-reads (see `_pillow_decodes_better`). Every failure -- missing,
empty, truncated, corrupt or unsupported file -- raises `ImageReadError` naming the file.
"""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image, ImageOps

from samcache.errors import ImageReadError

INTENSITY_MODES = ("percentile", "minmax", "dtype")
PERCENTILES = (0.5, 99.5)

ORIENTATION_TAG = 0x0112
_TIFF_WIDTH_TAG, _TIFF_HEIGHT_TAG, _TIFF_BITS_TAG = 256, 257, 258

# EXIF orientation -> how to turn the stored pixels into what a viewer shows. Values 5..8
# swap height and width.
_ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180°
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),  # transposed (mirrored, then rotated 90° counter-clockwise)
    6: lambda a: a.swapaxes(0, 1)[:, ::-1],  # rotated 90° clockwise
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],  # transversed (mirrored, then rotated 90° clockwise)
    8: lambda a: a.swapaxes(0, 1)[::-1],  # rotated 90° counter-clockwise
}

# Pillow modes converted before turning into an array; the rest (L, LA, RGB, RGBA, I;16, I, F)
# map directly to gray / gray+alpha / RGB / RGBA arrays.
_PILLOW_CONVERSIONS = {
    "1": "L",
    "P": "RGBA",  # a palette may hold a transparent entry; an opaque one yields alpha 255
    "PA": "RGBA",
    "La": "LA",  # pre-multiplied alpha -> straight alpha
    "RGBa": "RGBA",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
}


def read_image(path: str | Path, *, intensity: str = "percentile") -> np.ndarray:
    """Reads an image file as a writable C-contiguous (H, W, 3) uint8 RGB array, as viewers show it.

    Gray is replicated to 3 channels, transparency is composited over white, the EXIF
    orientation is applied, and images deeper than 8 bits are mapped to 0..255 by `intensity`
    (one of INTENSITY_MODES; see the module docstring). Raises ImageReadError when the file is
    missing, empty, truncated, corrupt or not an image, ValueError for an unknown `intensity`.
    """
    if intensity not in INTENSITY_MODES:
        allowed = ", ".join(map(repr, INTENSITY_MODES))
        raise ValueError(f"intensity must be one of {allowed}, got {intensity!r}")
    path = Path(path)
    data = _read_bytes(path)
    header = _open_header(path, io.BytesIO(data))
    _check_complete(path, header.format, data)
    orientation = _orientation(header)  # before any Pillow decode: loading a TIFF drops the tag
    pixels, oriented = _decode(path, data, header)
    rgb = _to_rgb(path, pixels, intensity)
    if not oriented:
        rgb = _ORIENTATIONS[orientation](rgb)
    return np.ascontiguousarray(rgb)


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the image as `read_image` returns it (EXIF orientation applied).

    Reads the header only, so it is cheap, but it does not decode the pixels: a truncated or
    corrupt pixel stream goes unnoticed until `read_image`. Raises ImageReadError when the file
    is missing, empty or not an image.
    """
    path = Path(path)
    _check_file(path)
    with _open_header(path, path) as header:
        width, height = _stored_size(header)
        if _orientation(header) >= 5:
            width, height = height, width
        return height, width


# --- files and headers -------------------------------------------------------------------


def _check_file(path: Path) -> None:
    """Turns the common reasons a path is not a readable file into clear messages."""
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a directory, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")


def _read_bytes(path: Path) -> bytes:
    # One read serves the truncation check, the header and the decoder.
    _check_file(path)
    try:
        return path.read_bytes()
    except OSError as error:  # permissions, I/O errors
        raise ImageReadError(f"{path}: cannot read file: {error.strerror or error}") from error


def _open_header(path: Path, source: Path | io.BytesIO) -> Image.Image:
    """Pillow's lazy open: parses the header (format, size, mode, tags), decodes no pixels."""
    try:
        return Image.open(source)
    except Image.UnidentifiedImageError as error:
        raise ImageReadError(f"{path}: not an image file, or an unsupported image format") from error
    except Exception as error:  # Pillow's parsers raise many types on malformed headers
        raise ImageReadError(f"{path}: unreadable image header: {error}") from error


def _stored_size(header: Image.Image) -> tuple[int, int]:
    """(width, height) of the pixels as stored, before orientation."""
    if header.format == "TIFF":
        # Recent Pillow reports a TIFF's size with its orientation already applied; the tags
        # hold the stored size on every version.
        return header.tag_v2[_TIFF_WIDTH_TAG], header.tag_v2[_TIFF_HEIGHT_TAG]
    return header.size


def _orientation(header: Image.Image) -> int:
    """The EXIF orientation (1..8) of a lazily opened image; 1 when absent or invalid."""
    if header.format == "PNG" and "exif" not in header.info:
        # Pillow would decode the whole PNG to look for an eXIf chunk after the pixel data;
        # the PNG spec puts it before them, where the header parse has already found it.
        return 1
    try:
        value = header.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a corrupt EXIF block: viewers show such images unrotated, so do we
        return 1
    return value if value in _ORIENTATIONS else 1


# --- truncation --------------------------------------------------------------------------

# Inside JPEG entropy-coded data a 0xFF byte is followed by 0x00 (stuffing) or a restart marker
# (0xD0..0xD7); anything else (bar 0xFF fill bytes) is the next marker.
_JPEG_NEXT_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


def _check_complete(path: Path, image_format: str | None, data: bytes) -> None:
    """Rejects JPEG and PNG files cut short, which decoders may return partly decoded.

    A cheap walk over markers or chunks, no decoding. Other formats are caught by the decoders.
    """
    is_complete = {"JPEG": _jpeg_is_complete, "MPO": _jpeg_is_complete, "PNG": _png_is_complete}.get(
        image_format or ""
    )
    if is_complete is not None and not is_complete(data):
        raise ImageReadError(
            f"{path}: truncated {image_format} file (it ends before its end-of-image marker; "
            "was it cut off while copying or downloading?)"
        )


def _jpeg_is_complete(data: bytes) -> bool:
    """Whether the JPEG's markers lead to an end-of-image marker (FF D9).

    Walks segment by segment, so an end marker inside an embedded EXIF thumbnail does not
    count, and skips each scan's entropy-coded data. Bytes after the end marker are allowed:
    phones append the video of a "motion photo" there.
    """
    pos = 2  # after the start-of-image marker
    while pos + 1 < len(data):
        if data[pos] != 0xFF:
            return False  # corrupt: the decoder will say more
        marker = data[pos + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length field
            pos += 2
            continue
        if pos + 4 > len(data):
            return False
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next marker
            found = _JPEG_NEXT_MARKER.search(data, pos)
            if found is None:
                return False
            pos = found.start()
    return False


def _png_is_complete(data: bytes) -> bool:
    """Whether the PNG's chunk chain reaches its IEND chunk (length, type, data, CRC each)."""
    pos = 8  # after the signature
    while pos + 12 <= len(data):
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return False


# --- decoding ----------------------------------------------------------------------------


def _decode(path: Path, data: bytes, header: Image.Image) -> tuple[np.ndarray, bool]:
    """The pixels as gray, gray+alpha, RGB or RGBA (any dtype), and whether they are oriented."""
    if not _pillow_decodes_better(header):
        pixels = _decode_with_opencv(data)
        if pixels is not None:
            return pixels, header.format == "TIFF" and _opencv_orients_tiffs()
    # OpenCV cannot decode it, or decodes it wrongly. Pillow rejects truncated data itself
    # (unless someone set PIL.ImageFile.LOAD_TRUNCATED_IMAGES).
    return _decode_with_pillow(path, header), True


def _pillow_decodes_better(header: Image.Image) -> bool:
    """8-bit TIFFs with alpha: OpenCV reads these through libtiff's RGBA interface, which
    pre-multiplies colour by an unassociated alpha (a half-transparent red comes back dark red),
    and it drops the alpha of gray+alpha TIFFs. Deeper ones take another path and are fine."""
    if header.format != "TIFF" or header.mode not in ("RGBA", "RGBa", "LA", "La"):
        return False
    bits = header.tag_v2.get(_TIFF_BITS_TAG, (8,))
    return max(bits if isinstance(bits, tuple) else (bits,)) <= 8


def _decode_with_opencv(data: bytes) -> np.ndarray | None:
    """OpenCV's decode, with BGR(A) turned into RGB(A); None when OpenCV cannot decode it."""
    try:
        # IMREAD_UNCHANGED keeps 16-bit depth and alpha (and ignores EXIF orientation, which
        # we apply ourselves, except in TIFFs: see `_opencv_orients_tiffs`).
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    if pixels is None or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        return pixels
    if pixels.dtype in (np.uint8, np.uint16, np.float32):  # the depths cvtColor takes; fastest
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB if pixels.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    return np.take(pixels, (2, 1, 0, 3)[: pixels.shape[2]], axis=2)


def _decode_with_pillow(path: Path, header: Image.Image) -> np.ndarray:
    # The header was opened on the file's bytes, not its path: Pillow's memory-mapped path
    # mis-shapes uncompressed gray TIFFs with orientations 5..8.
    try:
        header.load()
        # Pillow applies (and removes) a TIFF's orientation while loading; this applies any
        # orientation it left, e.g. a JPEG's.
        ImageOps.exif_transpose(header, in_place=True)
        mode = _PILLOW_CONVERSIONS.get(header.mode)
        return np.array(header.convert(mode) if mode else header)  # asarray would be read-only
    except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, ... on bad data
        raise ImageReadError(f"{path}: cannot decode {header.format} image: {error}") from error


@functools.cache
def _opencv_orients_tiffs() -> bool:
    """Whether OpenCV's TIFF decoder applies the orientation tag itself, IMREAD_UNCHANGED or not.

    OpenCV's does (unlike its JPEG decoder), so applying the tag again would rotate twice. Asked
    once with a 2x1 TIFF tagged "rotate 90° clockwise" rather than assumed, so an OpenCV that
    changes this cannot silently turn images.
    """
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    buffer = io.BytesIO()
    Image.new("L", (2, 1)).save(buffer, format="TIFF", exif=exif)
    decoded = cv2.imdecode(np.frombuffer(buffer.getvalue(), np.uint8), cv2.IMREAD_UNCHANGED)
    return decoded is not None and decoded.shape[:2] == (2, 1)


# --- channels and intensities ------------------------------------------------------------


def _to_rgb(path: Path, pixels: np.ndarray, intensity: str) -> np.ndarray:
    """Gray / gray+alpha / RGB / RGBA of any dtype -> (H, W, 3) uint8 RGB."""
    channels = {2: 1, 3: pixels.shape[-1]}.get(pixels.ndim, 0)
    if channels not in (1, 2, 3, 4):
        raise ImageReadError(f"{path}: unsupported layout {pixels.shape} (expected gray, RGB or RGBA)")
    pixels = pixels.reshape(*pixels.shape[:2], channels)
    has_alpha = channels in (2, 4)
    color = _to_uint8(pixels[..., : channels - 1] if has_alpha else pixels, intensity)
    if has_alpha:
        color = _over_white(color, pixels[..., -1])
    return np.repeat(color, 3, axis=2) if color.shape[2] == 1 else color


def _to_uint8(values: np.ndarray, intensity: str) -> np.ndarray:
    """Maps pixel values to 0..255 by `intensity`; 8-bit values are returned untouched.

    Colour channels share one range, so colours keep their balance.
    """
    if values.dtype == np.uint8:
        return values
    low, high = _dtype_range(values.dtype) if intensity == "dtype" else _data_range(values, intensity)
    if high <= low:
        # Nothing to stretch: the level goes black, anything brighter (outliers) white.
        return np.where(values > low, 255, 0).astype(np.uint8)
    scaled = _rescale(values, low, high)
    scaled *= 255
    return np.rint(scaled, out=scaled).astype(np.uint8)


def _dtype_range(dtype: np.dtype) -> tuple[float, float]:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0  # floating-point images are 0..1 by convention


def _data_range(values: np.ndarray, intensity: str) -> tuple[float, float]:
    """This image's own range: min..max, or the PERCENTILES (robust to hot pixels)."""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    if finite.size == 0:
        return 0.0, 0.0
    if intensity == "minmax":
        return float(finite.min()), float(finite.max())
    low, high = np.percentile(finite, PERCENTILES)
    return float(low), float(high)


def _rescale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """low..high -> 0..1 as float32, clipped; NaN -> 0."""
    scaled = values.astype(np.float32)  # a copy, then in place: these arrays can be large
    scaled -= np.float32(low)
    scaled *= np.float32(1.0 / (high - low))
    if values.dtype.kind == "f":
        np.nan_to_num(scaled, copy=False, nan=0.0)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def _over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composites uint8 colour with straight (not pre-multiplied) alpha over a white background.

    Alpha is a coverage, not an intensity: it is always scaled by its dtype's range.
    """
    opacity = _rescale(alpha, *_dtype_range(alpha.dtype))[..., None]
    return np.rint(color * opacity + 255.0 * (1.0 - opacity)).astype(np.uint8)
