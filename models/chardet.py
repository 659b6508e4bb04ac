"""Character-detection benchmark data for ddddocr's detector (``ddddocr-det`` of ``models/zoo.py``):
generated images of scattered characters with their boxes as ground truth, the model's
preprocessing and decoding, and box recall / precision / F1.

The model is a one-class YOLOX detector trained for click captchas: it finds single characters
on busy pictures. Its task here: 3-7 characters per image (ASCII letters and digits), each in one
of the DejaVu fonts of ``models/ocr.py`` (``fonts-dejavu-core``), 34-46 px of ink high, turned by
up to 15 degrees, at a random place with a gap to the others, on a textured background (a
gradient between two random colors, low-frequency blotches, faint strokes, pixel noise); the
character's color differs from what lies behind it by at least 90 gray levels. A character's true
box is its ink's bounding box. Images are 300-520 x 180-340 px, so that the letterbox scales
some up and some down.

Those ranges keep the float model clearly good at the task (F1 about 0.96 on the evaluation
set), so that what quantization loses shows: its recall falls off below about 25 and above about
55 px of ink in its input, with pixel noise beyond a sigma of about 10, and on glyphs that are a
single thin stroke (I J i j l, left out), whose boxes are far from the square CJK glyphs it was
trained on. No CJK characters: no font of that fixed font list has them, and a font picked from
whatever a machine has installed would make the data differ between machines.

Every set is drawn from ``numpy.random.default_rng([seed, STREAM])``: the same seed, size and
Pillow/FreeType version give the same bytes; calibration and evaluation sets use different seeds
(``CALIB_SEED``, ``EVAL_SEED``).

Preprocessing and decoding follow the package's own code (``ddddocr/core/detection_engine.py``,
read from the wheel, re-implemented here in numpy):

- The image is BGR uint8 (the package decodes it with OpenCV). It is scaled by
  ``r = min(416 / h, 416 / w)``, up or down, to ``int(w * r) x int(h * r)`` (bilinear as
  OpenCV's INTER_LINEAR, which rounds in fixed point: some pixels differ by one gray level),
  pasted at the top left of a 416 x 416 canvas filled with 114 (YOLOX's letterbox gray), and fed
  as float32 CHW with values 0..255: no mean, no scaling, BGR channel order kept.
- The output ``[1, 3549, 6]`` holds, per anchor point of the stride-8, 16 and 32 grids (52^2,
  26^2, 13^2 points, row-major, in that order), raw ``(dx, dy, log w, log h)`` and the
  objectness and class probabilities (sigmoids inside the graph). Box center
  ``(grid + (dx, dy)) * stride``, size ``exp(log wh) * stride``; score ``objectness * class``;
  boxes with score > 0.1 survive, then greedy NMS at IoU 0.45 (the package's NMS counts pixels
  inclusively, ``x1 - x0 + 1``, which is kept); boxes are divided by ``r`` and clipped to the image.

Metric: predictions are matched greedily in descending score order, each to the unmatched true
box it overlaps most, when that IoU is >= 0.5 (PASCAL VOC style); recall, precision and F1 are
pooled over the set.

Command line (from the repository root)::

    python -m models.chardet calib --out FILE.npz   # the calibration set, keyed "images"
    python -m models.chardet eval [MODEL ...]       # default MODEL: the cached float model
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.ocr import OcrDataError, _Fonts, _overlap, _pil, box_iou, make_session, pooled_scores, resize_bilinear

# --------------------------------------------------------------------------
# Constants of the model (from the package's code)
# --------------------------------------------------------------------------

INPUT_NAME = "images"
INPUT_SIZE = 416
PAD_VALUE = 114
STRIDES = (8, 16, 32)
SCORE_THRESH = 0.1
NMS_THRESH = 0.45
IOU_THRESH = 0.5

# A stream of its own, apart from models/ocr.py's task streams (1-3), so that no set here
# replays the draws of an OCR set with the same seed.
STREAM = 4
CALIB_SEED = 1000
EVAL_SEED = 2000
DEFAULT_COUNTS = {"calib": 64, "eval": 128}

# Letters and digits less the glyphs that are a single thin stroke (I J i j l).
CHARACTERS = "ABCDEFGHKLMNOPQRSTUVWXYZabcdefghkmnopqrstuvwxyz0123456789"
CHARS_PER_IMAGE = (3, 7)
INK_HEIGHTS = (34, 46)  # a character's ink height in image pixels, before rotation and letterbox
_PROBE_SIZE = 64  # the font size at which a glyph's height is measured
MAX_ROTATION_DEG = 15.0
# Image sizes (width, height) range: captcha-like pictures, wider than high, scaled up or down
# by the letterbox.
WIDTHS = (300, 520)
HEIGHTS = (180, 340)
# Foreground and background differ at least this much in mean gray level.
MIN_CONTRAST = 90.0
BLOTCH_AMPLITUDE = (20.0, 70.0)  # gray levels, per channel
STROKES = (2, 7)  # faint lines across the image
NOISE_SIGMA = (1.0, 6.0)  # pixel noise


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _glyph(rng: np.random.Generator, fonts: _Fonts, char: str, height: int) -> np.ndarray:
    """The character's coverage (0..1, float32) in a random font, its ink ``height`` pixels high
    before a random small rotation, cropped to its ink.

    The size is set by the ink, not the font size: the model was trained on CJK glyphs, which fill
    their em box, and a lowercase "o" at a given font size is half as high as an "H"."""
    Image, ImageDraw, _ = _pil()
    index = int(rng.integers(len(fonts.paths)))
    left, top, right, bottom = fonts.get(index, _PROBE_SIZE).getbbox(char)
    size = max(4, round(_PROBE_SIZE * height / max(1, bottom - top)))
    font = fonts.get(index, size)
    left, top, right, bottom = font.getbbox(char)
    pad = max(right - left, bottom - top)
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), char, fill=255, font=font)
    angle = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    canvas = canvas.rotate(angle, resample=Image.Resampling.BILINEAR)
    box = canvas.getbbox()
    return np.asarray(canvas.crop(box), dtype=np.float32) / 255.0


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """A random field in 0..1 that varies over about ``cells`` cells per side (bilinear upsampling
    of a coarse grid of random values)."""
    coarse = rng.random((cells + 1, cells + 1, 1)) * 255.0
    fine = resize_bilinear(coarse.astype(np.uint8), height, width)[:, :, 0]
    return fine.astype(np.float32) / 255.0


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured BGR float image: a gradient between two colors, blotches, faint strokes."""
    a, b = rng.uniform(0.0, 255.0, size=(2, 3))
    t = _smooth_field(rng, height, width, 2)[:, :, None]
    image = a + (b - a) * t
    blotches = _smooth_field(rng, height, width, int(rng.integers(4, 12)))[:, :, None] - 0.5
    image += blotches * rng.uniform(*BLOTCH_AMPLITUDE, size=3)
    Image, ImageDraw, _ = _pil()
    strokes = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(strokes)
    for _ in range(int(rng.integers(STROKES[0], STROKES[1] + 1))):
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        draw.line(points, fill=int(rng.integers(60, 256)), width=int(rng.integers(1, 3)))
    stroke = np.asarray(strokes, dtype=np.float32)[:, :, None] / 255.0
    color = rng.uniform(0.0, 255.0, size=3)
    image += (color - image) * stroke * 0.5
    return image


def _foreground(rng: np.random.Generator, behind: np.ndarray) -> np.ndarray:
    """A BGR color whose gray level differs from the mean gray of ``behind`` by at least
    ``MIN_CONTRAST``: a character the eye (and the model) can tell from its background."""
    level = float(behind.mean())
    for _ in range(20):
        color = rng.uniform(0.0, 255.0, size=3)
        if abs(color.mean() - level) >= MIN_CONTRAST:
            return color
    return np.full(3, 0.0 if level > 127.5 else 255.0)


def render_image(rng: np.random.Generator, fonts: _Fonts) -> tuple[np.ndarray, np.ndarray, str]:
    """One image: (uint8 HxWx3 BGR, boxes [k, 4] as x0 y0 x1 y1 in pixels, the k characters).

    Each character keeps a margin of a quarter of its ink height around its box, so two boxes are
    at least the sum of their margins apart (touching characters are one blob to a detector); one
    that finds no free place in 30 tries is left out.
    """
    width = int(rng.integers(WIDTHS[0], WIDTHS[1] + 1))
    height = int(rng.integers(HEIGHTS[0], HEIGHTS[1] + 1))
    image = _background(rng, height, width)
    boxes: list[tuple[float, float, float, float]] = []
    guards: list[tuple[float, float, float, float]] = []
    chars = []
    for _ in range(int(rng.integers(CHARS_PER_IMAGE[0], CHARS_PER_IMAGE[1] + 1))):
        char = CHARACTERS[int(rng.integers(len(CHARACTERS)))]
        size = int(rng.integers(INK_HEIGHTS[0], INK_HEIGHTS[1] + 1))
        ink = _glyph(rng, fonts, char, size)
        h, w = ink.shape
        for _attempt in range(30):
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            margin = size / 4
            guard = (x - margin, y - margin, x + w + margin, y + h + margin)
            if not any(_overlap(guard, other) for other in guards):
                region = image[y : y + h, x : x + w]
                color = _foreground(rng, region)
                region += (color - region) * ink[:, :, None]
                boxes.append((float(x), float(y), float(x + w), float(y + h)))
                guards.append(guard)
                chars.append(char)
                break
    image += rng.normal(0.0, rng.uniform(*NOISE_SIGMA), size=image.shape)
    out = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return out, np.array(boxes, dtype=np.float32).reshape(-1, 4), "".join(chars)


# --------------------------------------------------------------------------
# Preprocessing and decoding
# --------------------------------------------------------------------------


def letterbox_ratio(height: int, width: int, size: int = INPUT_SIZE) -> float:
    return min(size / height, size / width)


def preprocess(image: np.ndarray, size: int = INPUT_SIZE) -> tuple[np.ndarray, float]:
    """An image (uint8 HxWx3, BGR) as the model input (float32 3 x size x size, 0..255) and the
    scale ``r`` that maps image pixels to input pixels."""
    h, w = image.shape[:2]
    r = letterbox_ratio(h, w, size)
    new_h, new_w = int(h * r), int(w * r)
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[:new_h, :new_w] = resize_bilinear(image, new_h, new_w)
    return canvas.transpose(2, 0, 1).astype(np.float32), r


def anchor_grid(size: int = INPUT_SIZE, strides: tuple[int, ...] = STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """The anchor points' grid cells ``[P, 2]`` (x, y) and strides ``[P]``, in the output's order."""
    cells, steps = [], []
    for stride in strides:
        n_y, n_x = size // stride, size // stride
        ys, xs = np.meshgrid(np.arange(n_y), np.arange(n_x), indexing="ij")
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        steps.append(np.full(n_y * n_x, stride))
    return np.concatenate(cells).astype(np.float32), np.concatenate(steps).astype(np.float32)


def decode(output: np.ndarray, size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``[P, 4]`` (x0 y0 x1 y1, input pixels) and scores ``[P]`` of one image's raw output
    ``[P, 5 + classes]``; the score is objectness times the best class probability."""
    cells, strides = anchor_grid(size)
    if output.ndim != 2 or output.shape[0] != len(cells) or output.shape[1] < 6:
        raise ValueError(f"an output of shape {output.shape} is not [{len(cells)}, 5 + classes]")
    center = (output[:, :2] + cells) * strides[:, None]
    half = np.exp(output[:, 2:4]) * strides[:, None] / 2
    scores = output[:, 4] * output[:, 5:].max(axis=1)
    return np.concatenate([center - half, center + half], axis=1), scores


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_THRESH) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first. Areas count
    pixels inclusively (``x1 - x0 + 1``), as the package's NMS does: it suppresses a little more
    between small boxes than continuous areas would."""
    x0, y0, x1, y1 = boxes.T.astype(np.float64)
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        iw = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
        inter = iw * ih
        order = rest[inter / (areas[best] + areas[rest] - inter) <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def detect(
    output: np.ndarray,
    ratio: float,
    image_size: tuple[int, int],
    score_thresh: float = SCORE_THRESH,
    nms_thresh: float = NMS_THRESH,
) -> tuple[np.ndarray, np.ndarray]:
    """Detections of one image: boxes ``[k, 4]`` in image pixels (clipped to its ``(H, W)``) and
    their scores ``[k]``, best first."""
    boxes, scores = decode(output)
    selected = scores > score_thresh
    boxes, scores = boxes[selected], scores[selected]
    keep = nms(boxes, scores, nms_thresh)
    boxes, scores = boxes[keep] / ratio, scores[keep]
    height, width = image_size
    boxes = np.clip(boxes, 0, [width, height, width, height])
    return boxes.astype(np.float32).reshape(-1, 4), scores.astype(np.float32)


# --------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------


@dataclass
class CharSet:
    inputs: np.ndarray  # float32 [N, 3, 416, 416]
    boxes: list[np.ndarray]  # per image [k, 4] x0 y0 x1 y1 in image pixels
    ratios: np.ndarray  # float64 [N]: the letterbox scale of each image
    image_sizes: np.ndarray  # int64 [N, 2]: (H, W) of each image
    chars: list[str]  # per image, the characters of its boxes in order


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM])


def char_dataset(count: int, seed: int) -> CharSet:
    rng = _rng(seed)
    fonts = _Fonts()
    inputs = np.zeros((count, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    ratios = np.zeros(count)
    sizes = np.zeros((count, 2), dtype=np.int64)
    boxes, chars = [], []
    for i in range(count):
        image, image_boxes, image_chars = render_image(rng, fonts)
        inputs[i], ratios[i] = preprocess(image)
        sizes[i] = image.shape[:2]
        boxes.append(image_boxes)
        chars.append(image_chars)
    return CharSet(inputs, boxes, ratios, sizes, chars)


def dataset(split: str, count: int | None = None) -> CharSet:
    """The default calibration (``split="calib"``) or evaluation (``"eval"``) set."""
    if split not in DEFAULT_COUNTS:
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    count = DEFAULT_COUNTS[split] if count is None else count
    return char_dataset(count, CALIB_SEED if split == "calib" else EVAL_SEED)


def save_calibration(path: str | os.PathLike, data: CharSet, input_name: str = INPUT_NAME) -> Path:
    """Write the set's model inputs as an ``.npz`` keyed by the input name (for ``--calib-data``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **{input_name: data.inputs})
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------
# Metrics and evaluation
# --------------------------------------------------------------------------


def match_by_score(
    truth: np.ndarray, predicted: np.ndarray, scores: np.ndarray, iou_threshold: float = IOU_THRESH
) -> list[tuple[int, int, float]]:
    """Matches ``(truth index, predicted index, IoU)``: predictions in descending score order, each
    taking the still unmatched true box it overlaps most if that IoU is >= the threshold. A
    confident duplicate thus uses up the box before a weaker one can."""
    iou = box_iou(truth, predicted)
    free = np.ones(len(iou), dtype=bool)
    matches = []
    for p in np.argsort(-np.asarray(scores), kind="stable"):
        if not free.any():
            break
        candidates = np.where(free, iou[:, p], -1.0)
        t = int(candidates.argmax())
        if candidates[t] >= iou_threshold:
            free[t] = False
            matches.append((t, int(p), float(iou[t, p])))
    return matches


def detection_scores(
    truth: list[np.ndarray], predicted: list[np.ndarray], scores: list[np.ndarray], iou_threshold: float = IOU_THRESH
) -> dict:
    """Recall, precision and F1 pooled over a set, and the mean IoU of the matched boxes."""
    matches = [m for t, p, s in zip(truth, predicted, scores) for m in match_by_score(t, p, s, iou_threshold)]
    return pooled_scores(matches, sum(len(t) for t in truth), sum(len(p) for p in predicted))


def run_model(model, inputs: np.ndarray, batch: int = 8) -> np.ndarray:
    """The model's first output on ``inputs``, in batches (of the model's batch size when its
    input declares a fixed one, as this model's does: 1)."""
    session = make_session(model)
    declared = session.get_inputs()[0].shape[0]
    if isinstance(declared, int) and declared > 0:
        batch = declared
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)]
    return np.concatenate(outputs, axis=0)


def evaluate(model, data: CharSet) -> dict:
    """Box recall/precision/F1 at IoU 0.5 of ``model`` (path, ModelProto or session) on the set."""
    outputs = run_model(model, data.inputs)
    predicted, scores = [], []
    for output, ratio, size in zip(outputs, data.ratios, data.image_sizes):
        boxes, box_scores = detect(output, float(ratio), (int(size[0]), int(size[1])))
        predicted.append(boxes)
        scores.append(box_scores)
    result = detection_scores(data.boxes, predicted, scores)
    result["images"] = len(data.boxes)
    return result


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.chardet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    calib = sub.add_parser("calib", help=f"write the calibration set (input {INPUT_NAME!r})")
    calib.add_argument("--out", required=True, metavar="FILE")
    calib.add_argument("--count", type=_positive, default=DEFAULT_COUNTS["calib"], metavar="N", help="images")
    ev = sub.add_parser("eval", help="metrics of models on the evaluation set")
    ev.add_argument("models", nargs="*", metavar="MODEL", help="ONNX files (default: the cached float model)")
    ev.add_argument("--count", type=_positive, default=DEFAULT_COUNTS["eval"], metavar="N", help="images")
    ev.add_argument("--cache", metavar="DIR", help="zoo cache root (see models/zoo.py)")
    args = parser.parse_args(argv)

    from models import zoo

    try:
        if args.command == "calib":
            print(save_calibration(args.out, dataset("calib", args.count)))
            return 0
        data = dataset("eval", args.count)
        for model in args.models or [zoo.fetch("ddddocr-det", args.cache)]:
            metrics = evaluate(model, data)
            text = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            print(f"{model}: {text}")
    except (OcrDataError, zoo.ZooError) as exc:
        print(f"models.chardet: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
