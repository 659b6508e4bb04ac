"""Calibration data: formats, streaming, validation, and synthetic inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import ocs_onnx
from models import builders, digits
from ocs_onnx.calibration import InputSpec, RangeObserver, model_input_specs, open_calibration_data, synthetic_batches
from ocs_onnx.errors import CalibrationDataError
from ocs_onnx.calibration import integer_input_limits

IMAGE = [InputSpec("image", np.dtype(np.float32), ("batch", 1, 8, 8))]


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def test_npz_is_streamed_in_batches_with_the_same_values_as_numpy_load(tmp_path):
    images = _images(37)
    np.savez_compressed(tmp_path / "c.npz", image=images)
    data = open_calibration_data(tmp_path / "c.npz", IMAGE)
    batches = list(data.batches(max_samples=30, batch=8))
    assert [b["image"].shape[0] for b in batches] == [8, 8, 8, 6]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), images[:30])


def test_a_folder_of_npz_and_npy_files_is_read_in_name_order(tmp_path):
    a, b = _images(5, 1), _images(4, 2)
    np.save(tmp_path / "b.npy", b)
    np.savez(tmp_path / "a.npz", image=a)
    data = open_calibration_data(tmp_path, IMAGE)
    assert data.samples == 9
    got = np.concatenate([batch["image"] for batch in data.batches(100, 3)])
    np.testing.assert_array_equal(got, np.concatenate([a, b]))


def test_pickled_object_arrays_are_refused_without_unpickling(tmp_path):
    np.savez(tmp_path / "p.npz", image=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(CalibrationDataError, match="Python objects"):
        open_calibration_data(tmp_path / "p.npz", IMAGE)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"image": np.zeros((0, 1, 8, 8), np.float32)}, "zero samples"),
        ({"image": np.zeros((3, 1, 8, 8), np.int32)}, "dtype"),
        ({"image": np.zeros((3, 2, 8, 8), np.float32)}, "does not match"),
        ({"image": _images(3), "extra": _images(3)}, "unknown"),
    ],
)
def test_mismatching_calibration_arrays_are_refused(tmp_path, arrays, message):
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(CalibrationDataError, match=message):
        open_calibration_data(tmp_path / "c.npz", IMAGE)


def test_inconsistent_sample_counts_between_inputs_are_refused(tmp_path):
    specs = [InputSpec("a", np.dtype(np.float32), ("n", 4)), InputSpec("b", np.dtype(np.float32), ("n", 4))]
    np.savez(tmp_path / "c.npz", a=np.zeros((3, 4), np.float32), b=np.zeros((2, 4), np.float32))
    with pytest.raises(CalibrationDataError, match="different sample counts"):
        open_calibration_data(tmp_path / "c.npz", specs)


def test_a_folder_with_unrelated_files_is_refused(tmp_path):
    np.savez(tmp_path / "a.npz", image=_images(2))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CalibrationDataError, match="unexpected entries"):
        open_calibration_data(tmp_path, IMAGE)


def test_nan_in_calibration_data_is_a_calibration_error(tmp_path):
    images = _images(4)
    images[2, 0, 3, 3] = np.nan
    np.savez(tmp_path / "c.npz", image=images)
    with pytest.raises(CalibrationDataError, match="NaN"):
        ocs_onnx.compile(str(digits.MODEL), calib_data=tmp_path / "c.npz")


def test_calibration_uses_at_most_calib_samples(tmp_path):
    _, report = ocs_onnx.compile(str(digits.MODEL), calib_data=digits.CALIBRATION, calib_samples=40, calib_batch=16)
    assert report["calibration"]["samples"] == 40


def test_synthetic_token_ids_stay_below_the_embedding_table_size():
    model = builders.token_embedding_net(vocab=37)
    graph = ocs_onnx.gs_adapter.model_to_graph(model)
    limits = integer_input_limits(graph)
    assert limits == {"ids": 37}
    batch = next(synthetic_batches(model_input_specs(model), 64, 64, seed=0, int_high=limits))
    assert batch["ids"].dtype == np.int64 and batch["ids"].min() >= 0 and batch["ids"].max() < 37
    assert batch["ids"].shape[0] == 64


def test_synthetic_inputs_are_seeded():
    specs = model_input_specs(builders.transformer_block())
    first = next(synthetic_batches(specs, 4, 4, seed=3, int_high={}))["x"]
    again = next(synthetic_batches(specs, 4, 4, seed=3, int_high={}))["x"]
    other = next(synthetic_batches(specs, 4, 4, seed=4, int_high={}))["x"]
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_running_range_matches_the_range_of_all_batches():
    rng = np.random.default_rng(5)
    chunks = [rng.standard_normal(100) * (i + 1) for i in range(5)]
    observer = RangeObserver()
    for chunk in chunks:
        observer.update(chunk)
    everything = np.concatenate(chunks)
    assert observer.range == (everything.min(), everything.max())


def test_a_model_with_a_fixed_batch_of_one_is_calibrated_sample_by_sample(tmp_path):
    model = onnx.load(str(digits.MODEL))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    _, report = ocs_onnx.compile(model, calib_data=digits.CALIBRATION, calib_samples=10)
    assert report["calibration"]["batch"] == 1 and report["calibration"]["samples"] == 10


def test_activation_ranges_in_the_report_come_from_the_calibration_data(tmp_path):
    images = np.full((8, 1, 8, 8), 0.25, np.float32)
    images[0, 0, 0, 0] = 0.75
    np.savez(tmp_path / "c.npz", image=images)
    _, report = ocs_onnx.compile(str(digits.MODEL), calib_data=Path(tmp_path / "c.npz"))
    assert report["activations"]["image"]["range"] == [0.25, 0.75]
