"""The pass manager: pass base class and registry, pipelines, fixed-point groups and instruments."""

from __future__ import annotations

from llmc.pass_manager.base import (
    Pass,
    PassContext,
    PassOptions,
    PassOptionsError,
    PassResult,
    UnknownPassError,
    get_pass_class,
    load_builtin_passes,
    make_pass,
    register_pass,
    registered_passes,
)
from llmc.pass_manager.instruments import DUMP_MODES, DumpIR, Instrument
from llmc.pass_manager.pipeline import (
    FixedPoint,
    PassManager,
    PassRecord,
    Pipeline,
    PipelineReport,
    PipelineSyntaxError,
    run_pipeline,
)

__all__ = [
    "DUMP_MODES",
    "DumpIR",
    "FixedPoint",
    "Instrument",
    "Pass",
    "PassContext",
    "PassManager",
    "PassOptions",
    "PassOptionsError",
    "PassRecord",
    "PassResult",
    "Pipeline",
    "PipelineReport",
    "PipelineSyntaxError",
    "UnknownPassError",
    "get_pass_class",
    "load_builtin_passes",
    "make_pass",
    "register_pass",
    "registered_passes",
    "run_pipeline",
]
