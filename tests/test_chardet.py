"""The character-detection benchmark (models/chardet.py) for ddddocr's detector.

Nothing here downloads: decoding, NMS and matching run on hand-built tensors and boxes, and the
tests that run the real model skip unless it is already in the zoo cache. Rendering needs Pillow
and the DejaVu fonts (fonts-dejavu-core); those tests skip without them."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from models import chardet, ocr, zoo

# --------------------------------------------------------------------------
# Preprocessing, decoding and NMS (no rendering)
# --------------------------------------------------------------------------


def test_letterbox_scales_to_the_top_left_and_pads_with_gray():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[:] = (10, 20, 30)  # distinct channels: their order must survive
    x, ratio = chardet.preprocess(image)
    assert x.shape == (3, 416, 416) and x.dtype == np.float32
    assert ratio == pytest.approx(416 / 200)
    assert np.all(x[:, :208, :416] == np.array([10, 20, 30], dtype=np.float32)[:, None, None])
    assert np.all(x[:, 208:, :] == chardet.PAD_VALUE)
    # Larger images are scaled down, by the longer side.
    _, ratio = chardet.preprocess(np.zeros((832, 500, 3), dtype=np.uint8))
    assert ratio == pytest.approx(0.5)


def test_anchor_grid_is_row_major_per_stride():
    cells, strides = chardet.anchor_grid()
    assert len(cells) == 52 * 52 + 26 * 26 + 13 * 13 == 3549
    assert cells[0].tolist() == [0, 0] and cells[1].tolist() == [1, 0] and cells[52].tolist() == [0, 1]
    assert strides[2703] == 8 and strides[2704] == 16 and cells[2704].tolist() == [0, 0]
    assert cells[-1].tolist() == [12, 12] and strides[-1] == 32


def _raw_output() -> np.ndarray:
    """An output with nothing in it: zero box offsets, zero objectness."""
    return np.zeros((3549, 6), dtype=np.float32)


def _anchor(output: np.ndarray, index: int, dxy, wh_over_stride, objectness: float, cls: float) -> None:
    output[index] = [dxy[0], dxy[1], math.log(wh_over_stride[0]), math.log(wh_over_stride[1]), objectness, cls]


def test_decode_places_boxes_on_the_grid():
    output = _raw_output()
    _anchor(output, 20 * 52 + 10, (0.5, 0.5), (4, 2), 0.9, 0.8)  # stride 8, cell (10, 20)
    _anchor(output, 2704 + 3 * 26 + 5, (0.0, 0.25), (1, 1), 0.5, 0.5)  # stride 16, cell (5, 3)
    boxes, scores = chardet.decode(output)
    # center (10.5, 20.5) * 8 = (84, 164), size (32, 16)
    np.testing.assert_allclose(boxes[20 * 52 + 10], [68, 156, 100, 172], atol=1e-4)
    # center (5, 3.25) * 16 = (80, 52), size 16
    np.testing.assert_allclose(boxes[2704 + 3 * 26 + 5], [72, 44, 88, 60], atol=1e-4)
    assert scores[20 * 52 + 10] == pytest.approx(0.72)
    assert scores[0] == 0.0
    with pytest.raises(ValueError, match="not \\[3549, 5 \\+ classes\\]"):
        chardet.decode(output[:100])


def test_detect_thresholds_suppresses_rescales_and_clips():
    output = _raw_output()
    _anchor(output, 20 * 52 + 10, (0.5, 0.5), (4, 4), 0.9, 0.8)  # score 0.72, box (68, 148, 100, 180)
    _anchor(output, 20 * 52 + 11, (0.0, 0.5), (4, 4), 0.8, 0.7)  # 4 px to the left, score 0.56: suppressed
    _anchor(output, 2704 + 676 + 2 * 13 + 12, (0.5, 0.5), (2, 2), 0.5, 0.5)  # stride 32, score 0.25
    _anchor(output, 2704 + 100, (0.0, 0.0), (1, 1), 0.3, 0.3)  # score 0.09 < 0.1: dropped
    boxes, scores = chardet.detect(output, ratio=2.0, image_size=(150, 200))
    np.testing.assert_allclose(scores, [0.72, 0.25], rtol=1e-6)
    np.testing.assert_allclose(boxes[0], [34, 74, 50, 90], atol=1e-4)
    # stride-32 box (368, 48, 432, 112) / 2 = (184, 24, 216, 56): clipped to the width 200
    np.testing.assert_allclose(boxes[1], [184, 24, 200, 56], atol=1e-4)
    empty_boxes, empty_scores = chardet.detect(_raw_output(), 1.0, (416, 416))
    assert empty_boxes.shape == (0, 4) and empty_scores.shape == (0,)


def test_nms_keeps_the_best_of_overlapping_boxes_in_score_order():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 4]], dtype=np.float32)
    scores = np.array([0.5, 0.9, 0.3, 0.8])
    # [1] beats [0] (IoU 0.70 with inclusive areas); [3] overlaps [1] by 0.30 only; [2] is apart.
    assert chardet.nms(boxes, scores, 0.45).tolist() == [1, 3, 2]
    assert chardet.nms(boxes, scores, 0.25).tolist() == [1, 2]
    assert chardet.nms(np.zeros((0, 4)), np.zeros(0)).tolist() == []


# --------------------------------------------------------------------------
# Matching and metrics
# --------------------------------------------------------------------------


def test_box_iou_by_hand():
    iou = chardet.box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0, 0.0]])


def test_matching_goes_by_score_not_by_iou():
    truth = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], dtype=np.float32)
    predicted = np.array(
        [
            [0, 0, 10, 10],  # IoU 1 with truth 0, but the weaker of the two on it
            [1, 0, 11, 10],  # IoU 0.82 with truth 0, most confident: takes it
            [52, 50, 62, 60],  # IoU 0.67 with truth 1
            [55, 50, 65, 60],  # IoU 0.33 with truth 1: below 0.5
        ],
        dtype=np.float32,
    )
    scores = np.array([0.6, 0.9, 0.4, 0.8])
    matches = chardet.match_by_score(truth, predicted, scores)
    assert [(t, p) for t, p, _ in matches] == [(0, 1), (1, 2)]
    assert matches[0][2] == pytest.approx(90 / 110)
    result = chardet.detection_scores([truth], [predicted], [scores])
    assert result["recall"] == 1.0 and result["precision"] == 0.5
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["boxes_true"] == 2 and result["boxes_predicted"] == 4


def test_a_prediction_takes_the_free_box_it_overlaps_most():
    truth = np.array([[0, 0, 10, 10], [8, 0, 18, 10]], dtype=np.float32)
    predicted = np.array([[7, 0, 17, 10], [0, 0, 10, 10]], dtype=np.float32)
    matches = chardet.match_by_score(truth, predicted, np.array([0.9, 0.8]))
    assert [(t, p) for t, p, _ in matches] == [(1, 0), (0, 1)]


def test_scores_pool_over_images_and_handle_empty_ones():
    truth = [np.array([[0, 0, 10, 10]], dtype=np.float32), np.zeros((0, 4), dtype=np.float32)]
    none = [np.zeros((0, 4), dtype=np.float32)] * 2
    assert chardet.detection_scores(truth, none, [np.zeros(0)] * 2)["f1"] == 0.0
    predicted = [truth[0], np.array([[0, 0, 5, 5]], dtype=np.float32)]  # one hit, one false alarm
    result = chardet.detection_scores(truth, predicted, [np.ones(1)] * 2)
    assert result["recall"] == 1.0 and result["precision"] == 0.5


# --------------------------------------------------------------------------
# Generated data (needs Pillow and the fonts)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fonts_available():
    pytest.importorskip("PIL")
    try:
        ocr.find_fonts()
    except ocr.OcrDataError as exc:
        pytest.skip(str(exc))


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_dataset_is_deterministic(fonts_available):
    first = chardet.char_dataset(4, seed=5)
    again = chardet.char_dataset(4, seed=5)
    other = chardet.char_dataset(4, seed=6)
    assert _digest(first.inputs, first.ratios, first.image_sizes, *first.boxes) == _digest(
        again.inputs, again.ratios, again.image_sizes, *again.boxes
    )
    assert first.chars == again.chars and first.chars != other.chars
    assert first.inputs.shape == (4, 3, 416, 416) and first.inputs.dtype == np.float32
    assert first.inputs.min() >= 0 and first.inputs.max() <= 255
    for x, ratio, (h, w) in zip(first.inputs, first.ratios, first.image_sizes):
        assert ratio == pytest.approx(416 / max(h, w))
        assert np.all(x[:, int(h * ratio) :, :] == chardet.PAD_VALUE)
        assert np.all(x[:, :, int(w * ratio) :] == chardet.PAD_VALUE)


def test_boxes_are_inside_the_image_and_apart(fonts_available):
    rng = np.random.default_rng(3)
    fonts = ocr._Fonts()
    for _ in range(8):
        image, boxes, chars = chardet.render_image(rng, fonts)
        h, w = image.shape[:2]
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert chardet.WIDTHS[0] <= w <= chardet.WIDTHS[1] and chardet.HEIGHTS[0] <= h <= chardet.HEIGHTS[1]
        assert 1 <= len(boxes) == len(chars) <= chardet.CHARS_PER_IMAGE[1]
        assert set(chars) <= set(chardet.CHARACTERS)
        assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= w) and np.all(boxes[:, 3] <= h)
        assert np.all(boxes[:, 2:] - boxes[:, :2] >= 8)
        iou = chardet.box_iou(boxes, boxes)
        assert np.all(iou[~np.eye(len(boxes), dtype=bool)] == 0)


def test_glyphs_are_cropped_to_their_ink(fonts_available):
    rng = np.random.default_rng(4)
    fonts = ocr._Fonts()
    for char in "Wg0":
        ink = chardet._glyph(rng, fonts, char, 40)
        assert ink.max() == pytest.approx(1.0, abs=0.1)
        for edge in (ink[0], ink[-1], ink[:, 0], ink[:, -1]):
            assert edge.max() > 0
        assert 30 <= max(ink.shape) <= 60  # 40 px of ink, turned by at most 15 degrees


def test_calibration_file_is_keyed_by_the_input_name(fonts_available, tmp_path):
    data = chardet.char_dataset(2, seed=1)
    path = chardet.save_calibration(tmp_path / "chardet.npz", data)
    with np.load(path) as npz:
        assert npz.files == ["images"]
        np.testing.assert_array_equal(npz["images"], data.inputs)


def test_splits_are_checked():
    with pytest.raises(ValueError, match="split must be"):
        chardet.dataset("train")


# --------------------------------------------------------------------------
# The real model, when it is already cached
# --------------------------------------------------------------------------


def _model_or_skip():
    path = zoo.cached("ddddocr-det")
    if path is None:
        pytest.skip("ddddocr-det is not in the zoo cache (python -m models.zoo fetch ddddocr-det)")
    return path


def test_the_model_declares_what_the_decoding_assumes():
    session = ocr.make_session(_model_or_skip())
    (model_input,) = session.get_inputs()
    (model_output,) = session.get_outputs()
    assert model_input.name == chardet.INPUT_NAME and model_input.shape == [1, 3, 416, 416]
    assert model_output.shape == [1, len(chardet.anchor_grid()[0]), 6]


def test_float_model_finds_the_characters(fonts_available):
    metrics = chardet.evaluate(_model_or_skip(), chardet.char_dataset(12, seed=7))
    assert metrics["recall"] >= 0.8 and metrics["precision"] >= 0.9
    assert metrics["images"] == 12
