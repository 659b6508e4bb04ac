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

from models import digits


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
