"""Models whose weights live in ONNX external data files: they load (after their data locations
are checked), compile and run like the same model in one file; the output goes to a data file
beside it when asked (or beyond protobuf's limit), written with the model and report or not at
all; and a location that could read outside the model's folder is refused before any read."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

import ocs_onnx
import ocs_onnx.passes.verify
from models import builders
from ocs_onnx import errors, gs_adapter, loading, writing
from ocs_onnx.cli import main
from ocs_onnx.compiler import compile_graph
from tools.scale import transformer_stack


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def save_external(model: onnx.ModelProto, folder: Path, name: str = "model.onnx", location: str | None = None) -> Path:
    """The model saved with every tensor of 1 KiB or more in one data file (onnx's own writer)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(model, str(path), save_as_external_data=True, location=location or f"{name}.data")
    return path


def external_tensors(path: Path) -> dict[str, ExternalDataInfo]:
    model = onnx.load(str(path), load_external_data=False)
    return {t.name: ExternalDataInfo(t) for t in model.graph.initializer if uses_external_data(t)}


def session_outputs(path: Path, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


COMPILE = ["--wbits", "6", "--calib-samples", "8", "-q"]


def test_a_model_with_external_data_compiles_to_what_the_same_model_in_one_file_compiles_to(tmp_path, capsys):
    inline = tmp_path / "inline.onnx"
    onnx.save(builders.transformer_block(), str(inline))
    external = save_external(builders.transformer_block(), tmp_path / "ext")
    assert len(external_tensors(external)) >= 6  # the weights really are in the data file
    assert run_cli(capsys, "compile", inline, *COMPILE) == (0, "")
    assert run_cli(capsys, "compile", external, *COMPILE, "--report", tmp_path / "r.json") == (0, "")
    assert (tmp_path / "ext" / "model.q.onnx").read_bytes() == (tmp_path / "inline.q.onnx").read_bytes()
    report = json.loads((tmp_path / "r.json").read_text())
    # the input's size counts its data file
    data_bytes = (tmp_path / "ext" / "model.onnx.data").stat().st_size
    assert report["totals"]["model_bytes_before"] >= data_bytes > report["totals"]["model_bytes_after"] / 2
    assert report["output_data"] is None


def test_weights_at_offsets_that_are_not_a_multiple_of_their_element_size_compile(tmp_path, capsys):
    model = builders.mlp_gemm()
    # 1025 bytes first in the data file: every float weight after them starts at an odd offset
    model.graph.initializer.insert(0, numpy_helper.from_array(np.arange(1025, dtype=np.uint8), "odd_bytes"))
    onnx.save(model, str(tmp_path / "inline.onnx"))
    path = save_external(model, tmp_path / "ext")
    assert all(info.offset % 4 for name, info in external_tensors(path).items() if name.endswith("weight"))
    assert run_cli(capsys, "compile", tmp_path / "inline.onnx", *COMPILE) == (0, "")
    assert run_cli(capsys, "compile", path, *COMPILE) == (0, "")
    assert (tmp_path / "ext" / "model.q.onnx").read_bytes() == (tmp_path / "inline.q.onnx").read_bytes()


def test_the_output_with_external_data_loads_and_computes_what_the_one_file_output_computes(tmp_path, capsys):
    model = save_external(builders.transformer_block(d_model=64, d_ff=256), tmp_path)
    before = {p.name: sha256(p) for p in tmp_path.iterdir()}
    assert run_cli(capsys, "compile", model, *COMPILE, "-o", tmp_path / "one.onnx") == (0, "")
    code, err = run_cli(
        capsys,
        "compile",
        model,
        *COMPILE,
        "-o",
        tmp_path / "q.onnx",
        "--external-data",
        "--report",
        tmp_path / "r.json",
    )
    assert (code, err) == (0, "")
    data = tmp_path / "q.onnx.data"
    tensors = external_tensors(tmp_path / "q.onnx")
    # every tensor of 1 KiB or more is in the data file beside the model, by a relative name
    assert tensors and {info.location for info in tensors.values()} == {"q.onnx.data"}
    assert sum(info.length for info in tensors.values()) > (tmp_path / "q.onnx").stat().st_size
    assert all(info.offset % 4096 == 0 for info in tensors.values())
    assert max(info.offset + info.length for info in tensors.values()) == data.stat().st_size
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output_data"] == str(data)
    assert report["totals"]["model_bytes_after"] == (tmp_path / "q.onnx").stat().st_size + data.stat().st_size
    feed = builders.random_inputs(builders.transformer_block(d_model=64, d_ff=256), batch=3, seq=5)
    for expected, actual in zip(
        session_outputs(tmp_path / "one.onnx", feed), session_outputs(tmp_path / "q.onnx", feed)
    ):
        np.testing.assert_array_equal(actual, expected)
    # loaded back, it is the one-file output
    loaded, one_file = onnx.load(str(tmp_path / "q.onnx")).graph, onnx.load(str(tmp_path / "one.onnx")).graph
    assert loaded.node == one_file.node and loaded.value_info == one_file.value_info
    assert [(t.name, t.data_type, list(t.dims), t.raw_data) for t in loaded.initializer] == [
        (t.name, t.data_type, list(t.dims), t.raw_data) for t in one_file.initializer
    ]
    # the input and its data file are untouched
    assert {name: sha256(tmp_path / name) for name in before} == before


def test_an_output_beyond_protobufs_limit_goes_to_a_data_file_unasked(tmp_path, capsys, monkeypatch):
    model = save_external(builders.mlp_gemm(), tmp_path)
    assert run_cli(capsys, "compile", model, *COMPILE, "-o", tmp_path / "asked.onnx", "--external-data") == (0, "")
    monkeypatch.setattr(writing, "PROTOBUF_LIMIT", 4096)  # this model's weights do not fit below it
    monkeypatch.setattr(writing, "PROTOBUF_MARGIN", 0)
    assert run_cli(capsys, "compile", model, *COMPILE, "-o", tmp_path / "unasked.onnx") == (0, "")
    assert Path(f"{tmp_path}/unasked.onnx.data").read_bytes() == Path(f"{tmp_path}/asked.onnx.data").read_bytes()
    assert {info.location for info in external_tensors(tmp_path / "unasked.onnx").values()} == {"unasked.onnx.data"}


def test_external_data_output_bytes_are_identical_across_processes_with_different_hash_seeds(tmp_path):
    model = save_external(builders.mlp_gemm(), tmp_path)
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"q{seed}.onnx"
        command = [sys.executable, "-m", "ocs_onnx", "compile", str(model), "-o", str(out), "--external-data", *COMPILE]
        env = dict(os.environ, PYTHONHASHSEED=seed)
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)  # cwd: the installed ocs_onnx, not the checkout's folder
        assert result.returncode == 0, result.stderr
        # the model names its data file, so only the data bytes can be compared directly
        outputs.append((out.read_bytes().replace(b"q1.onnx.data", b"q2.onnx.data"), Path(f"{out}.data").read_bytes()))
    assert outputs[0] == outputs[1]


def test_a_large_output_is_verified_from_a_mapped_copy_that_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    model = save_external(builders.transformer_block(), tmp_path)
    assert (
        run_cli(capsys, "compile", model, *COMPILE, "-o", tmp_path / "inline.onnx", "--report", tmp_path / "a.json")[0]
        == 0
    )
    monkeypatch.setattr(ocs_onnx.passes.verify, "INLINE_SESSION_BYTES", 0)
    listing = set(os.listdir(tmp_path))
    assert (
        run_cli(capsys, "compile", model, *COMPILE, "-o", tmp_path / "mapped.onnx", "--report", tmp_path / "b.json")[0]
        == 0
    )
    assert set(os.listdir(tmp_path)) - listing == {"mapped.onnx", "b.json"}
    inline, mapped = (json.loads((tmp_path / name).read_text())["onnxruntime"] for name in ("a.json", "b.json"))
    assert mapped == inline and mapped["integer_kernels"] == 6


@pytest.mark.parametrize(
    "make", [builders.transformer_block, builders.constant_weights_net], ids=["opset 17", "opset 11"]
)
def test_large_weights_left_out_of_the_graph_copies_change_nothing(make, monkeypatch):
    # The checker, shape inference, the opset converter and calibration see large weights as
    # typed graph inputs, calibration feeding them from the arrays; here every weight of 1 KiB or
    # more is "large".
    model = make()
    expected, _ = ocs_onnx.compile(model, wbits=5, calib_samples=8)
    monkeypatch.setattr(gs_adapter, "SKELETON_MIN_BYTES", 1024)
    actual, report = ocs_onnx.compile(model, wbits=5, calib_samples=8)
    assert report["normalization"]["opset_out"] >= 13
    assert actual.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    graph, _ = compile_graph(loading.load_model(model), ocs_onnx.CompileConfig(stop_after="infer-shapes"), "x", None)
    assert gs_adapter.graph_skeleton(graph)[1]  # some weights were left out


def test_the_one_file_output_written_tensor_by_tensor_is_protobufs_own_serialization(test_model):
    # The file is streamed (protobuf would hold the weights several times over while
    # serializing); its bytes are exactly what protobuf's deterministic serialization gives.
    _, model = test_model
    source = loading.load_model(model)
    graph, _ = compile_graph(source, ocs_onnx.CompileConfig(wbits=5, calib_samples=4, verify=False), "unused", None)
    write, size = writing.serialized_model(graph)
    stream = io.BytesIO()
    write(stream)
    expected = gs_adapter.graph_to_model(graph).SerializeToString(deterministic=True)
    assert stream.getvalue() == expected and size == len(expected)


def test_a_model_proto_whose_external_data_is_not_loaded_is_refused(tmp_path):
    path = save_external(builders.mlp_gemm(), tmp_path)
    with pytest.raises(errors.OcsError, match="external data is not loaded; pass the model's path") as info:
        ocs_onnx.compile(onnx.load(str(path), load_external_data=False))
    assert info.value.exit_code == errors.INVALID_MODEL
    quantized, _ = ocs_onnx.compile(onnx.load(str(path)), calib_samples=8)  # loaded, it compiles
    assert any(n.op_type == "DequantizeLinear" for n in quantized.graph.node)


# --------------------------------------------------------------------------------------------
# Locations that are refused
# --------------------------------------------------------------------------------------------


def _relocate(path: Path, tensor: str, location: str | None = None, **fields) -> None:
    """Points one tensor's external data elsewhere (or changes its offset/length)."""
    model = onnx.load(str(path), load_external_data=False)
    target = next(t for t in model.graph.initializer if t.name == tensor)
    for entry in target.external_data:
        if entry.key == "location" and location is not None:
            entry.value = location
        if entry.key in fields:
            entry.value = str(fields.pop(entry.key))
    for key, value in fields.items():
        target.external_data.add(key=key, value=str(value))
    path.write_bytes(model.SerializeToString())


def _copy_data_outside(folder: Path) -> Path:
    """A copy of the model's data file outside its folder (a secret the model must not read)."""
    outside = folder.parent / "outside"
    outside.mkdir()
    (outside / "secret.data").write_bytes((folder / "model.onnx.data").read_bytes())
    return outside / "secret.data"


def _absolute(folder: Path) -> str:
    return str(_copy_data_outside(folder))


def _dot_dot(folder: Path) -> str:
    _copy_data_outside(folder)
    return "../outside/secret.data"


def _symlinked_file(folder: Path) -> str:
    (folder / "link.data").symlink_to(_copy_data_outside(folder))
    return "link.data"


def _symlinked_folder(folder: Path) -> str:
    (folder / "sub").symlink_to(_copy_data_outside(folder).parent, target_is_directory=True)
    return "sub/secret.data"


def _dot_dot_after_a_symlink(folder: Path) -> str:
    # lexically inside (sub/deeper/.. is sub), but the system resolves '..' after the symlink
    outside = _copy_data_outside(folder).parent
    (outside / "deeper").mkdir()
    (folder / "sub").symlink_to(outside / "deeper", target_is_directory=True)
    (folder / "secret.data").write_bytes(b"")  # what a lexical check would read instead
    return "sub/../secret.data"


def _missing(folder: Path) -> str:
    return "missing.data"


def _a_folder(folder: Path) -> str:
    (folder / "weights").mkdir()
    return "weights"


def _a_fifo(folder: Path) -> str:
    os.mkfifo(folder / "pipe.data")  # opening it would block
    return "pipe.data"


BAD_LOCATIONS = {
    "an absolute path": (_absolute, "is an absolute path"),
    "a path with .. out of the folder": (_dot_dot, "leaves the model's folder"),
    "a symlink to a file outside": (_symlinked_file, "symlink"),
    "a file under a symlinked folder outside": (_symlinked_folder, "symlink"),
    "a .. after a symlink to a folder outside": (_dot_dot_after_a_symlink, "symlink"),
    "a missing file": (_missing, "no such file"),
    "a folder": (_a_folder, "not a regular file"),
    "a named pipe": (_a_fifo, "not a regular file"),
}


@pytest.mark.parametrize("case", sorted(BAD_LOCATIONS))
def test_an_external_data_location_that_could_read_outside_the_model_is_refused(case, tmp_path, capsys):
    make, fragment = BAD_LOCATIONS[case]
    folder = tmp_path / "model"
    path = save_external(builders.mlp_gemm(), folder)
    location = make(folder)
    _relocate(path, "fc1.weight", location)
    before = {p: sha256(p) for p in (path, folder / "model.onnx.data")}
    listing = set(os.listdir(folder))
    code, err = run_cli(capsys, "compile", path, "--report", folder / "r.json")
    assert code == errors.INVALID_MODEL, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocs-onnx: error: "), err
    assert "'fc1.weight'" in lines[0] and repr(location) in lines[0] and fragment in lines[0], lines[0]
    assert set(os.listdir(folder)) == listing  # no output, no report, no temporary file
    assert {p: sha256(p) for p in before} == before


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"offset": 10**9}, "beyond the end of the file"),
        ({"length": 10**9}, "beyond the end of the file"),
        ({"length": 12}, "holds 12 bytes, but its type and shape [64, 8] need 2048"),
        ({"offset": -4}, "bad external data"),
    ],
    ids=["offset", "length", "short", "negative"],
)
def test_an_external_byte_range_that_does_not_fit_the_file_or_the_tensor_is_refused(fields, fragment, tmp_path, capsys):
    path = save_external(builders.mlp_gemm(sizes=(32, 64, 8)), tmp_path)
    _relocate(path, "fc1.weight", **fields)
    listing = set(os.listdir(tmp_path))
    code, err = run_cli(capsys, "compile", path, "--abits", "none", "--no-verify")
    assert code == errors.INVALID_MODEL and "'fc1.weight'" in err and fragment in err, err
    assert len(err.strip().splitlines()) == 1 and set(os.listdir(tmp_path)) == listing


@pytest.mark.parametrize("location", ["sub/../model.onnx.data", "link.data"], ids=["dot-dot", "symlink"])
def test_locations_that_stay_inside_the_folder_are_fine(location, tmp_path, capsys):
    path = save_external(builders.mlp_gemm(), tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.data").symlink_to(tmp_path / "model.onnx.data")
    _relocate(path, "fc1.weight", location)
    assert run_cli(capsys, "compile", path, "--calib-samples", 8, "-q") == (0, "")


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "model.onnx.data"],
        ["-o", "weights.onnx", "--external-data"],
        ["-o", "weights.onnx"],  # a one-file output may still need its data file: refused too
        ["--report", "model.onnx.data"],
    ],
    ids=["output", "output data file", "output data file, one file", "report"],
)
def test_an_output_that_would_overwrite_the_input_data_file_is_refused(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_external(builders.mlp_gemm(), tmp_path, location="model.onnx.data")
    (tmp_path / "weights.onnx.data").symlink_to(tmp_path / "model.onnx.data")  # another name for it
    before, listing = sha256(tmp_path / "model.onnx.data"), set(os.listdir(tmp_path))
    code, err = run_cli(capsys, "compile", "model.onnx", *args)
    assert code == errors.USAGE and "data file of the input model" in err, err
    assert sha256(tmp_path / "model.onnx.data") == before and set(os.listdir(tmp_path)) == listing


def test_a_failure_while_writing_leaves_neither_model_nor_data_nor_report(tmp_path, capsys, monkeypatch):
    model = save_external(builders.mlp_gemm(), tmp_path)
    listing = set(os.listdir(tmp_path))
    real_fsync, calls = os.fsync, []

    def fsync_fails_on_the_data_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_on_the_data_file)
    with pytest.raises(errors.UsageError, match="No space"):
        ocs_onnx.compile_file(
            model, tmp_path / "q.onnx", report_path=tmp_path / "r.json", external_data=True, calib_samples=8
        )
    assert set(os.listdir(tmp_path)) == listing


def test_the_scale_tool_generator_writes_a_transformer_stack_with_external_data(tmp_path):
    path = transformer_stack(tmp_path, blocks=2, d_model=32, n_heads=4)
    tensors = external_tensors(path)
    assert len(tensors) == 2 * 16 and {info.location for info in tensors.values()} == {"model.onnx.data"}
    x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
    (y,) = session_outputs(path, {"x": x})
    assert y.shape == x.shape and np.isfinite(y).all()
    quantized, report = ocs_onnx.compile(path, abits=None)
    assert report["totals"]["quantized_layers"] == 2 * 6


# A data file truncated by another process while the compile has it mapped: reading a page past
# the new end is a bus error (and writing one to a file fails with EFAULT). The stand-in for the other process truncates it right after the
# model was loaded (the passes read it next), or when the output is being written (a layer
# kept float is copied from the mapped file then, with a dump already written).
_TRUNCATING_CLI = """
import os, sys
import ocs_onnx.compiler as compiler
import ocs_onnx.writing as writing
from ocs_onnx.cli import main

data, when = sys.argv[1], sys.argv[2]
if when == "after loading":
    load_model = compiler.load_model
    def load_then_truncate(source):
        loaded = load_model(source)
        os.truncate(data, 1024)
        return loaded
    compiler.load_model = load_then_truncate
else:
    write_pending = writing._write_pending
    def truncate_then_write(files, pending):
        if any(str(path).endswith("model.q.onnx") for path in files):
            os.truncate(data, 1024)
        return write_pending(files, pending)
    writing._write_pending = truncate_then_write
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("when", ["after loading", "while writing the output"])
def test_a_data_file_truncated_while_mapped_is_exit_3_naming_it_and_leaves_nothing(when, tmp_path):
    # weights of 1 MiB and more stay mapped through every pass (smaller ones are copied)
    model = save_external(builders.transformer_block(d_model=576, d_ff=64), tmp_path / "ext")
    data = tmp_path / "ext" / "model.onnx.data"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TMPDIR": str(scratch)}
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, check=True)  # its own .ses file
    scratch_listing = set(os.listdir(scratch))
    listing = set(os.listdir(model.parent))
    size = data.stat().st_size
    args = ["compile", str(model), "-q", "--exclude", "*q_proj*", "--dump-after", "name-nodes"]
    result = subprocess.run(
        [sys.executable, "-c", _TRUNCATING_CLI, str(data), when, *args],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == errors.INVALID_MODEL, result.stderr
    assert result.stderr.splitlines() == [
        f"ocs-onnx: error: {data}: the data file shrank from {size:,} to 1,024 bytes while it was being read; "
        "nothing was written"
    ]
    assert set(os.listdir(model.parent)) == listing  # no output, no dump, no temporary file
    assert set(os.listdir(scratch)) == scratch_listing
