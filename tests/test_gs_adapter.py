"""What ocs_onnx/gs_adapter.py assumes of onnx-graphsurgeon's internals, checked on the
installed version (the supported range is pinned in pyproject.toml)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx import gs_adapter
from ocs_onnx.gs_adapter import (
    ComputedConstant,
    ComputedValues,
    graph_from_skeleton,
    graph_skeleton,
    graph_to_model,
    model_to_graph,
)

from models import builders


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_the_installed_onnx_graphsurgeon_is_in_the_pinned_range():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    requirement = next(r for r in pyproject["project"]["dependencies"] if r.startswith("onnx-graphsurgeon"))
    low = re.search(r">=\s*([\d.]+)", requirement).group(1)
    high = re.search(r"(?<![<>=])<\s*([\d.]+)", requirement).group(1)
    installed = _version(importlib.metadata.version("onnx-graphsurgeon"))
    assert _version(low) <= installed < _version(high)


def test_export_without_copies_writes_what_onnx_graphsurgeon_writes():
    # graph_to_model exports weights held as arrays itself; the bytes must be the exporter's.
    model = builders.conv_bn_residual_net()
    expected = gs.export_onnx(gs.import_onnx(model), do_type_check=True)
    actual = graph_to_model(gs.import_onnx(model))
    expected.producer_name, expected.producer_version, expected.ir_version = (
        actual.producer_name,
        actual.producer_version,
        actual.ir_version,
    )
    assert actual.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


def test_a_skeleton_leaves_large_weights_out_and_the_graph_gets_them_back(monkeypatch):
    monkeypatch.setattr(gs_adapter, "SKELETON_MIN_BYTES", 1024)
    model = builders.mlp_gemm()
    graph = model_to_graph(model)
    before = graph_to_model(graph).SerializeToString(deterministic=True)
    skeleton, left_out = graph_skeleton(graph)
    assert left_out and all(t.name not in left_out for t in skeleton.graph.initializer)
    assert {i.name for i in skeleton.graph.input} >= set(left_out)
    rebuilt = graph_from_skeleton(skeleton, left_out)
    constants = {name: t for name, t in rebuilt.tensors().items() if isinstance(t, gs.Constant)}
    assert all(constants[name] is constant for name, constant in left_out.items())  # the objects themselves
    assert {t.name for t in rebuilt.inputs} == {t.name for t in graph.inputs}
    assert graph_to_model(rebuilt).SerializeToString(deterministic=True) == before


def test_computed_values_are_recomputed_on_every_read_and_never_kept():
    reads = []

    def compute():
        reads.append(1)
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    constant = ComputedConstant("w", ComputedValues(compute, (2, 3), np.float32))
    assert constant.shape == (2, 3)
    assert not reads  # the shape is known without computing
    np.testing.assert_array_equal(constant.values, compute())
    constant.values  # noqa: B018
    assert len(reads) == 3
