"""Calibration data as Python objects (the API): an onnxruntime ``CalibrationDataReader``, an
iterable of ``{input: array}`` batches, or a callable returning one batch per call, each
compiling to the same bytes as the same data in an .npz."""

from __future__ import annotations

import os

import numpy as np
import pytest
from onnxruntime.quantization import CalibrationDataReader

from ocs_onnx import compile, compile_file
from ocs_onnx.errors import CalibrationDataError

from models import builders, digits

from .conftest import run_model


def _images(count: int = 40) -> np.ndarray:
    with np.load(digits.CALIBRATION) as data:
        return data["image"][:count]


class ImageReader(CalibrationDataReader):
    """As onnxruntime's quantization examples write one: one sample per get_next()."""

    def __init__(self, images: np.ndarray):
        self.enum_data = iter([{"image": image[None]} for image in images])

    def get_next(self):
        return next(self.enum_data, None)


@pytest.fixture(scope="module")
def from_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("npz") / "calib.npz"
    np.savez(path, image=_images())
    model, report = compile(str(digits.MODEL), calib_data=path, wbits=6, rounding_inputs="quantized")
    return model.SerializeToString(), report


def _batches(images: np.ndarray, size: int = 7):
    return [{"image": images[i : i + size]} for i in range(0, len(images), size)]


def _callable(images: np.ndarray):
    batches = iter(_batches(images))
    return lambda: next(batches, None)


@pytest.mark.parametrize(
    "make, source",
    [
        (ImageReader, "data reader ImageReader"),
        (_batches, "iterable list"),
        (lambda images: (batch for batch in _batches(images, 16)), "iterable generator"),
        (_callable, "callable function"),
    ],
)
def test_a_reader_an_iterable_and_a_callable_compile_like_the_same_npz(make, source, from_npz):
    # W6 with Hessian rounding on quantized inputs: the data is read three times
    model, report = compile(str(digits.MODEL), calib_data=make(_images()), wbits=6, rounding_inputs="quantized")
    expected_bytes, expected_report = from_npz
    assert model.SerializeToString() == expected_bytes
    assert report["calibration"]["samples"] == expected_report["calibration"]["samples"] == 40
    assert report["calibration"]["source"] == source == report["config"]["calib_data"]


def test_a_reader_works_with_the_sensitivity_analysis_and_leaves_no_files(tmp_path):
    scratch_before = set(os.listdir(tmp_path))
    output, report = compile_file(digits.MODEL, tmp_path / "q.onnx", calib_data=ImageReader(_images(64)), sensitivity=True)
    assert report["sensitivity"]["held_out_samples"] == 16 and report["calibration"]["samples"] == 48
    assert set(os.listdir(tmp_path)) == scratch_before | {"q.onnx"}


@pytest.mark.parametrize(
    "batches, message",
    [
        ([], "the reader gave no batches"),
        ([[1, 2]], "not a dict of input name -> array"),
        ([{"image": _images(2)}, {"pixels": _images(2)}], "inputs ['pixels'], where the first batch had ['image']"),
        ([{"image": _images(2)}, {"image": _images(2).astype(np.float64)}], "has float64"),
        ([{"image": np.float32(1.0)}], "not a numeric array with a batch axis"),
        ([{"label": _images(2)}], "array names do not match the model inputs"),
        ([{"image": np.full((2, 1, 8, 8), np.nan, dtype=np.float32)}], "NaN"),
    ],
)
def test_bad_batches_are_calibration_data_errors(batches, message):
    with pytest.raises(CalibrationDataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        compile(str(digits.MODEL), calib_data=batches)


def _stateful_model_and_feeds(tmp_path, samples: int = 16):
    model = builders.stateful_lstm_net()
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.normal(size=(samples, 20, 8)).astype(np.float32),  # 16 feeds of 20 frames
        "h": rng.normal(size=(samples, 1, 1, 16)).astype(np.float32) * 0.1,
        "c": rng.normal(size=(samples, 1, 1, 16)).astype(np.float32) * 0.1,
    }
    path = tmp_path / "stacked.npz"
    np.savez(path, **feeds)
    return model, feeds, path


def test_a_model_without_a_batch_axis_calibrates_on_stacked_feeds(tmp_path):
    model, feeds, path = _stateful_model_and_feeds(tmp_path)
    compiled, report = compile(model, calib_data=path)
    assert report["calibration"]["samples"] == 16
    assert [layer["name"] for layer in report["layers"]] == ["proj/matmul", "head/matmul"]
    # the calibrated range of the input is that of the 16 feeds together
    low, high = report["activations"]["x"]["range"]
    assert low == pytest.approx(float(feeds["x"].min())) and high == pytest.approx(float(feeds["x"].max()))
    # the compiled model runs on one feed, as the float model does
    one = {name: array[0] for name, array in feeds.items()}
    expected = run_model(model, one)[0]
    actual = run_model(compiled, one)[0]
    assert actual.shape == (20, 4) and np.abs(expected - actual).max() < 0.05 * np.abs(expected).max()


def test_stacked_feeds_serve_the_sensitivity_analysis_one_feed_a_sample(tmp_path):
    model, _, path = _stateful_model_and_feeds(tmp_path)
    _, report = compile(model, calib_data=path, sensitivity=True, holdout_samples=4)
    assert report["calibration"]["samples"] == 12 and report["sensitivity"]["held_out_samples"] == 4


def test_stacked_and_batched_arrays_do_not_mix(tmp_path):
    model, feeds, _ = _stateful_model_and_feeds(tmp_path)
    path = tmp_path / "mixed.npz"
    np.savez(path, x=feeds["x"], h=feeds["h"][:, 0], c=feeds["c"][:, 0])  # h, c as batches along their first axis
    with pytest.raises(CalibrationDataError, match="stacks whole feeds .* holds a batch"):
        compile(model, calib_data=path)


def test_a_rank_mismatch_says_how_to_give_stacked_feeds(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, image=np.zeros((4, 4, 1, 8, 8), dtype=np.float32).reshape(4, 4, 1, 8, 8, 1))
    with pytest.raises(CalibrationDataError, match="one more axis in front that stacks whole feeds"):
        compile(str(digits.MODEL), calib_data=path)
