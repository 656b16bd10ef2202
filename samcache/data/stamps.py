"""A synthetic "stamps on scanned documents" dataset in COCO instance layout.

`generate_stamps(out_dir, n, seed)` draws `n` document pages (letterhead, paragraphs, tables,
signatures) with 1-4 rubber stamps each (round, oval, rectangular; red, blue or violet ink),
adds scan effects and writes:

    out_dir/images/page_00000.jpg ...
    out_dir/train.json, val.json, test.json     COCO instances, masks as compressed RLE

Every object's mask is the stamp's full filled footprint (the region inside its outer border),
rasterised from the same geometry and the same rotation as the ink, so the masks are exact.

Page k depends only on (seed, k): its generator is seeded with both, so generating more pages
never changes earlier ones, and the same (n, seed) gives byte-identical files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from samcache.data.synthetic import write_synthetic_set
from samcache.fileio import read_json_mapping

STAMPS_KIND = "stamps dataset"
_DESCRIPTION = "samcache synthetic stamps"

CATEGORIES = (
    {"id": 1, "name": "round_stamp", "supercategory": "stamp"},
    {"id": 2, "name": "oval_stamp", "supercategory": "stamp"},
    {"id": 3, "name": "rect_stamp", "supercategory": "stamp"},
)
ROUND, OVAL, RECT = 1, 2, 3

# Multiply-blend colours of stamp inks, BGR in [0, 1] (cv2 works in BGR).
_INKS = ((0.24, 0.16, 0.82), (0.80, 0.36, 0.14), (0.78, 0.20, 0.52))  # red, blue, violet
_PEN_INKS = ((150, 50, 25), (120, 45, 40), (40, 35, 35))  # signature pens, BGR uint8

_BODY_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_DUPLEX,
               cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_COMPLEX_SMALL)
_STAMP_FONTS = (cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_COMPLEX,
                cv2.FONT_HERSHEY_TRIPLEX)

_WORDS = (
    "the", "of", "and", "to", "in", "for", "on", "with", "by", "as", "at", "from", "this", "that",
    "is", "be", "are", "under", "within", "pursuant", "agreement", "contract", "party", "parties",
    "payment", "delivery", "goods", "services", "invoice", "amount", "total", "date", "period",
    "terms", "conditions", "hereby", "shall", "seller", "buyer", "company", "account", "transfer",
    "receipt", "documents", "obligations", "according", "clause", "section", "annex", "schedule",
    "order", "price", "value", "tax", "days", "notice", "written", "consent", "signed", "copy",
    "original", "office", "department", "registered", "address", "number", "quantity", "unit",
    "item", "reference", "statement", "balance", "confirm", "accepted", "provided", "following",
    "stated", "above", "below", "each", "any", "all", "no", "not", "upon", "request", "prior",
    "effective", "warehouse", "invoiced", "shipment", "liability", "supplier", "customer",
)
_SYLLABLES = ("ar", "bel", "cor", "dan", "el", "fer", "gal", "har", "in", "jor", "kel", "lan", "mor",
              "nor", "or", "pel", "quin", "ros", "sel", "tor", "ul", "ver", "wes", "zan", "ba", "de",
              "ri", "mo", "ta", "vi", "ko", "su", "ne", "lo")
_SECTORS = ("TRADING", "LOGISTICS", "HOLDINGS", "CONSULTING", "INDUSTRIES", "SUPPLY", "SERVICES",
            "BUILDERS", "FOODS", "MOTORS", "NOTARY OFFICE", "AGRO", "PHARMA", "TEXTILES")
_FORMS = ("LLC", "LTD", "INC", "GMBH", "CO.", "CORP", "S.A.", "PLC")
_TOWN_ENDS = ("VILLE", "FORD", "BURG", "TON", "PORT", "FIELD", "MOUTH", "DALE")
_MARKS = ("APPROVED", "RECEIVED", "PAID", "VERIFIED", "COPY", "ORIGINAL", "CONFIDENTIAL",
          "ACCEPTED", "CERTIFIED", "ENTERED", "CHECKED", "FOR DOCUMENTS")
_TITLES = ("INVOICE", "DELIVERY NOTE", "CERTIFICATE", "ACT OF ACCEPTANCE", "POWER OF ATTORNEY",
           "PURCHASE ORDER", "STATEMENT OF ACCOUNT", "RECEIPT", "MEMORANDUM", "SUPPLY CONTRACT")
_SIGNERS = ("Director", "Chief Accountant", "Authorized person", "Manager", "Approved by",
            "Received by", "Signed")
_COLUMNS = ("Qty", "Unit", "Price", "Amount", "VAT", "Total", "Code", "Date")


# --------------------------------------------------------------------------- public API


@dataclass
class StampPage:
    """One rendered page: the composed image before JPEG, its JPEG bytes, and its stamps."""

    image: np.ndarray  # (H, W, 3) uint8 BGR, as composed (the JPEG is this image, compressed)
    jpeg: bytes
    masks: list[np.ndarray] = field(default_factory=list)  # (H, W) bool footprints
    category_ids: list[int] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def generate_stamps(
    out_dir: Path,
    n: int,
    seed: int = 0,
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Writes `n` synthetic stamped pages and their COCO train/val/test JSONs under `out_dir`.

    Pages are assigned to splits by index: the first round(n * fractions[0]) go to train, the
    next round(n * fractions[1]) to val, the rest to test; with n >= 3 every split with a
    positive fraction gets at least one page. Image ids are page index + 1; annotation ids
    count from 1 across all three files.

    Returns {"images", "objects", "splits": {split: {"images", "objects"}}, "out"}. `out_dir` is
    new, empty, or samcache's earlier stamps dataset, which only `overwrite` replaces (its files
    removed first: see outputs.py). More than `synthetic.MAX_IMAGES` (1,000,000)
    pages is a ConfigError; pages are written one at a time, and memory does not grow with `n`.
    """
    def render(index: int) -> tuple:
        page = render_page(seed, index)
        return f"page_{index:05d}.jpg", page.jpeg, page.height, page.width, page.masks, page.category_ids

    return write_synthetic_set(out_dir, n, seed, kind=STAMPS_KIND, description=_DESCRIPTION, categories=CATEGORIES,
                               unit="page", render=render, fractions=fractions, progress=progress,
                               overwrite=overwrite, legacy=_written_by_samcache)


def _written_by_samcache(folder: Path) -> bool:
    """A stamps dataset from before outputs carried their marker: its train.json says what made it."""
    info = read_json_mapping(folder / "train.json").get("info")
    return isinstance(info, dict) and str(info.get("description", "")).startswith(_DESCRIPTION)


def render_page(seed: int, index: int) -> StampPage:
    """Renders page `index` of the dataset with `seed`; the same pair always gives the same page."""
    rng = np.random.default_rng([seed, index])
    height, width = _page_size(rng)
    paper = _paper(rng, height, width)
    signature_box = _draw_document(rng, paper)
    page = paper.astype(np.float32) / 255.0
    masks, category_ids = _stamp_page(rng, page, signature_box)
    image = _scan(rng, page)
    quality = int(rng.integers(60, 91))
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cv2 could not JPEG-encode a page")
    return StampPage(image, buf.tobytes(), masks, category_ids)


# --------------------------------------------------------------------------- dataset files


# --------------------------------------------------------------------------- small helpers


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _text_width(text: str, font: int, scale: float, thick: int) -> int:
    return cv2.getTextSize(text, font, scale, thick)[0][0]


def _fx(pts: np.ndarray) -> np.ndarray:
    # cv2 drawing in fixed point (shift=4) keeps the geometry sub-pixel exact.
    return np.round(pts * 16).astype(np.int32)


def _company(rng: np.random.Generator) -> str:
    name = "".join(_pick(rng, _SYLLABLES) for _ in range(int(rng.integers(2, 4))))
    return f"{name.upper()} {_pick(rng, _SECTORS)} {_pick(rng, _FORMS)}"


def _town(rng: np.random.Generator) -> str:
    return (_pick(rng, _SYLLABLES) + _pick(rng, _SYLLABLES)).upper() + _pick(rng, _TOWN_ENDS)


def _date(rng: np.random.Generator) -> str:
    return f"{int(rng.integers(1, 29)):02d}.{int(rng.integers(1, 13)):02d}.{int(rng.integers(1995, 2025))}"


# --------------------------------------------------------------------------- paper and print


def _page_size(rng: np.random.Generator) -> tuple[int, int]:
    short, long_ = int(rng.integers(600, 901)), int(rng.integers(800, 1151))
    long_ = max(long_, short + 100)
    return (short, long_) if rng.random() < 0.2 else (long_, short)


def _paper(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Off-white paper with uneven scanner lighting and a fine fibre texture, uint8 BGR."""
    r = _u(rng, 0.95, 0.995)
    g = r - _u(rng, 0.0, 0.02)
    tint = np.array([g - _u(rng, 0.01, 0.05), g, r], np.float32)
    angle = _u(rng, 0, 2 * math.pi)
    ramp = (np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :] * math.cos(angle)
            + np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None] * math.sin(angle))
    low = cv2.resize(rng.standard_normal((h // 48 + 2, w // 48 + 2)).astype(np.float32), (w, h),
                     interpolation=cv2.INTER_CUBIC)
    fine = cv2.resize(rng.standard_normal((h // 2, w // 2)).astype(np.float32), (w, h),
                      interpolation=cv2.INTER_LINEAR)
    shade = 1.0 + ramp * _u(rng, 0.0, 0.06) + low * 0.01 + fine * 0.012
    return np.clip(shade[..., None] * tint * 255.0, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _Style:
    font: int
    scale: float
    thick: int
    color: tuple[int, int, int]
    line_h: int


def _body_style(rng: np.random.Generator) -> _Style:
    font = _pick(rng, _BODY_FONTS)
    scale = _u(rng, 0.38, 0.5) * (1.35 if font == cv2.FONT_HERSHEY_COMPLEX_SMALL else 1.0)
    gray = int(rng.integers(15, 70))
    return _Style(font, scale, 1, (gray, gray, gray), int(30 * scale * _u(rng, 1.35, 1.7)))


def _draw_document(rng: np.random.Generator, img: np.ndarray) -> tuple[int, int, int, int] | None:
    """Prints a business document onto `img`; returns the signature's box (x0, y0, x1, y1) if any."""
    h, w = img.shape[:2]
    margin = int(w * _u(rng, 0.07, 0.12))
    x0, x1 = margin, w - margin
    y, y_end = int(h * _u(rng, 0.05, 0.08)), h - int(h * _u(rng, 0.05, 0.08))
    style = _body_style(rng)
    y = _letterhead(rng, img, x0, x1, y, style)
    y = _title(rng, img, x0, x1, y, style)
    wants_signature = rng.random() < 0.75
    reserve = 4 * style.line_h if wants_signature else 0
    # Most pages are well filled; some stop short, like a letter's last page.
    fill_to = y_end - reserve - int(h * (0.0 if rng.random() < 0.6 else _u(rng, 0.1, 0.35)))
    table_after = int(rng.integers(1, 3)) if rng.random() < 0.5 else -1
    for block in range(12):
        if y > fill_to - 3 * style.line_h:
            break
        if block == table_after:
            y = _table(rng, img, x0, x1, y, y_end - reserve, style)
        else:
            y = _paragraph(rng, img, x0, x1, y, fill_to, style)
    if not wants_signature:
        return None
    return _signature_block(rng, img, x0, x1, min(y + style.line_h, y_end - 2 * style.line_h), style)


def _letterhead(rng: np.random.Generator, img: np.ndarray, x0: int, x1: int, y: int, style: _Style) -> int:
    font = _pick(rng, (cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX))
    scale = _u(rng, 0.7, 1.0)
    name = _company(rng)
    while _text_width(name, font, scale, 2) > x1 - x0:
        scale *= 0.9
    y += int(26 * scale)
    cv2.putText(img, name, (x0, y), font, scale, style.color, 2, cv2.LINE_AA)
    y += style.line_h
    address = f"{int(rng.integers(1, 300))} {_pick(rng, _SYLLABLES).title()}{_pick(rng, _SYLLABLES)} Street, " \
              f"{_town(rng).title()}   Tel. +{int(rng.integers(10, 99))} {int(rng.integers(100, 999))} " \
              f"{int(rng.integers(1000, 9999))}"
    cv2.putText(img, address, (x0, y), style.font, style.scale * 0.9, style.color, 1, cv2.LINE_AA)
    y += style.line_h // 2
    cv2.line(img, (x0, y), (x1, y), style.color, int(rng.integers(1, 3)), cv2.LINE_AA)
    return y + 2 * style.line_h


def _title(rng: np.random.Generator, img: np.ndarray, x0: int, x1: int, y: int, style: _Style) -> int:
    title = _pick(rng, _TITLES)
    if rng.random() < 0.6:
        title += f" No. {int(rng.integers(1, 9999))}"
    scale = style.scale * _u(rng, 1.4, 1.9)
    width = _text_width(title, style.font, scale, 2)
    cv2.putText(img, title, ((x0 + x1 - width) // 2, y), style.font, scale, style.color, 2, cv2.LINE_AA)
    y += style.line_h
    date = f"{_town(rng).title()}, {_date(rng)}"
    dw = _text_width(date, style.font, style.scale, 1)
    cv2.putText(img, date, (x1 - dw, y + style.line_h // 2), style.font, style.scale, style.color, 1, cv2.LINE_AA)
    return y + 2 * style.line_h


def _words(rng: np.random.Generator) -> Iterator[str]:
    """An endless stream of sentence-like words, numbers and dates."""
    capital = True
    while True:
        u = rng.random()
        if u < 0.05:
            word = f"{int(rng.integers(10, 99999)):,}.{int(rng.integers(0, 100)):02d}"
        elif u < 0.07:
            word = _date(rng)
        else:
            word = _pick(rng, _WORDS)
        if capital:
            word = word[:1].upper() + word[1:]
        r = rng.random()
        capital = r < 0.07
        yield word + ("." if capital else "," if r < 0.12 else "")


def _paragraph(rng: np.random.Generator, img: np.ndarray, x0: int, x1: int, y: int, y_max: int,
               style: _Style) -> int:
    """Prints a justified paragraph of 2-9 lines; returns the y after it."""
    space = _text_width(" ", style.font, style.scale, 1)
    words = _words(rng)
    n_lines = int(rng.integers(2, 10))
    for line in range(n_lines):
        if y > y_max:
            break
        left = x0 + (int(3 * space) if line == 0 else 0)
        last = line == n_lines - 1
        limit = (x1 - left) * (_u(rng, 0.3, 0.9) if last else 1.0)
        row, widths = [], []
        for word in words:
            ww = _text_width(word, style.font, style.scale, 1)
            if row and sum(widths) + ww + space * len(row) > limit:
                break
            row.append(word)
            widths.append(ww)
        gap = space if last or len(row) < 2 else (x1 - left - sum(widths)) / (len(row) - 1)
        x = float(left)
        for word, ww in zip(row, widths):
            cv2.putText(img, word, (int(x), y), style.font, style.scale, style.color, 1, cv2.LINE_AA)
            x += ww + gap
        y += style.line_h
    return y + style.line_h // 2


def _table(rng: np.random.Generator, img: np.ndarray, x0: int, x1: int, y: int, y_max: int,
           style: _Style) -> int:
    """Prints a ruled table with a header row; returns the y after it."""
    row_h = int(style.line_h * 1.4)
    rows = min(int(rng.integers(3, 9)), (y_max - y) // row_h)
    if rows < 2:
        return y
    cols = int(rng.integers(3, 6))
    weights = rng.uniform(0.7, 1.3, cols)
    weights[0], weights[1] = 0.5, weights[1] * 1.8  # a narrow "No." column, a wide description
    edges = (x0 + np.concatenate([[0], np.cumsum(weights)]) / weights.sum() * (x1 - x0)).astype(int)
    for r in range(rows + 1):
        cv2.line(img, (x0, y + r * row_h), (x1, y + r * row_h), style.color, 1)
    for e in edges:
        cv2.line(img, (int(e), y), (int(e), y + rows * row_h), style.color, 1)
    header = ["No.", "Description"] + list(rng.permutation(_COLUMNS)[: cols - 2])
    words = _words(rng)
    for r in range(rows):
        for c in range(cols):
            text = header[c] if r == 0 else _cell(rng, c, r, words)
            room = edges[c + 1] - edges[c] - 8
            while text and _text_width(text, style.font, style.scale, 1) > room:
                text = text[:-1]
            baseline = y + r * row_h + (row_h + int(22 * style.scale)) // 2
            cv2.putText(img, text, (int(edges[c]) + 4, baseline), style.font, style.scale, style.color,
                        2 if r == 0 else 1, cv2.LINE_AA)
    return y + rows * row_h + style.line_h


def _cell(rng: np.random.Generator, col: int, row: int, words: Iterator[str]) -> str:
    if col == 0:
        return str(row)
    if col == 1:
        return " ".join(next(words).rstrip(".,") for _ in range(int(rng.integers(1, 4)))).capitalize()
    return f"{int(rng.integers(1, 9999)):,}.{int(rng.integers(0, 100)):02d}" if rng.random() < 0.6 \
        else str(int(rng.integers(1, 500)))


def _signature_block(rng: np.random.Generator, img: np.ndarray, x0: int, x1: int, y: int,
                     style: _Style) -> tuple[int, int, int, int]:
    """Prints "Director: ______ /J. Name/" with a handwritten signature on the line; returns its box."""
    left = x0 if rng.random() < 0.6 else (x0 + x1) // 2 - int(0.1 * (x1 - x0))
    label = _pick(rng, _SIGNERS) + ":"
    cv2.putText(img, label, (left, y), style.font, style.scale, style.color, 1, cv2.LINE_AA)
    line_x0 = left + _text_width(label, style.font, style.scale, 1) + 10
    line_x1 = line_x0 + int((x1 - x0) * _u(rng, 0.22, 0.32))
    cv2.line(img, (line_x0, y + 3), (line_x1, y + 3), style.color, 1)
    surname = (_pick(rng, _SYLLABLES) + _pick(rng, _SYLLABLES)).title()
    name = f"/{chr(65 + int(rng.integers(26)))}. {surname}/"
    cv2.putText(img, name, (line_x1 + 8, y), style.font, style.scale, style.color, 1, cv2.LINE_AA)
    width = (line_x1 - line_x0) * _u(rng, 0.7, 1.0)
    height = style.line_h * _u(rng, 1.8, 3.0)
    return _signature(rng, img, line_x0 + _u(rng, 0, 10), y, width, height)


def _smooth(points: np.ndarray, k: int = 10) -> np.ndarray:
    """A Catmull-Rom spline through `points` (N, 2), k samples per segment."""
    p = np.vstack([points[:1], points, points[-1:]])
    t = np.linspace(0, 1, k, endpoint=False)[:, None]
    segments = [
        0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
               + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
        for p0, p1, p2, p3 in zip(p[:-3], p[1:-2], p[2:-1], p[3:])
    ]
    return np.vstack(segments + [points[-1:]])


def _signature(rng: np.random.Generator, img: np.ndarray, x: float, baseline: int, width: float,
               height: float) -> tuple[int, int, int, int]:
    """A cursive scribble: a tall capital loop, then humps of "letters"; backward steps in x make loops."""
    n = int(rng.integers(10, 20))
    step = width / n
    xs = x + np.cumsum(step * rng.uniform(0.5, 1.5, n) - step * 1.6 * (rng.random(n) < 0.2))
    ys = baseline - height * 0.3 + np.where(np.arange(n) % 2 == 0, -1, 1) * height * rng.uniform(0.08, 0.22, n)
    ys -= height * 0.45 * (rng.random(n) < 0.15)  # ascenders
    capital = np.array([[x + 0.1 * width, baseline - 0.2 * height], [x + 0.05 * width, baseline - height],
                        [x - 0.02 * width, baseline - 0.5 * height], [x + 0.08 * width, baseline - 0.25 * height]])
    capital += rng.normal(0, 0.06 * height, capital.shape)
    strokes = [_smooth(np.vstack([capital, np.stack([xs + 0.08 * width, ys], 1)]))]
    if rng.random() < 0.6:  # the underline flourish
        fx = np.array([xs[-1], x + width * 0.6, x + width * 0.2, x - width * 0.05])
        fy = baseline + rng.normal(0, height * 0.06, 4) + np.array([-height * 0.2, 2, 4, 0])
        strokes.append(_smooth(np.stack([fx, fy], 1)))
    color = _pick(rng, _PEN_INKS)
    thick = int(rng.integers(1, 3))
    for stroke in strokes:
        cv2.polylines(img, [_fx(stroke)], False, color, thick, cv2.LINE_AA, 4)
    pts = np.vstack(strokes)
    return (int(pts[:, 0].min()), int(pts[:, 1].min()), int(pts[:, 0].max()) + 1, int(pts[:, 1].max()) + 1)


# --------------------------------------------------------------------------- stamp geometry


Outline = Callable[[float], np.ndarray]  # inset in px -> closed outline polygon (N, 2)


def _ellipse_pts(center: tuple[float, float], a: float, b: float, n: int = 360) -> np.ndarray:
    """Ellipse points clockwise from 12 o'clock, so arc text runs left to right over the top."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([center[0] + a * np.sin(t), center[1] - b * np.cos(t)], 1)


def _rounded_rect_pts(center: tuple[float, float], hw: float, hh: float, r: float) -> np.ndarray:
    r = max(0.0, min(r, hw, hh))
    corners = ((hw - r, -hh + r, -90), (hw - r, hh - r, 0), (-hw + r, hh - r, 90), (-hw + r, -hh + r, 180))
    arcs = []
    for dx, dy, start in corners:
        a = np.radians(np.linspace(start, start + 90, 12))
        arcs.append(np.stack([center[0] + dx + r * np.cos(a), center[1] + dy + r * np.sin(a)], 1))
    return np.vstack(arcs)


def _ring(canvas: np.ndarray, outline: Outline, inset: float, thick: int) -> None:
    """A border whose outer edge lies `inset` px inside the footprint's edge."""
    cv2.polylines(canvas, [_fx(outline(inset + thick / 2))], True, 255, thick, cv2.LINE_AA, 4)


def _font_scale(font: int, thick: int, char_h: float) -> float:
    return char_h / cv2.getTextSize("H", font, 1.0, thick)[0][1]


def _put_char(canvas: np.ndarray, ch: str, center: np.ndarray, angle: float, font: int, scale: float,
              thick: int) -> None:
    """Draws one character centred at `center`, turned clockwise by `angle` degrees."""
    (w, h), base = cv2.getTextSize(ch, font, scale, thick)
    size = int(max(w, h + base) * 1.5) + 4
    patch = np.zeros((size, size), np.uint8)
    cv2.putText(patch, ch, ((size - w) // 2, (size + h) // 2), font, scale, 255, thick, cv2.LINE_AA)
    x0, y0 = int(math.floor(center[0] - size / 2)), int(math.floor(center[1] - size / 2))
    m = cv2.getRotationMatrix2D((size / 2, size / 2), -angle, 1.0)
    m[:, 2] += (center[0] - size / 2 - x0, center[1] - size / 2 - y0)  # keep the sub-pixel position
    patch = cv2.warpAffine(patch, m, (size, size), flags=cv2.INTER_LINEAR)
    ys, xs = slice(max(y0, 0), min(y0 + size, canvas.shape[0])), slice(max(x0, 0), min(x0 + size, canvas.shape[1]))
    crop = patch[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0]
    np.maximum(canvas[ys, xs], crop, out=canvas[ys, xs])


def _curve_text(canvas: np.ndarray, text: str, curve: np.ndarray, s_mid: float, font: int, scale: float,
                thick: int, tracking: float) -> None:
    """Draws `text` along the closed `curve`, centred at arc length `s_mid`, letters upright to it."""
    closed = np.vstack([curve, curve[:1]])
    s = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(closed, axis=0).T))])
    length = s[-1]
    advances = np.array([_text_width(ch, font, scale, thick) for ch in text], float) + tracking
    centers = s_mid - (advances.sum() - tracking) / 2 + np.cumsum(advances) - advances / 2 - tracking / 2
    for ch, sc in zip(text, centers):
        if ch == " ":
            continue
        at = [np.interp(v % length, s, closed[:, i]) for v in (sc - 1.5, sc, sc + 1.5) for i in (0, 1)]
        angle = math.degrees(math.atan2(at[5] - at[1], at[4] - at[0]))
        _put_char(canvas, ch, np.array(at[2:4]), angle, font, scale, thick)


def _ring_text(canvas: np.ndarray, rng: np.random.Generator, center: tuple[float, float], a: float,
               b: float, char_h: float, font: int, thick: int) -> None:
    """Text around the band of a round/oval stamp: one loop all round, or a top and a bottom arc."""
    curve = _ellipse_pts(center, a, b)
    length = float(np.hypot(*np.diff(np.vstack([curve, curve[:1]]), axis=0).T).sum())
    scale = _font_scale(font, thick, char_h)
    if a == b and rng.random() < 0.6:
        text = f"{_company(rng)} * {_town(rng)} * "
        while _text_width(text, font, scale, thick) < 0.7 * length:
            text += f"REG. NO {int(rng.integers(10**5, 10**7))} * "
        natural = sum(_text_width(ch, font, scale, thick) for ch in text)
        scale *= min(1.0, 0.97 * length / natural)
        natural = sum(_text_width(ch, font, scale, thick) for ch in text)
        _curve_text(canvas, text, curve, 0.0, font, scale, thick, (length - natural) / len(text))
        return
    top, bottom = _company(rng), _pick(rng, (_town(rng), _pick(rng, _MARKS), _date(rng)))
    for text, arc, mid in ((top, curve, 0.0), (bottom, curve[::-1], length / 2)):
        sc = scale * min(1.0, 0.4 * length / _text_width(text, font, scale, thick))
        spare = 0.36 * length - _text_width(text, font, sc, thick)
        tracking = max(0.0, min(spare / len(text), 0.4 * char_h))
        _curve_text(canvas, text, arc, mid, font, sc, thick, tracking)
    for side in (0.25, 0.75):  # separators between the two arcs
        p = curve[int(side * len(curve))]
        _star(canvas, (float(p[0]), float(p[1])), char_h * 0.45)


def _star(canvas: np.ndarray, center: tuple[float, float], r: float) -> None:
    t = np.arange(10) * math.pi / 5
    radius = np.where(np.arange(10) % 2 == 0, r, r * 0.4)
    pts = np.stack([center[0] + radius * np.sin(t), center[1] - radius * np.cos(t)], 1)
    cv2.fillPoly(canvas, [_fx(pts)], 255, cv2.LINE_AA, 4)


def _text_block(canvas: np.ndarray, lines: list[tuple[str, float]], box: tuple[float, float, float, float],
                font: int, rng: np.random.Generator) -> None:
    """Centred lines (text, relative size) scaled together to fit `box` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    thick = max(1, int(round((y1 - y0) / 45)))
    h1 = cv2.getTextSize("H", font, 1.0, thick)[0][1]
    widths = [_text_width(t, font, rel, thick) for t, rel in lines]
    heights = sum(h1 * rel for _, rel in lines) * 1.45
    scale = min((x1 - x0) / max(widths), (y1 - y0) / heights) * _u(rng, 0.85, 1.0)
    y = (y0 + y1) / 2 - heights * scale / 2
    for (text, rel), w in zip(lines, widths):
        y += h1 * rel * scale * 1.45
        org = (int(round((x0 + x1) / 2 - w * scale / 2)), int(round(y - h1 * rel * scale * 0.225)))
        bold = thick + (1 if rel > 1.05 else 0)
        cv2.putText(canvas, text, org, font, scale * rel, 255, bold, cv2.LINE_AA)


def _center_lines(rng: np.random.Generator) -> list[tuple[str, float]]:
    choice = int(rng.integers(4))
    if choice == 0:
        return [(_pick(rng, _MARKS), 1.2)]
    if choice == 1:
        return [(_pick(rng, _MARKS), 1.2), (_date(rng), 0.8)]
    if choice == 2:
        return [("No.", 0.8), (str(int(rng.integers(1, 999))), 1.3)]
    return [(_company(rng).split()[0], 1.0), (_pick(rng, _MARKS), 1.1), (_date(rng), 0.7)]


def _canvas(width: float, height: float) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Square ink and footprint canvases big enough for any rotation of a width x height stamp."""
    size = int(math.ceil(math.hypot(width, height))) + 8
    return np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8), (size / 2, size / 2)


def _round_stamp(rng: np.random.Generator, diameter: float) -> tuple[np.ndarray, np.ndarray]:
    ink, fp, c = _canvas(diameter, diameter)
    r = diameter / 2
    outline: Outline = lambda inset: _ellipse_pts(c, r - inset, r - inset)
    edge = max(2, int(round(r * _u(rng, 0.03, 0.055))))
    _ring(ink, outline, 0, edge)
    if rng.random() < 0.45:
        gap = int(rng.integers(2, 5))
        _ring(ink, outline, edge + gap, 1)
        edge += gap + 1
    inner = r * _u(rng, 0.58, 0.68)
    _ring(ink, lambda inset: _ellipse_pts(c, inner - inset, inner - inset), 0, int(rng.integers(1, 3)))
    band = r - edge - inner
    font = _pick(rng, _STAMP_FONTS)
    thick = max(1, int(round(band / 11)))
    _ring_text(ink, rng, c, inner + band / 2, inner + band / 2, band * _u(rng, 0.5, 0.62), font, thick)
    _round_center(ink, rng, c, inner * 0.85, font)
    cv2.fillPoly(fp, [_fx(outline(0))], 255, cv2.LINE_8, 4)
    return ink, fp


def _round_center(ink: np.ndarray, rng: np.random.Generator, c: tuple[float, float], r: float, font: int) -> None:
    kind = int(rng.integers(3))
    if kind == 0:
        _star(ink, c, r * 0.55)
    elif kind == 1:
        _text_block(ink, _center_lines(rng), (c[0] - r * 0.85, c[1] - r * 0.6, c[0] + r * 0.85, c[1] + r * 0.6),
                    font, rng)
    else:
        _star(ink, (c[0], c[1] - r * 0.45), r * 0.3)
        lines = [(_pick(rng, _MARKS), 1.0)]
        _text_block(ink, lines, (c[0] - r * 0.85, c[1] - r * 0.05, c[0] + r * 0.85, c[1] + r * 0.55), font, rng)


def _oval_stamp(rng: np.random.Generator, width: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    ink, fp, c = _canvas(width, height)
    a, b = width / 2, height / 2
    outline: Outline = lambda inset: _ellipse_pts(c, a - inset, b - inset)
    edge = max(2, int(round(b * _u(rng, 0.04, 0.07))))
    _ring(ink, outline, 0, edge)
    font = _pick(rng, _STAMP_FONTS)
    band = b * _u(rng, 0.26, 0.34)
    if rng.random() < 0.8:
        _ring(ink, outline, edge + band, int(rng.integers(1, 3)))
        mid = edge + band / 2
        _ring_text(ink, rng, c, a - mid, b - mid, band * 0.55, font, max(1, int(round(band / 11))))
        ia, ib = a - edge - band, b - edge - band
    else:
        _ring(ink, outline, edge + int(rng.integers(2, 5)), 1)
        ia, ib = a - edge - 6, b - edge - 6
    _text_block(ink, _center_lines(rng), (c[0] - ia * 0.75, c[1] - ib * 0.62, c[0] + ia * 0.75, c[1] + ib * 0.62),
                font, rng)
    cv2.fillPoly(fp, [_fx(outline(0))], 255, cv2.LINE_8, 4)
    return ink, fp


def _rect_stamp(rng: np.random.Generator, width: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    ink, fp, c = _canvas(width, height)
    corner = 0.0 if rng.random() < 0.5 else height * _u(rng, 0.05, 0.2)
    outline: Outline = lambda inset: _rounded_rect_pts(c, width / 2 - inset, height / 2 - inset, corner - inset)
    edge = max(2, int(round(height * _u(rng, 0.035, 0.06))))
    _ring(ink, outline, 0, edge)
    if rng.random() < 0.7:
        gap = int(rng.integers(2, 6))
        _ring(ink, outline, edge + gap, int(rng.integers(1, 3)))
        edge += gap + 2
    pad = edge + 0.08 * height
    box = (c[0] - width / 2 + pad, c[1] - height / 2 + pad, c[0] + width / 2 - pad, c[1] + height / 2 - pad)
    if rng.random() < 0.35:
        lines = [(_pick(rng, ("PAID", "COPY", "RECEIVED", "APPROVED", "VOID", "ORIGINAL")), 1.3)]
    else:
        lines = [(_company(rng), 0.7), (_pick(rng, _MARKS), 1.2), (f"Date: {_date(rng)}", 0.7)]
        if rng.random() < 0.4:
            lines.append((f"No. {int(rng.integers(1, 9999))}  Sign: ______", 0.7))
    _text_block(ink, lines, box, _pick(rng, _STAMP_FONTS), rng)
    cv2.fillPoly(fp, [_fx(outline(0))], 255, cv2.LINE_8, 4)
    return ink, fp


def _rotate_crop(ink: np.ndarray, fp: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotates ink and footprint by the same matrix, then crops both to what they cover."""
    size = ink.shape[0]
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
    ink = cv2.warpAffine(ink, m, (size, size), flags=cv2.INTER_LINEAR)
    fp = cv2.warpAffine(fp, m, (size, size), flags=cv2.INTER_LINEAR) >= 128
    ys, xs = np.nonzero((ink > 0) | fp)
    box = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
    return ink[box], fp[box]


def _make_stamp(rng: np.random.Generator, short_side: int) -> tuple[int, np.ndarray, np.ndarray]:
    """A random stamp sized against the page: (category id, ink uint8, footprint bool), rotated."""
    kind = _pick(rng, (ROUND, ROUND, OVAL, RECT, RECT))
    top = 0.4 * short_side
    if kind == ROUND:
        ink, fp = _round_stamp(rng, _u(rng, max(84.0, 0.17 * short_side), 0.36 * short_side))
        angle = _u(rng, -180, 180)
    elif kind == OVAL:
        width = _u(rng, max(120.0, 0.24 * short_side), top)
        ink, fp = _oval_stamp(rng, width, max(84.0, width * _u(rng, 0.55, 0.72)))
        angle = _u(rng, -35, 35)
    else:
        width = _u(rng, max(150.0, 0.26 * short_side), top)
        ink, fp = _rect_stamp(rng, width, max(84.0, width * _u(rng, 0.35, 0.6)))
        angle = _u(rng, -20, 20) if rng.random() < 0.8 else _u(rng, -45, 45)
    ink, fp = _rotate_crop(ink, fp, angle)
    return kind, ink, fp


# --------------------------------------------------------------------------- stamping the page


def _ink_coverage(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """How much ink a rubber stamp leaves: uneven pressure, blotches, faded spots, tiny gaps."""
    h, w = shape
    angle = _u(rng, 0, 2 * math.pi)
    ramp = (np.linspace(0, 1, w, dtype=np.float32)[None, :] * math.cos(angle)
            + np.linspace(0, 1, h, dtype=np.float32)[:, None] * math.sin(angle))
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    cover = 1.0 - _u(rng, 0.05, 0.35) * ramp
    blotch = cv2.resize(rng.standard_normal((h // 14 + 2, w // 14 + 2)).astype(np.float32), (w, h),
                        interpolation=cv2.INTER_CUBIC)
    cover *= np.clip(0.92 + 0.25 * blotch, 0.35, 1.0)
    for _ in range(int(rng.integers(0, 4))):  # worn or dry patches
        spot = np.zeros((h, w), np.float32)
        center = (int(rng.integers(w)), int(rng.integers(h)))
        axes = (int(rng.integers(w // 10 + 2, w // 3 + 3)), int(rng.integers(h // 10 + 2, h // 3 + 3)))
        cv2.ellipse(spot, center, axes, _u(rng, 0, 180), 0, 360, 1.0, -1)
        cover *= 1.0 - _u(rng, 0.3, 0.7) * cv2.GaussianBlur(spot, (0, 0), max(axes) / 3)
    grain = cv2.resize(rng.random((h // 3 + 2, w // 3 + 2)).astype(np.float32), (w, h),
                       interpolation=cv2.INTER_LINEAR)
    cover[grain < _u(rng, 0.03, 0.15)] *= 0.4
    return cover


def _place(rng: np.random.Generator, labels: np.ndarray, fp: np.ndarray,
           near: tuple[int, int, int, int] | None) -> tuple[int, int] | None:
    """A top-left corner that keeps the stamp on the page and overlaps others by at most 8%."""
    ph, pw = labels.shape
    sh, sw = fp.shape
    own = int(fp.sum())
    others = np.bincount(labels.ravel())[1:]
    for _ in range(40):
        if near is not None and rng.random() < 0.6:
            cx = (near[0] + near[2]) / 2 + rng.normal(0, 0.5 * sw)
            cy = (near[1] + near[3]) / 2 + rng.normal(0, 0.4 * sh)
            x, y = int(np.clip(cx - sw / 2, 0, pw - sw)), int(np.clip(cy - sh / 2, 0, ph - sh))
        else:
            x, y = int(rng.integers(0, pw - sw + 1)), int(rng.integers(0, ph - sh + 1))
        under = labels[y:y + sh, x:x + sw][fp]
        hits = np.bincount(under, minlength=len(others) + 1)[1:]
        if hits.sum() <= 0.08 * own and np.all(hits <= 0.08 * others):
            return x, y
    return None


def _stamp_page(rng: np.random.Generator, page: np.ndarray,
                near: tuple[int, int, int, int] | None) -> tuple[list[np.ndarray], list[int]]:
    """Stamps 1-4 stamps onto `page` (float BGR, in place); returns their page-size masks."""
    ph, pw = page.shape[:2]
    labels = np.zeros((ph, pw), np.uint8)
    masks: list[np.ndarray] = []
    kinds: list[int] = []
    for _ in range(int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.25, 0.1]))):
        kind, ink, fp = _make_stamp(rng, min(ph, pw))
        spot = _place(rng, labels, fp, near)
        if spot is None:
            continue
        x, y = spot
        sh, sw = fp.shape
        color = np.clip(np.array(_pick(rng, _INKS)) + rng.normal(0, 0.04, 3), 0, 1).astype(np.float32)
        alpha = ink.astype(np.float32) / 255.0 * _ink_coverage(rng, (sh, sw)) * _u(rng, 0.75, 0.95)
        # Multiply blend: ink darkens like a translucent dye, so print beneath stays readable.
        page[y:y + sh, x:x + sw] *= 1.0 - alpha[..., None] * (1.0 - color)
        labels[y:y + sh, x:x + sw][fp] = len(masks) + 1
        mask = np.zeros((ph, pw), bool)
        mask[y:y + sh, x:x + sw] = fp
        masks.append(mask)
        kinds.append(kind)
    return masks, kinds


def _scan(rng: np.random.Generator, page: np.ndarray) -> np.ndarray:
    """Scanner look: optics blur, exposure and contrast drift, sensor noise; returns uint8 BGR."""
    page = cv2.GaussianBlur(page, (0, 0), _u(rng, 0.35, 0.9))
    page = (page - 0.5) * _u(rng, 0.9, 1.08) + 0.5 + _u(rng, -0.04, 0.03)
    page += rng.standard_normal(page.shape, dtype=np.float32) * _u(rng, 0.006, 0.022)
    return np.clip(page * 255.0 + 0.5, 0, 255).astype(np.uint8)
