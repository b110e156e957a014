"""The pass manager: registration, pipelines and their errors, fixed points, the "changed" check, failures
that name the pass and keep dumps, DumpIR files, and custom passes named ``module:Class``."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pytest
from graphs import GraphBuilder, ops
from onnx import TensorProto

from llmc.errors import PassError
from llmc.ir import Graph
from llmc.pass_manager import (
    DumpIR,
    FixedPoint,
    Pass,
    PassContext,
    PassManager,
    PassOptions,
    PassOptionsError,
    PassResult,
    Pipeline,
    PipelineSyntaxError,
    UnknownPassError,
    get_pass_class,
    make_pass,
    register_pass,
    registered_passes,
    run_pipeline,
)

FLOAT = TensorProto.FLOAT


def identities(n: int = 3) -> Graph:
    """x -> Identity^n -> Relu -> y, plus a Constant feeding an Add."""
    b = GraphBuilder()
    b.input("x", FLOAT, [2])
    t = "x"
    for _ in range(n):
        t = b.node("Identity", [t])
    t = b.node("Add", [t, b.constant(np.ones(2, np.float32))])
    b.node("Relu", [t], ["y"])
    b.output("y", FLOAT, [2])
    return b.ir()


# -- passes used by these tests (registered under test- names) ---------------------------------------------
@register_pass("test-peel-one")
class PeelOne(Pass):
    """Rewrites the first Identity into a direct use of its input (one per run: needs a fixed point)."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        for node in graph.find("Identity"):
            graph.replace_all_uses(node.outputs[0], node.inputs[0])
            graph.remove_node(node)
            return PassResult(True, {"peeled": 1})
        return PassResult(False)


@register_pass("test-liar")
class Liar(Pass):
    """Rewrites a graph into one with an extra initializer, and says it did not."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.add_initializer("sneaky", np.zeros(1, np.float32))
        return PassResult(False)


@register_pass("test-raiser")
class Raiser(Pass):
    """Rewrites nothing: raises halfway through."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.add_node("Neg", ["x"], ["half_done"])
        raise ValueError("boom")


@register_pass("test-breaker")
class Breaker(Pass):
    """Rewrites the input of Relu into a value nothing defines."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.set_input(graph.find("Relu")[0], 0, "nowhere")
        return PassResult(True)


@register_pass("test-cycler")
class Cycler(Pass):
    """Rewrites the Add to read the Relu it feeds: a cycle."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.set_input(graph.find("Add")[0], 0, "y")
        return PassResult(True)


class ScaleOptions(PassOptions):
    factor: int = 1
    mode: Literal["fast", "exact"] = "exact"


@register_pass("test-with-options")
class WithOptions(Pass):
    """Rewrites nothing; has options to validate."""

    Options = ScaleOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return PassResult(False, {"factor": self.options.factor})


class CountNodes(Pass):
    """Rewrites nothing; counts nodes (a custom pass, not registered: named as module:Class)."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return PassResult(False, {"nodes": len(graph)})


class NotAPass:
    pass


# -- registry -------------------------------------------------------------------------------------------
def test_registry_lists_the_cleanup_passes():
    names = set(registered_passes())
    assert {
        "fold-constants",
        "eliminate-dead-code",
        "eliminate-common-subexpressions",
        "remove-identity",
    } <= names
    for name, cls in registered_passes().items():
        assert cls.name == name and cls.summary(), name


def test_pass_names_are_kebab_case_and_unique():
    for bad in ("FoldConstants", "fold_constants", "-fold", "fold--constants", "Fold-constants"):
        with pytest.raises(ValueError, match="kebab-case"):
            register_pass(bad)

    class Other(Pass):
        """Rewrites nothing."""

    with pytest.raises(ValueError, match="registered twice"):
        register_pass("fold-constants")(Other)


def test_unknown_passes_suggest_the_closest_name():
    with pytest.raises(UnknownPassError) as info:
        get_pass_class("fold-constant")
    message = str(info.value)
    assert "unknown pass 'fold-constant'" in message and "did you mean 'fold-constants'?" in message
    with pytest.raises(PipelineSyntaxError) as info:
        Pipeline.parse(["eliminate-dead-code", {"fixpoint": ["remove-identiy"]}])
    assert info.value.path == (1, "fixpoint", 0) and info.value.hint == "did you mean 'remove-identity'?"
    with pytest.raises(UnknownPassError, match="llmc passes"):
        get_pass_class("zzzzzz")


def test_custom_passes_by_module_and_class():
    cls = get_pass_class(f"{__name__}:CountNodes")
    assert cls is CountNodes and cls.name == "count-nodes"
    report = run_pipeline(identities(), [f"{__name__}:CountNodes"])
    assert report.records[0].stats == {"nodes": 6}
    with pytest.raises(UnknownPassError, match="cannot import"):
        get_pass_class("no_such_module_anywhere:Pass")
    with pytest.raises(UnknownPassError, match=f"'{__name__}:NotAPass' is n"):
        get_pass_class(f"{__name__}:NotAPass")


# -- options and pipeline syntax ---------------------------------------------------------------------------
def test_options_are_validated():
    assert make_pass("test-with-options", {"factor": 3}).options.factor == 3
    with pytest.raises(PassOptionsError, match=r"'test-with-options': factor: .*integer"):
        make_pass("test-with-options", {"factor": "three"})
    with pytest.raises(PassOptionsError, match="speed: Extra inputs are not permitted"):
        make_pass("test-with-options", {"speed": 1})
    with pytest.raises(PipelineSyntaxError) as info:
        Pipeline.parse(["fold-constants", {"fixpoint": [{"test-with-options": {"mode": "quick"}}]}])
    assert info.value.path == (1, "fixpoint", 0, "test-with-options", "mode")
    with pytest.raises(PipelineSyntaxError, match="must be a mapping"):
        Pipeline.parse([{"test-with-options": [1]}])
    assert Pipeline.parse([{"test-with-options": None}]).steps[0].options.factor == 1


@pytest.mark.parametrize(
    "items, path",
    [
        ([42], (0,)),
        ([{"fixpoint": []}], (0, "fixpoint")),
        ([{"fixpoint": ["remove-identity"], "max_iterations": 0}], (0, "max_iterations")),
        ([{"fixpoint": ["remove-identity"], "until": "done"}], (0,)),
        ([{"remove-identity": {}, "fold-constants": {}}], (0,)),
    ],
)
def test_malformed_pipelines_say_where(items, path):
    with pytest.raises(PipelineSyntaxError) as info:
        Pipeline.parse(items)
    assert info.value.path == path


def test_pipeline_text_reads_like_the_spec():
    pipeline = Pipeline.parse(
        [
            "fold-constants",
            {"fixpoint": [{"test-with-options": {"factor": 2}}, "eliminate-dead-code"], "max_iterations": 3},
        ]
    )
    assert pipeline.text() == "fold-constants,fixpoint(test-with-options{'factor': 2},eliminate-dead-code)"
    assert isinstance(pipeline.steps[1], FixedPoint) and pipeline.steps[1].max_iterations == 3


# -- running ------------------------------------------------------------------------------------------------
def test_fixpoint_groups_run_until_nothing_changes():
    graph = identities(3)
    report = run_pipeline(graph, [{"fixpoint": ["test-peel-one", "eliminate-dead-code"]}])
    assert ops(graph) == ["Constant", "Add", "Relu"]
    peels = [r for r in report.records if r.name == "test-peel-one"]
    assert [r.changed for r in peels] == [True, True, True, False]
    assert [r.iteration for r in peels] == [0, 1, 2, 3]
    assert all(r.verified for r in peels if r.changed)
    assert report.records[0].nodes_before == 6 and report.records[0].nodes_after == 5


def test_fixpoint_groups_that_do_not_converge_warn(caplog):
    graph = identities(3)
    with caplog.at_level(logging.WARNING, logger="llmc.passes"):
        run_pipeline(graph, [{"fixpoint": ["test-peel-one"], "max_iterations": 2}])
    assert "did not converge in 2 iterations" in caplog.text
    assert ops(graph).count("Identity") == 1


def test_a_pass_that_lies_about_unchanged_is_caught():
    with pytest.raises(PassError, match=r"pass 'test-liar': reported 'unchanged' but .* hash moved") as info:
        run_pipeline(identities(), ["test-liar"])
    assert info.value.pass_name == "test-liar"


def test_a_pass_that_raises_names_itself_and_keeps_dumps(tmp_path):
    dump = DumpIR(tmp_path / "dumps")
    with pytest.raises(PassError) as info:
        run_pipeline(
            identities(),
            ["remove-identity", "test-raiser"],
            instruments=[dump],
            failure_dir=tmp_path / "failure",
        )
    err = info.value
    assert err.pass_name == "test-raiser" and "raised ValueError: boom" in str(err)
    names = sorted(p.name for p in err.dumps)
    assert names == [
        "001-remove-identity.after.onnxtxt",  # the last good IR (DumpIR)
        "002-test-raiser.after.onnxtxt",  # the reproducer: before, after, traceback
        "002-test-raiser.before.onnxtxt",
        "002-test-raiser.error.txt",
        "002-test-raiser.failed.onnxtxt",
    ]
    assert all(p.exists() for p in err.dumps) and str(err.dumps[0]) in str(err)
    assert "ValueError: boom" in (tmp_path / "failure/002-test-raiser.error.txt").read_text()
    before = (tmp_path / "failure/002-test-raiser.before.onnxtxt").read_text()
    after = (tmp_path / "failure/002-test-raiser.after.onnxtxt").read_text()
    assert "half_done" not in before and "half_done" in after


def test_a_pass_that_breaks_the_graph_names_itself_and_the_node(tmp_path):
    with pytest.raises(PassError) as info:
        run_pipeline(identities(), ["test-breaker"], failure_dir=tmp_path)
    message = str(info.value)
    assert message.startswith("pass 'test-breaker': left an invalid graph: ")
    assert "'nowhere' is not defined" in message and "at node Relu#" in message
    assert (tmp_path / "001-test-breaker.before.onnxtxt").exists()
    run_pipeline(identities(), ["test-breaker"], verify_each=False)  # the check can be turned off


def test_a_pass_that_creates_a_cycle_is_a_pass_error(tmp_path):
    with pytest.raises(PassError, match="test-cycler.*cycle"):
        run_pipeline(identities(), ["test-cycler"], failure_dir=tmp_path)


def test_a_pass_must_return_a_pass_result():
    class ReturnsNothing(Pass):
        """Rewrites nothing and forgets to say so."""

        name = "returns-nothing"

        def run(self, graph, ctx):
            return None

    with pytest.raises(PassError, match="returns-nothing.*expected PassResult"):
        PassManager(Pipeline([ReturnsNothing()])).run(identities())


# -- DumpIR -----------------------------------------------------------------------------------------------
PIPELINE = ["fold-constants", "eliminate-common-subexpressions", "remove-identity", "eliminate-dead-code"]


def test_dump_ir_after_change(tmp_path):
    run_pipeline(identities(), PIPELINE, instruments=[DumpIR(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000-input.onnxtxt",
        "000-input.summary.txt",
        "001-fold-constants.after.diff",
        "001-fold-constants.after.onnxtxt",
        "001-fold-constants.after.summary.txt",
        "003-remove-identity.after.diff",
        "003-remove-identity.after.onnxtxt",
        "003-remove-identity.after.summary.txt",
    ]
    summary = (tmp_path / "003-remove-identity.after.summary.txt").read_text().splitlines()
    assert summary[0].startswith("2 nodes, 2 params")
    assert summary[1].startswith("-3 Identity; nodes 5 -> 2")
    diff = (tmp_path / "001-fold-constants.after.diff").read_text()
    assert diff.startswith("--- 000-input.onnxtxt\n+++ 001-fold-constants.after.onnxtxt\n")
    assert "-   t3 = Constant <value: tensor = float[2] {1,1}> ()\n" in diff


def test_dump_ir_after_each_and_none(tmp_path):
    run_pipeline(identities(), PIPELINE, instruments=[DumpIR(tmp_path / "each", "after-each")])
    assert len(list((tmp_path / "each").glob("*.onnxtxt"))) == 5
    run_pipeline(identities(), PIPELINE, instruments=[DumpIR(tmp_path / "none", "none")])
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="dump mode"):
        DumpIR(tmp_path, "sometimes")
