"""OCR benchmark data for the PP-OCRv5 models of ``models/zoo.py``: generated text images with
ground truth, the models' preprocessing, decoding and post-processing, metrics and evaluation.

Data is rendered with Pillow in the DejaVu fonts of the Debian package ``fonts-dejavu-core``
(``tools/install_fonts.sh`` installs it; ``$OCS_ONNX_FONTS`` names another folder that holds the
same files). Every set is drawn from ``numpy.random.default_rng([seed, task])``: the same seed,
size and Pillow/FreeType version give the same bytes. Calibration and evaluation sets use
different seeds (``CALIB_SEED``, ``EVAL_SEED``).

- ``rec`` (recognizer): one text line per image, words from a fixed list, numbers and punctuation
  (ASCII only: all of it is in the model's dictionary), dark on light, with random font, size,
  margins, gray levels and pixel noise. Metrics: exact-line accuracy and character error rate
  (edit distance / reference length) after CTC greedy decoding.
- ``cls`` (text direction): the same kind of lines, half of them rotated by 180 degrees (label 1,
  the model's second class "180"). Metric: accuracy.
- ``det`` (detector): square pages with several well-separated lines at known boxes (the ink's
  horizontal extent x the font's line box, see :func:`render_page`). Metrics: box recall,
  precision and F1 at IoU 0.5 after a DB post-process, the mean IoU of the matched boxes, and
  optionally the IoU of the binarized probability maps against a reference model (the float one).

Preprocessing follows the package's own code (``predict_rec.py``, ``predict_cls.py``,
``predict_det.py``, read from the wheel, re-implemented here in numpy):

- rec: images are BGR uint8 (the package reads them with OpenCV). Resize to height 48 keeping the
  aspect ratio (width ``ceil(48 * w / h)``, at most the batch width), bilinear; ``x / 255``,
  then ``(x - 0.5) / 0.5``; CHW; zero-padded on the right to the batch width. The package's batch
  width is ``48 * max(320 / 48, widest ratio in the batch)``, so lines that fit in 320 (all lines
  generated here) always get width 320, which makes a fixed-shape set.
- cls: the same, at 48 x 192; longer lines are squeezed to 192 as the package does.
- det: the longer side is scaled down to at most 960 (never up) and both sides rounded to a
  multiple of 32; ``(x / 255 - mean) / std`` with ImageNet mean/std applied in the array's
  (BGR) channel order; CHW.
- DB post-process (the package's defaults): probability > 0.3, connected components; a component
  is kept when its shorter side is >= 3 px and its mean probability >= 0.5; its box grows by
  ``d = area * 1.6 / perimeter`` on each side (the package's unclip); boxes are scaled back to the
  page. The package fits rotated rectangles (``cv2.minAreaRect``); the text here is axis-aligned, so
  axis-aligned boxes are used.

Command line (from the repository root)::

    python -m models.ocr calib --out DIR             # rec_calib.npz, cls_calib.npz, det_calib.npz
    python -m models.ocr eval rec [MODEL ...]        # default MODEL: the cached float model
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------
# Constants of the models (from the package's defaults)
# --------------------------------------------------------------------------

INPUT_NAME = "x"  # the input of all three models
REC_HEIGHT = 48
REC_WIDTH = 320
CLS_HEIGHT = 48
CLS_WIDTH = 192
CLS_LABELS = ("0", "180")  # output index -> rotation, the package's label_list
DET_LIMIT_SIDE = 960
DET_MEAN = (0.485, 0.456, 0.406)
DET_STD = (0.229, 0.224, 0.225)
DB_THRESH = 0.3
DB_BOX_THRESH = 0.5
DB_UNCLIP_RATIO = 1.6
DB_MIN_SIZE = 3
DET_PAGE_SIZE = 640

TASKS = ("rec", "cls", "det")
TASK_IDS = {"rec": 1, "cls": 2, "det": 3}
CALIB_SEED = 1000
EVAL_SEED = 2000
DEFAULT_COUNTS = {
    "calib": {"rec": 200, "cls": 200, "det": 32},
    "eval": {"rec": 300, "cls": 300, "det": 64},
}

FONT_PACKAGE = "fonts-dejavu-core"
FONT_ENV = "OCS_ONNX_FONTS"
# A fixed list, not whatever fonts a machine has: the data must not change with the machine.
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
)
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")


class OcrDataError(Exception):
    """A missing font, library or model file, with a one-line message for the user."""


# --------------------------------------------------------------------------
# Fonts
# --------------------------------------------------------------------------


def find_fonts() -> list[Path]:
    """Paths of ``FONT_FILES``, from ``$OCS_ONNX_FONTS`` or the usual font folders."""
    folders = [os.environ[FONT_ENV]] if os.environ.get(FONT_ENV) else list(FONT_DIRS)
    found: dict[str, Path] = {}
    for folder in folders:
        root = Path(folder).expanduser()
        if not root.is_dir():
            continue
        for name in FONT_FILES:
            if name not in found:
                hits = sorted(root.rglob(name))
                if hits:
                    found[name] = hits[0]
    missing = [name for name in FONT_FILES if name not in found]
    if missing:
        where = f"${FONT_ENV}={os.environ[FONT_ENV]}" if os.environ.get(FONT_ENV) else ", ".join(FONT_DIRS)
        raise OcrDataError(
            f"font {missing[0]} not found under {where}: install the Debian package {FONT_PACKAGE} "
            "(tools/install_fonts.sh)"
        )
    return [found[name] for name in FONT_FILES]


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise OcrDataError("Pillow is needed to render OCR data: pip install '.[bench]'") from None
    return Image, ImageDraw, ImageFont


class _Fonts:
    """Loaded FreeType fonts by (file index, pixel size), loaded once each."""

    def __init__(self) -> None:
        self.paths = find_fonts()
        self._cache: dict[tuple[int, int], object] = {}

    def get(self, index: int, size: int):
        key = (index, size)
        if key not in self._cache:
            self._cache[key] = _pil()[2].truetype(str(self.paths[index]), size)
        return self._cache[key]


# --------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------

_WORD_LIST = (
    "the of and to in is was for on that with as by at from this be are or an it not which have "
    "one all were when there can more other new some time these two may first any only its over "
    "such use where most after also made many before must through years back much well between "
    "under three world never good long little very same great state small large every found still "
    "total amount invoice number date price order customer account payment address street city "
    "phone email page section chapter table figure model layer weight channel output input value "
    "quantum network signal energy market report system control memory power water light north "
    "south river station office school garden window kitchen orange yellow purple silver golden "
    "Monday Friday January October London Paris Berlin Tokyo Canada Brazil Oxford Street"
)
WORDS = tuple(_WORD_LIST.split())
PUNCTUATION = ",.:;!?"


def random_text(rng: np.random.Generator, min_tokens: int = 1, max_tokens: int = 4) -> str:
    """A line of words and numbers, e.g. ``Invoice 3.50 total,`` (ASCII only)."""
    tokens = []
    for _ in range(int(rng.integers(min_tokens, max_tokens + 1))):
        kind = rng.random()
        if kind < 0.7:
            word = str(WORDS[rng.integers(len(WORDS))])
            case = rng.random()
            word = word.upper() if case < 0.12 else word.capitalize() if case < 0.35 else word
            if rng.random() < 0.15:
                word += PUNCTUATION[rng.integers(len(PUNCTUATION))]
            elif rng.random() < 0.04:
                word = f"({word})"
            tokens.append(word)
        else:
            tokens.append(_random_number(rng))
    return " ".join(tokens)


def _random_number(rng: np.random.Generator) -> str:
    form = int(rng.integers(6))
    if form == 0:
        return str(int(rng.integers(0, 100000)))
    if form == 1:
        return f"{rng.uniform(0, 1000):.{int(rng.integers(1, 3))}f}"
    if form == 2:
        return f"${rng.uniform(0, 500):.2f}"
    if form == 3:
        return f"{int(rng.integers(0, 101))}%"
    if form == 4:
        return f"{int(rng.integers(1990, 2031))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    return f"{int(rng.integers(0, 24))}:{int(rng.integers(0, 60)):02d}"


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _ink(fonts: _Fonts, text: str, font_index: int, size: int) -> tuple[np.ndarray, float, float]:
    """The text's coverage (0..1, float32) cropped to its ink bounding box, and the top and bottom
    of its line box (the font's ascent..descent band) in the crop's rows."""
    Image, ImageDraw, _ = _pil()
    font = fonts.get(font_index, size)
    left, top, right, bottom = font.getbbox(text)
    ascent, descent = font.getmetrics()
    pad = 2
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    # Anchor "la": the given y is the font's ascender line.
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=255, font=font)
    box = canvas.getbbox()  # exact ink box: the font's bbox can include side bearings
    line_top = pad - top - box[1]
    return np.asarray(canvas.crop(box), dtype=np.float32) / 255.0, float(line_top), float(line_top + ascent + descent)


def _finish(gray: np.ndarray, rng: np.random.Generator, noise_max: float) -> np.ndarray:
    """Add pixel noise and a slight per-channel tint; uint8 HxWx3 (BGR order, as OpenCV reads)."""
    noisy = gray + rng.normal(0.0, rng.uniform(0.0, noise_max), size=gray.shape)
    tint = rng.uniform(-6.0, 6.0, size=3)
    return np.clip(np.rint(noisy[:, :, None] + tint), 0, 255).astype(np.uint8)


def render_line(rng: np.random.Generator, fonts: _Fonts, text: str) -> np.ndarray:
    """One text line as a detector crop would look: uint8 HxWx3, margins of 10-35 % of the font size."""
    size = int(rng.integers(24, 45))
    ink, _, _ = _ink(fonts, text, int(rng.integers(len(fonts.paths))), size)
    top, bottom = (round(rng.uniform(0.1, 0.35) * size) for _ in range(2))
    left, right = (round(rng.uniform(0.1, 0.5) * size) for _ in range(2))
    h, w = ink.shape
    background = rng.uniform(200.0, 255.0)
    foreground = rng.uniform(0.0, 80.0)
    alpha = np.zeros((h + top + bottom, w + left + right), dtype=np.float32)
    alpha[top : top + h, left : left + w] = ink
    return _finish(background + (foreground - background) * alpha, rng, noise_max=8.0)


def _fits(image: np.ndarray, height: int, width: int) -> bool:
    return math.ceil(height * image.shape[1] / image.shape[0]) <= width


def render_page(
    rng: np.random.Generator, fonts: _Fonts, size: int = DET_PAGE_SIZE, max_lines: int = 10
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A page of text lines: (uint8 HxWx3, boxes [k, 4] as x0 y0 x1 y1, texts). 3..max_lines
    lines are drawn; one that is too long for the page or finds no free place is left out.

    A line's true box spans its ink horizontally and its line box (the font's ascent..descent band,
    or the ink where a glyph reaches further) vertically: the box a layout engine gives the line,
    whatever letters it holds, which is what text-detection annotations enclose (a box tight on
    the ink of "ace" would be half the height of one on "Tip"). Two lines side by side stay the sum
    of their font sizes apart (closer words are one line to a detector), and 0.3 times that sum
    above and below."""
    background = rng.uniform(190.0, 255.0)
    gray = np.full((size, size), background, dtype=np.float32)
    boxes: list[tuple[float, float, float, float]] = []
    guards: list[tuple[float, float, float, float]] = []
    texts: list[str] = []
    margin = 8
    for _ in range(int(rng.integers(3, max_lines + 1))):
        text = random_text(rng, 1, 5)
        font_size = int(rng.integers(16, 41))
        ink, line_top, line_bottom = _ink(fonts, text, int(rng.integers(len(fonts.paths))), font_size)
        h, w = ink.shape
        if w > size - 2 * margin or h > size - 2 * margin:
            continue
        for _attempt in range(30):
            x = int(rng.integers(margin, size - margin - w + 1))
            y = int(rng.integers(margin, size - margin - h + 1))
            # The union with the ink box: a glyph may reach past the font's ascent or descent.
            top = max(0.0, min(y, y + line_top))
            bottom = min(float(size), max(y + h, y + line_bottom))
            box = (float(x), top, float(x + w), bottom)
            guard = (x - font_size, top - 0.3 * font_size, x + w + font_size, bottom + 0.3 * font_size)
            if not any(_overlap(guard, other) for other in guards):
                foreground = rng.uniform(0.0, 90.0)
                region = gray[y : y + h, x : x + w]
                region += (foreground - region) * ink
                boxes.append(box)
                guards.append(guard)
                texts.append(text)
                break
    page = _finish(gray, rng, noise_max=6.0)
    return page, np.array(boxes, dtype=np.float32).reshape(-1, 4), texts


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# --------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 HxWxC image with pixel-center alignment and no antialiasing
    (OpenCV's INTER_LINEAR, which the package uses), rounded back to uint8."""
    src_h, src_w = image.shape[:2]
    if (src_h, src_w) == (height, width):
        return image.copy()

    def axis(dst: int, src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
        pos = np.clip(pos, 0.0, src - 1)
        low = np.floor(pos).astype(np.int64)
        high = np.minimum(low + 1, src - 1)
        return low, high, (pos - low).astype(np.float32)

    y0, y1, fy = axis(height, src_h)
    x0, x1, fx = axis(width, src_w)
    img = image.astype(np.float32)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def preprocess_line(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A text-line crop (uint8 HxWx3) as the recognizer / classifier input: float32 3 x height x width."""
    resized_w = min(width, math.ceil(height * image.shape[1] / image.shape[0]))
    resized = resize_bilinear(image, height, resized_w).astype(np.float32)
    out = np.zeros((3, height, width), dtype=np.float32)  # zero = mid-gray after normalization
    out[:, :, :resized_w] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def det_input_size(height: int, width: int, limit: int = DET_LIMIT_SIDE) -> tuple[int, int]:
    """The detector's input size for a page: longer side at most ``limit``, multiples of 32."""
    ratio = min(1.0, limit / max(height, width))
    return (max(32, int(round(int(height * ratio) / 32) * 32)), max(32, int(round(int(width * ratio) / 32) * 32)))


def preprocess_page(image: np.ndarray, limit: int = DET_LIMIT_SIDE) -> np.ndarray:
    """A page (uint8 HxWx3, BGR) as the detector input: float32 3 x H' x W'."""
    h, w = det_input_size(*image.shape[:2], limit=limit)
    resized = resize_bilinear(image, h, w).astype(np.float32)
    mean = np.array(DET_MEAN, dtype=np.float32)
    std = np.array(DET_STD, dtype=np.float32)
    return ((resized / 255.0 - mean) / std).transpose(2, 0, 1).copy()


# --------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------


@dataclass
class RecSet:
    inputs: np.ndarray  # float32 [N, 3, 48, width]
    texts: list[str]


@dataclass
class ClsSet:
    inputs: np.ndarray  # float32 [N, 3, 48, 192]
    labels: np.ndarray  # int64 [N]: 0 upright, 1 rotated by 180 degrees
    texts: list[str] = field(default_factory=list)


@dataclass
class DetSet:
    inputs: np.ndarray  # float32 [N, 3, H', W']
    boxes: list[np.ndarray]  # per page [k, 4] x0 y0 x1 y1 in page pixels
    page_size: tuple[int, int]  # (H, W) of the pages the boxes refer to


def _rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([seed, TASK_IDS[task]])


def _lines(
    rng: np.random.Generator, fonts: _Fonts, count: int, height: int, width: int
) -> list[tuple[np.ndarray, str]]:
    """``count`` rendered lines whose aspect ratio fits ``width`` at ``height`` (others are redrawn)."""
    lines = []
    while len(lines) < count:
        text = random_text(rng)
        image = render_line(rng, fonts, text)
        if _fits(image, height, width):
            lines.append((image, text))
    return lines


def rec_dataset(count: int, seed: int, width: int = REC_WIDTH) -> RecSet:
    lines = _lines(_rng(seed, "rec"), _Fonts(), count, REC_HEIGHT, width)
    inputs = np.zeros((count, 3, REC_HEIGHT, width), dtype=np.float32)
    for i, (image, _) in enumerate(lines):
        inputs[i] = preprocess_line(image, REC_HEIGHT, width)
    return RecSet(inputs, [text for _, text in lines])


def cls_dataset(count: int, seed: int) -> ClsSet:
    rng = _rng(seed, "cls")
    # Lines as long as the recognizer's: longer ones are squeezed into 192, as in the package.
    lines = _lines(rng, _Fonts(), count, REC_HEIGHT, REC_WIDTH)
    labels = (rng.random(count) < 0.5).astype(np.int64)
    inputs = np.zeros((count, 3, CLS_HEIGHT, CLS_WIDTH), dtype=np.float32)
    for i, ((image, _), label) in enumerate(zip(lines, labels)):
        inputs[i] = preprocess_line(image[::-1, ::-1] if label else image, CLS_HEIGHT, CLS_WIDTH)
    return ClsSet(inputs, labels, [text for _, text in lines])


def det_dataset(count: int, seed: int, size: int = DET_PAGE_SIZE) -> DetSet:
    rng = _rng(seed, "det")
    fonts = _Fonts()
    h, w = det_input_size(size, size)
    inputs = np.zeros((count, 3, h, w), dtype=np.float32)
    boxes = []
    for i in range(count):
        page, page_boxes, _ = render_page(rng, fonts, size)
        inputs[i] = preprocess_page(page)
        boxes.append(page_boxes)
    return DetSet(inputs, boxes, (size, size))


def dataset(task: str, split: str, count: int | None = None) -> RecSet | ClsSet | DetSet:
    """The default calibration (``split="calib"``) or evaluation (``"eval"``) set of a task."""
    if task not in TASKS or split not in DEFAULT_COUNTS:
        raise ValueError(f"task must be one of {TASKS} and split 'calib' or 'eval', got {task!r}, {split!r}")
    count = DEFAULT_COUNTS[split][task] if count is None else count
    seed = CALIB_SEED if split == "calib" else EVAL_SEED
    return {"rec": rec_dataset, "cls": cls_dataset, "det": det_dataset}[task](count, seed)


def save_calibration(path: str | os.PathLike, data: RecSet | ClsSet | DetSet, input_name: str = INPUT_NAME) -> Path:
    """Write the set's model inputs as an ``.npz`` keyed by the input name (for ``--calib-data``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **{input_name: data.inputs})
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------
# Decoding and post-processing
# --------------------------------------------------------------------------


def load_charset(dict_path: str | os.PathLike) -> list[str]:
    """The recognizer's classes: CTC blank (index 0, as ""), the dictionary's lines, then a space."""
    with open(dict_path, "rb") as f:
        lines = [line.decode("utf-8").rstrip("\r\n") for line in f.read().split(b"\n")]
    if lines and lines[-1] == "":  # the file ends with a newline
        lines.pop()
    return ["", *lines, " "]


def ctc_greedy_decode(scores: np.ndarray, charset: Sequence[str]) -> list[str]:
    """Greedy CTC decoding of [N, T, classes] scores: best class per step, repeats merged, blanks (0) dropped."""
    if scores.ndim != 3 or scores.shape[2] != len(charset):
        raise ValueError(f"scores of shape {scores.shape} do not match {len(charset)} classes")
    best = scores.argmax(axis=2)
    texts = []
    for row in best:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        texts.append("".join(charset[i] for i in row[keep]))
    return texts


def db_boxes(
    prob: np.ndarray,
    page_size: tuple[int, int],
    thresh: float = DB_THRESH,
    box_thresh: float = DB_BOX_THRESH,
    unclip_ratio: float = DB_UNCLIP_RATIO,
) -> np.ndarray:
    """Text boxes [k, 4] (x0 y0 x1 y1, page pixels) from one [H, W] probability map."""
    try:
        from scipy import ndimage
    except ImportError:
        raise OcrDataError("scipy is needed for the detector post-process: pip install '.[bench]'") from None
    height, width = prob.shape
    page_h, page_w = page_size
    labels, _ = ndimage.label(prob > thresh, structure=np.ones((3, 3)))  # 8-connected, like cv2 contours
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        # Pixel-center coordinates of the component's extreme pixels, as a contour has them.
        y0, y1 = sl[0].start, sl[0].stop - 1
        x0, x1 = sl[1].start, sl[1].stop - 1
        w, h = x1 - x0, y1 - y0
        if min(w, h) < DB_MIN_SIZE:
            continue
        if prob[y0 : y1 + 1, x0 : x1 + 1].mean() < box_thresh:
            continue
        d = w * h * unclip_ratio / (2.0 * (w + h))
        ex0, ey0, ex1, ey1 = x0 - d, y0 - d, x1 + d, y1 + d
        if min(ex1 - ex0, ey1 - ey0) < DB_MIN_SIZE + 2:
            continue
        box = np.array([ex0 / width * page_w, ey0 / height * page_h, ex1 / width * page_w, ey1 / height * page_h])
        box = np.clip(np.round(box), 0, [page_w - 1, page_h - 1, page_w - 1, page_h - 1])
        if box[2] - box[0] <= 3 or box[3] - box[1] <= 3:  # the package drops boxes this thin
            continue
        boxes.append(box)
    return np.array(boxes, dtype=np.float32).reshape(-1, 4)


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Total edit distance over total reference length."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    total = sum(len(r) for r in references)
    if total == 0:
        raise ValueError("the references are empty")
    return sum(edit_distance(r, h) for r, h in zip(references, hypotheses)) / total


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of x0 y0 x1 y1 boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_boxes(truth: np.ndarray, predicted: np.ndarray, iou_threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """One-to-one matches ``(truth index, predicted index, IoU)`` with IoU >= threshold, pairing
    the highest IoUs first."""
    iou = box_iou(truth, predicted)
    matches = []
    used_t: set[int] = set()
    used_p: set[int] = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        t, p = (int(i) for i in np.unravel_index(flat, iou.shape))
        if iou[t, p] < iou_threshold:
            break
        if t not in used_t and p not in used_p:
            used_t.add(t)
            used_p.add(p)
            matches.append((t, p, float(iou[t, p])))
    return matches


def detection_scores(truth: Sequence[np.ndarray], predicted: Sequence[np.ndarray], iou_threshold: float = 0.5) -> dict:
    """Recall, precision and F1 over a whole set (counts pooled over pages), and the mean IoU of
    the matched boxes (how tightly they agree, which a 0.5 threshold alone does not show)."""
    matches = [m for t, p in zip(truth, predicted) for m in match_boxes(t, p, iou_threshold)]
    return pooled_scores(matches, sum(len(t) for t in truth), sum(len(p) for p in predicted))


def pooled_scores(matches: Sequence[tuple[int, int, float]], n_true: int, n_pred: int) -> dict:
    """Recall, precision, F1 and mean matched IoU from the matches of a whole set."""
    recall = len(matches) / n_true if n_true else 0.0
    precision = len(matches) / n_pred if n_pred else 0.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return {
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "matched_mean_iou": float(np.mean([m[2] for m in matches])) if matches else 0.0,
        "boxes_true": n_true,
        "boxes_predicted": n_pred,
    }


def binary_map_iou(maps_a: np.ndarray, maps_b: np.ndarray, thresh: float = DB_THRESH) -> float:
    """IoU of two sets of probability maps binarized at ``thresh`` (pixels pooled over the set)."""
    a, b = maps_a > thresh, maps_b > thresh
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def make_session(model):
    """An onnxruntime CPU session from a path, an ``onnx.ModelProto`` or a session (returned as is)."""
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_model(model, inputs: np.ndarray, batch: int) -> np.ndarray:
    session = make_session(model)
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)]
    return np.concatenate(outputs, axis=0)


def evaluate_rec(model, data: RecSet, charset: Sequence[str] | None = None, batch: int = 32) -> dict:
    if charset is None:
        from models import zoo

        charset = load_charset(zoo.fetch("ppocrv5-dict"))
    predictions = ctc_greedy_decode(run_model(model, data.inputs, batch), charset)
    exact = [p == t for p, t in zip(predictions, data.texts)]
    return {
        "line_accuracy": float(np.mean(exact)),
        "cer": character_error_rate(data.texts, predictions),
        "samples": len(data.texts),
        "predictions": predictions,
    }


def evaluate_cls(model, data: ClsSet, batch: int = 64) -> dict:
    scores = run_model(model, data.inputs, batch)
    predicted = scores.argmax(axis=1)
    return {"accuracy": float(np.mean(predicted == data.labels)), "samples": len(data.labels)}


def evaluate_det(model, data: DetSet, reference=None, batch: int = 4) -> dict:
    """Box recall/precision/F1 at IoU 0.5; with ``reference`` (another model), also the IoU of the
    binarized probability maps against it (``map_iou_vs_reference``)."""
    maps = run_model(model, data.inputs, batch)[:, 0]
    predicted = [db_boxes(m, data.page_size) for m in maps]
    result = detection_scores(data.boxes, predicted)
    result["pages"] = len(data.boxes)
    if reference is not None:
        result["map_iou_vs_reference"] = binary_map_iou(maps, run_model(reference, data.inputs, batch)[:, 0])
    return result


def evaluate(model, data: RecSet | ClsSet | DetSet, **kwargs) -> dict:
    """Metrics of ``model`` (path, ModelProto or session) on a data set, on onnxruntime's CPU provider."""
    if isinstance(data, RecSet):
        return evaluate_rec(model, data, **kwargs)
    if isinstance(data, ClsSet):
        return evaluate_cls(model, data, **kwargs)
    if isinstance(data, DetSet):
        return evaluate_det(model, data, **kwargs)
    raise TypeError(f"not an OCR data set: {type(data).__name__}")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _format(metrics: dict) -> str:
    return ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "predictions"
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.ocr", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    calib = sub.add_parser("calib", help="write rec_calib.npz, cls_calib.npz, det_calib.npz (input 'x')")
    calib.add_argument("--out", required=True, metavar="DIR")
    for task in TASKS:
        calib.add_argument(
            f"--{task}", type=_positive, default=DEFAULT_COUNTS["calib"][task], metavar="N", help="samples"
        )
    ev = sub.add_parser("eval", help="metrics of models on the evaluation set")
    ev.add_argument("task", choices=TASKS)
    ev.add_argument("models", nargs="*", metavar="MODEL", help="ONNX files (default: the cached float model)")
    ev.add_argument("--count", type=_positive, help="evaluation samples (default: rec/cls 300, det 64)")
    ev.add_argument("--reference", metavar="MODEL", help="det: also the binarized-map IoU against this model")
    ev.add_argument("--cache", metavar="DIR", help="zoo cache root (see models/zoo.py)")
    ev.add_argument("--show-errors", type=int, default=0, metavar="K", help="rec: print K misread lines")
    args = parser.parse_args(argv)

    from models import zoo

    try:
        if args.command == "calib":
            for task in TASKS:
                path = save_calibration(
                    Path(args.out) / f"{task}_calib.npz", dataset(task, "calib", getattr(args, task))
                )
                print(path)
            return 0
        models = args.models or [zoo.fetch(f"ppocrv5-{args.task}", args.cache)]
        missing = [m for m in models if not Path(m).is_file()]
        if missing:
            raise OcrDataError(f"no such model file: {missing[0]}")
        data = dataset(args.task, "eval", args.count)
        kwargs: dict = {}
        if args.task == "rec":
            kwargs["charset"] = load_charset(zoo.fetch("ppocrv5-dict", args.cache))
        if args.task == "det" and args.reference:
            kwargs["reference"] = args.reference
        for model in models:
            try:
                metrics = evaluate(model, data, **kwargs)
            except Exception as exc:  # noqa: BLE001  (onnxruntime's errors derive from Exception only)
                text = str(exc).strip().splitlines()
                raise OcrDataError(f"{model}: {text[0] if text else type(exc).__name__}") from None
            print(f"{model}: {_format(metrics)}")
            if args.task == "rec" and args.show_errors:
                wrong = [(t, p) for t, p in zip(data.texts, metrics["predictions"]) if t != p]
                for truth, got in wrong[: args.show_errors]:
                    print(f"  {truth!r} -> {got!r}")
    except (OcrDataError, zoo.ZooError) as exc:
        print(f"models.ocr: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
