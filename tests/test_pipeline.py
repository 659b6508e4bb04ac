"""The pass pipeline: each pass's declared contract is checked when a pipeline is built, held to
while it runs, and failures name the pass."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import ocs_onnx
from ocs_onnx import cli
from ocs_onnx.compiler import build_pass_manager
from ocs_onnx.config import CompileConfig
from ocs_onnx.context import CompileContext, Facts, FactError, UniqueNames
from ocs_onnx.facts import LAYERS, TENSOR_TYPES, WEIGHT_SPLITS
from ocs_onnx.gs_adapter import model_to_graph
from ocs_onnx.pass_manager import (
    GraphEffect,
    Pass,
    PassFailure,
    PassManager,
    PipelineOrderError,
    describe_passes,
    passes_markdown,
)
from ocs_onnx.passes import DEFAULT_PASSES

from models import builders

README = Path(__file__).resolve().parents[1] / "README.md"


def _moved(name: str, after: str) -> list[Pass]:
    passes = [p for p in DEFAULT_PASSES if p.name != name]
    moved = next(p for p in DEFAULT_PASSES if p.name == name)
    index = [p.name for p in passes].index(after) + 1
    return passes[:index] + [moved] + passes[index:]


def _inserted(new: Pass, after: str) -> list[Pass]:
    passes = list(DEFAULT_PASSES)
    passes.insert([p.name for p in passes].index(after) + 1, new)
    return passes


def test_the_default_pipeline_satisfies_every_contract():
    manager = build_pass_manager()
    assert manager.names == [p.name for p in DEFAULT_PASSES]


def test_infer_shapes_after_select_layers_is_refused_when_the_pipeline_is_built():
    # Once silently wrong: the layer plans pointed into the graph shape inference replaced, and
    # the output had no DequantizeLinear at all.
    with pytest.raises(PipelineOrderError, match="infer-shapes"):
        build_pass_manager(_moved("infer-shapes", after="select-layers"))


def test_a_pass_replacing_the_graph_between_a_producer_and_its_reader_is_refused_naming_both():
    reload = Pass("reload-graph", "returns a new graph", lambda graph, ctx: None, effect=GraphEffect.REPLACES)
    with pytest.raises(PipelineOrderError) as error:
        build_pass_manager(_inserted(reload, after="select-layers"))
    message = str(error.value)
    assert "'plan-activations' requires 'layers' from 'select-layers'" in message
    assert "'reload-graph' runs in between and replaces the graph" in message


def test_a_rewrite_after_the_activations_are_planned_is_refused():
    # A fold or fusion after planning would leave planned tensor names that no longer exist.
    fuse = Pass("fuse-ops", "rewrites the graph", lambda graph, ctx: None, effect=GraphEffect.REWRITES)
    with pytest.raises(PipelineOrderError) as error:
        build_pass_manager(_inserted(fuse, after="plan-activations"))
    assert "'calibrate' requires 'activation-plan' from 'plan-activations'" in str(error.value)
    assert "'fuse-ops' runs in between and rewrites the graph's structure" in str(error.value)


def test_a_pass_before_the_producer_of_what_it_requires_is_refused():
    with pytest.raises(PipelineOrderError, match="'clip-activations' requires 'weight-splits', which 'weight-ocs' produces after it"):
        build_pass_manager(_moved("weight-ocs", after="qa-split"))


def test_a_missing_producer_is_refused():
    passes = [p for p in DEFAULT_PASSES if p.name != "calibrate"]
    with pytest.raises(PipelineOrderError, match="requires 'activation-statistics', which no pass produces"):
        build_pass_manager(passes)


def test_two_writers_of_one_fact_are_refused():
    second = Pass("second-writer", "writes layers again", lambda graph, ctx: None, produces=(LAYERS,))
    with pytest.raises(PipelineOrderError, match="'select-layers' and 'second-writer' both produce 'layers'"):
        build_pass_manager(list(DEFAULT_PASSES) + [second])


def _context(model: onnx.ModelProto) -> tuple:
    graph = model_to_graph(model)
    return graph, CompileContext(CompileConfig(verify=False), unique_name=UniqueNames(graph))


def test_a_pass_reading_a_fact_it_did_not_declare_fails_naming_itself():
    def peek(graph, ctx):
        ctx.facts[WEIGHT_SPLITS]

    passes = [p for p in DEFAULT_PASSES[:7]] + [Pass("peek", "reads undeclared facts", peek)]
    graph, ctx = _context(builders.mlp_gemm())
    with pytest.raises(PassFailure, match="in pass 'peek' .*reads 'weight-splits' without declaring"):
        PassManager(passes).run(graph, ctx)


def test_a_pass_must_produce_what_it_declares():
    lazy = Pass("lazy", "declares and forgets", lambda graph, ctx: None, produces=(TENSOR_TYPES,))
    graph, ctx = _context(builders.mlp_gemm())
    with pytest.raises(PassFailure, match="in pass 'lazy' .*did not produce tensor-types"):
        PassManager([lazy]).run(graph, ctx)


def test_facts_of_a_replaced_graph_are_invalidated_at_run_time():
    facts = Facts()
    with facts.opened_for("select-layers", (), (LAYERS,)):
        facts[LAYERS] = []
    facts.invalidate(GraphEffect.REPLACES.invalidates)
    with pytest.raises(FactError, match="'layers' is not available"):
        facts[LAYERS]


def test_an_internal_error_inside_a_pass_names_the_pass_and_those_before(tmp_path, monkeypatch, capsys):
    import ocs_onnx.passes.clip_weights as clip_weights

    def broken(*args, **kwargs):
        raise KeyError("fc1.weight")

    monkeypatch.setattr(clip_weights, "clip_thresholds", broken)
    path = tmp_path / "mlp.onnx"
    onnx.save(builders.mlp_gemm(), str(path))
    code = cli.main(["compile", str(path), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert "internal error in pass 'clip-weights' (after upgrade-opset, name-nodes, constants-to-initializers," in err
    assert "weight-ocs, clip-activations): KeyError: 'fc1.weight'" in err
    assert not (tmp_path / "mlp.q.onnx").exists()


def test_stop_after_runs_no_pass_after_it():
    _, report = ocs_onnx.compile(builders.mlp_gemm(), abits=None, stop_after="weight-ocs")
    names = [p.name for p in DEFAULT_PASSES]
    assert list(report["pass_seconds"]) == names[: names.index("weight-ocs") + 1]
    assert report["layers"] and all(layer["scale"] is None for layer in report["layers"])


def test_list_passes_prints_every_pass_with_its_contract(capsys):
    assert cli.main(["compile", "--list-passes"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip("\n") == describe_passes(DEFAULT_PASSES)
    assert "plan-activations" in out and "requires layers, tensor-types, hardswish-fused; produces activation-plan" in out


def test_the_readme_pipeline_table_is_generated_from_the_declarations():
    # Regenerate with: python -c "from ocs_onnx.pass_manager import passes_markdown;
    # from ocs_onnx.passes import DEFAULT_PASSES; print(passes_markdown(DEFAULT_PASSES))"
    assert passes_markdown(DEFAULT_PASSES) in README.read_text()
