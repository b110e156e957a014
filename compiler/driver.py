"""``llmc compile``: spec -> import -> pipeline -> per-target legalize + emit -> golden check -> artifact.

Everything is written into a staging folder beside the output and moved into place only when the whole
compile (verification included) succeeded; an existing artifact is never touched unless ``force``. IR dumps
and failure reproducers live outside the artifact so that a failed run still leaves them for the user.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.calibration import build_calibration
from llmc.errors import SpecError
from llmc.frontends import ImportedModel, import_model
from llmc.frontends.base import DecoderSpec
from llmc.golden import GoldenReport, compare_runners, load_inputs, make_inputs, raise_if_failed
from llmc.ir import Graph, Summary, clone, save_model, summarize
from llmc.pass_manager import DumpIR, PassContext, PassManager, Pipeline, PipelineReport
from llmc.runtime.runner import OrtRunner
from llmc.spec import Spec, Tolerances
from llmc.targets import get_target
from llmc.targets.base import EmitContext, write_manifest

Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class TargetResult:
    name: str
    artifact: Path
    manifest: dict[str, Any]
    golden: GoldenReport | None
    legalize: PipelineReport
    verify_skipped: str | None = None  # why the golden check could not run here (the target says)


@dataclass
class CompileResult:
    out_dir: Path
    imported: Summary
    optimized: Summary
    pipeline: PipelineReport
    targets: list[TargetResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    dumps: Path | None = None


def _noop(event: str, data: dict[str, Any]) -> None:
    pass


def compile_spec(
    spec: Spec,
    *,
    out: Path | None = None,
    force: bool = False,
    dump_dir: Path | None = None,
    dump_mode: str | None = None,
    verify_each: bool | None = None,
    progress: Progress = _noop,
) -> CompileResult:
    t_start = time.perf_counter()
    out_dir = (out or spec.resolve(spec.output.dir)).resolve()
    if out_dir.exists() and not force:
        raise SpecError(
            f"output folder {out_dir} already exists",
            location=spec.locate(("output", "dir")),
            hint="pass --force to replace it, or choose another output.dir",
        )
    dump_mode = dump_mode or spec.debug.dump_ir
    if dump_dir is None and spec.debug.dump_dir:
        dump_dir = spec.resolve(spec.debug.dump_dir)
    if dump_dir is not None and dump_mode == "none":
        dump_mode = "after-change"
    if dump_mode != "none" and dump_dir is None:
        dump_dir = out_dir.with_name(out_dir.name + ".dumps")
    verify_each = spec.debug.verify_each if verify_each is None else verify_each
    pipeline = Pipeline.parse(spec.pipeline)  # validated at load; parse again for fresh pass instances

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".llmc-staging", dir=out_dir.parent))
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        progress("import", {"source": spec.model.source, "path": spec.model.path})
        imported = import_for_spec(spec, staging / "work")
        graph = imported.graph
        timings["import"] = time.perf_counter() - t0
        before = summarize(graph)
        progress("imported", {"summary": before})

        reference_path = None
        if spec.verify.enabled or spec.output.keep_reference:
            reference_path = staging / "reference" / "model.onnx"
            reference_path.parent.mkdir()
            save_model(graph, reference_path)

        t0 = time.perf_counter()
        calibration = build_calibration(spec, imported)
        instruments = []
        if dump_mode != "none":
            if dump_dir.exists() and any(dump_dir.iterdir()) and not force:
                raise SpecError(
                    f"IR dump folder {dump_dir} already exists and is not empty",
                    location=spec.locate(("debug",)),
                    hint="pass --force, remove it, or choose another --dump-ir folder",
                )
            shutil.rmtree(dump_dir, ignore_errors=True)
            instruments.append(DumpIR(dump_dir, dump_mode))
        failure_dir = dump_dir if dump_dir is not None else Path(tempfile.mkdtemp(prefix="llmc-failure-"))
        manager = PassManager(
            pipeline,
            ctx=PassContext(
                target=None,
                data={"task": imported.task, "calibration": calibration, "decoder": imported.decoder},
            ),
            instruments=instruments,
            verify_each=verify_each,
            failure_dir=failure_dir,
            on_pass_start=lambda p, i: progress("pass", {"name": p.name, "index": i}),
        )
        report = manager.run(graph)
        if dump_dir is None:
            shutil.rmtree(failure_dir, ignore_errors=True)
        timings["pipeline"] = time.perf_counter() - t0
        after = summarize(graph)
        decoder = manager.ctx.data["decoder"]  # as the passes left it (dropped layers, fewer kv heads)

        result = CompileResult(out_dir, before, after, report, timings=timings, dumps=dump_dir)
        names = spec.target_names()
        for i, name in enumerate(names):
            target_graph = graph if i == len(names) - 1 else clone(graph)
            artifact = staging / "artifact" if len(names) == 1 else staging / "artifact" / name
            result.targets.append(
                _build_target(
                    spec,
                    name,
                    target_graph,
                    imported,
                    decoder,
                    artifact,
                    reference_path,
                    report,
                    progress,
                    timings,
                )
            )
        timings["total"] = time.perf_counter() - t_start
        for target in result.targets:
            _write_report(spec, result, target)
        _publish(staging, out_dir, spec.output.keep_reference, len(names) == 1)
        result.targets = [_moved(t, staging / "artifact", out_dir) for t in result.targets]
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def import_for_spec(spec: Spec, work_dir: Path) -> ImportedModel:
    """The spec's model through its frontend (scratch files under ``work_dir``); errors point at model.path."""
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        return import_model(spec.model, spec.base_dir, work_dir)
    except SpecError as exc:
        if exc.location.line is None:
            raise SpecError(exc.detail, location=spec.locate(("model", "path")), hint=exc.hint) from exc
        raise


def _build_target(
    spec: Spec,
    name: str,
    graph: Graph,
    imported: ImportedModel,
    decoder: DecoderSpec | None,
    artifact: Path,
    reference_path: Path | None,
    report: PipelineReport,
    progress: Progress,
    timings: dict[str, float],
) -> TargetResult:
    target = get_target(name, getattr(spec.targets, name))
    t0 = time.perf_counter()
    progress("legalize", {"target": name})
    legalize = PassManager(
        target.legalize_pipeline(),
        ctx=PassContext(
            target=name, data={"max_length": imported.decoder.max_length if imported.decoder else None}
        ),
        first_index=len(report.records) + 1,
    ).run(graph)
    ctx = EmitContext(
        spec_digest=spec.digest(),
        spec_name=spec.name or (spec.file.stem if spec.file else ""),
        task=imported.task,
        source={"kind": imported.source, "path": spec.model.path, **_jsonable(imported.info)},
        decoder=decoder.to_json() if decoder else None,
        assets=imported.assets,
        pipeline_text=Pipeline.parse(spec.pipeline).text(),
        pipeline_report=[_deterministic(r.to_json()) for r in report.records + legalize.records],
    )
    if spec.output.keep_reference:
        ctx.source["reference_onnx"] = (
            "reference/model.onnx" if artifact.name == "artifact" else "../reference/model.onnx"
        )
    manifest = target.emit(graph, artifact, ctx)
    timings[f"emit.{name}"] = time.perf_counter() - t0
    golden = skipped = None
    if spec.verify.enabled and reference_path is not None and hasattr(target, "can_run"):
        skipped = target.can_run()  # why this machine cannot run the artifact (no GPU...), or None
    if skipped:
        progress("verify-skipped", {"target": name, "reason": skipped})
        manifest["verification"] = {"status": "skipped", "reason": skipped}
        write_manifest(artifact, manifest)
    elif spec.verify.enabled and reference_path is not None:
        tolerances = target.verify_tolerances() if hasattr(target, "verify_tolerances") else None
        if tolerances is not None:  # a target whose numbers differ by design (fp16) sets its own
            verify = spec.verify.model_copy(update={"tolerances": Tolerances(**tolerances.model_dump())})
            spec = spec.model_copy(update={"verify": verify})
        t0 = time.perf_counter()
        progress("verify", {"target": name})
        if imported.task == "text-generation" and imported.decoder is not None:
            golden = verify_decoder(
                spec, imported, reference_path, target.load(artifact), candidate_decoder=decoder
            )
        else:
            golden = verify_artifact(spec, reference_path, target.load(artifact))
        timings[f"verify.{name}"] = time.perf_counter() - t0
        raise_if_failed(golden, f"target '{name}'")
    return TargetResult(name, artifact, manifest, golden, legalize, skipped)


def verify_artifact(spec: Spec, reference_path: Path, candidate) -> GoldenReport:
    """Outputs of the compiled model against the reference on the spec's inputs, with the task's metrics
    (per-sample cosine for feature-extraction, top-1 agreement for classification)."""
    v = spec.verify
    task = spec.model.task
    _check_thresholds(spec, task)
    reference = OrtRunner(reference_path, graph_optimization_level="basic")
    if v.inputs:
        feeds = load_inputs(spec.resolve(v.inputs), reference.inputs)
    else:
        feeds = make_inputs(
            reference.inputs, samples=v.samples, seed=v.seed, dims=v.dims, shapes=v.shapes, ranges=v.ranges
        )
    return compare_runners(
        reference, candidate, feeds, v.tolerances, v.per_output, task=task, min_top1=v.min_top1_agreement
    )


def verify_decoder(
    spec: Spec,
    imported: ImportedModel,
    reference_path: Path,
    candidate,
    *,
    candidate_decoder: DecoderSpec | None = None,
) -> GoldenReport:
    """Prefill logits, greedy tokens (teacher-forced and free-running) and perplexity of the compiled
    decoder against the ONNX import and/or PyTorch."""
    from llmc.golden import compare_decoders
    from llmc.runtime.generator import Generator, TorchGenerator
    from llmc.runtime.tokenizer import Tokenizer

    v = spec.verify
    _check_thresholds(spec, "text-generation")
    decoder = imported.decoder
    tokenizer = Tokenizer.from_files(imported.assets) if "tokenizer.json" in imported.assets else None
    prompts = v.prompts if tokenizer is not None else [[1, 2, 3, 4, 5, 6, 7, 8]]
    perplexity_ids = _perplexity_ids(spec, tokenizer)
    references = {}
    if v.reference in ("onnx", "both"):
        runner = OrtRunner(reference_path, graph_optimization_level="basic")
        references["onnx"] = Generator(runner, decoder, tokenizer)
    if v.reference in ("pytorch", "both"):
        references["pytorch"] = TorchGenerator(_pytorch_model(imported), decoder, tokenizer)
    return compare_decoders(
        references,
        Generator(candidate, candidate_decoder or decoder, tokenizer),
        prompts,
        new_tokens=v.new_tokens,
        tolerances=v.tolerances,
        min_agreement=v.min_token_agreement,
        min_free_running=v.min_free_running_agreement,
        perplexity_ids=perplexity_ids,
        perplexity_window=v.perplexity_window,
        max_perplexity_ratio=v.max_perplexity_ratio,
    )


def _check_thresholds(spec: Spec, task: str) -> None:
    """A SpecError for a threshold that the model's task has no metric for."""
    decoder_only = ("min_free_running_agreement", "max_perplexity_ratio")
    wrong = [k for k in decoder_only if task != "text-generation" and getattr(spec.verify, k) is not None]
    if task != "classification" and spec.verify.min_top1_agreement is not None:
        wrong.append("min_top1_agreement")
    if wrong:
        raise SpecError(
            f"verify.{wrong[0]} does not apply to a model with task '{task}'",
            location=spec.locate(("verify", wrong[0])),
            hint="min_top1_agreement is for classification; free-running agreement and perplexity for "
            "text-generation",
        )


def _perplexity_ids(spec: Spec, tokenizer) -> list[int] | None:
    """Token ids of the perplexity text (verify.perplexity_text, else the shipped one), or None when
    perplexity is off (perplexity_tokens: 0) or the model has no tokenizer and no threshold needs it."""
    from llmc.errors import ModelError
    from llmc.metrics import eval_tokens

    v = spec.verify
    if not v.perplexity_tokens:
        if v.max_perplexity_ratio is not None:
            raise SpecError(
                "verify.max_perplexity_ratio needs perplexity_tokens > 0",
                location=spec.locate(("verify", "perplexity_tokens")),
            )
        return None
    if tokenizer is None:
        if v.max_perplexity_ratio is not None:
            raise SpecError(
                "verify.max_perplexity_ratio needs the model's tokenizer.json to read the text, and it has none",
                location=spec.locate(("verify", "max_perplexity_ratio")),
            )
        return None
    path = spec.resolve(v.perplexity_text) if v.perplexity_text else None
    try:
        return eval_tokens(tokenizer, path, v.perplexity_tokens)
    except ModelError as exc:
        where = ("verify", "perplexity_text") if v.perplexity_text else ("verify",)
        raise SpecError(exc.message, location=spec.locate(where)) from None


def _pytorch_model(imported: ImportedModel):
    from llmc.errors import SpecError as _SpecError
    from llmc.frontends.hf import load_hf_model

    folder = imported.info.get("hf_folder") or imported.info.get("gguf_cache") or imported.info.get("path")
    if imported.source not in ("hf", "gguf") or not folder:
        raise _SpecError(f"verify.reference pytorch needs an hf or gguf model, not '{imported.source}'")
    return load_hf_model(Path(folder), task="text-generation")


def _deterministic(record: dict[str, Any]) -> dict[str, Any]:
    """Pass records for the manifest, without wall-clock times (same spec -> same bytes)."""
    return {k: v for k, v in record.items() if k != "seconds"}


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    # the scratch export path and wall-clock export time would make the manifest lie or differ run to run
    dropped = {"path", "onnx_path", "export_seconds"}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items() if k not in dropped}


def _publish(staging: Path, out_dir: Path, keep_reference: bool, single: bool) -> None:
    artifact = staging / "artifact"
    if keep_reference:
        shutil.move(str(staging / "reference"), str(artifact / "reference"))
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.llmc-old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(artifact, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _moved(target: TargetResult, staged_root: Path, out_dir: Path) -> TargetResult:
    target.artifact = out_dir / target.artifact.relative_to(staged_root)
    return target


def explain_lines(records: list[Any]) -> list[str]:
    """Markdown lines: per rewrite pass, what fused and which sites were rejected, and why."""
    lines = []
    for r in records:
        details = r["details"] if isinstance(r, dict) else r.details
        name = r["name"] if isinstance(r, dict) else r.name
        fused = details.get("fused", {})
        rejected = details.get("rejected", [])
        if not fused and not rejected:
            continue
        counts = ", ".join(f"{rule} ×{n}" for rule, n in fused.items()) or "nothing fused"
        lines.append(f"- **{name}**: {counts}")
        for miss in rejected:
            lines.append(f"  - not fused at `{miss['site']}` ({miss['rule']}): {miss['reason']}")
    return lines or ["(no rewrite pass reported sites)"]


def _write_report(spec: Spec, result: CompileResult, target: TargetResult) -> None:
    lines = [
        f"# llmc compile report: {spec.name or (spec.file.stem if spec.file else 'spec')} → {target.name}",
        "",
    ]
    lines += [
        f"- model: `{spec.model.path}` ({spec.model.source}, task {spec.model.task})",
        f"- imported: {result.imported.line()}",
        f"- optimized: {result.optimized.line()}",
        f"- pipeline: `{Pipeline.parse(spec.pipeline).text() or '(empty)'}`",
        "",
        "## Passes",
        "",
        "| # | pass | time (ms) | nodes before | nodes after | changed | stats |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result.pipeline.records + target.legalize.records:
        stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
        lines.append(
            f"| {r.index} | {r.name} | {r.seconds * 1000:.1f} | {r.nodes_before} | {r.nodes_after} | "
            f"{'yes' if r.changed else 'no'} | {stats} |"
        )
    lines += ["", "## Fusion sites", ""] + explain_lines(result.pipeline.records + target.legalize.records)
    lines += ["", "## Verification", ""]
    if target.golden:
        lines.append(target.golden.markdown())
    elif target.verify_skipped:
        lines.append(f"**skipped**: {target.verify_skipped}")
    else:
        lines.append("verification disabled in the spec")
    lines += ["", "## Timings", ""]
    lines += [f"- {k}: {v:.2f} s" for k, v in result.timings.items()]
    files = target.manifest.get("files", {})
    lines += ["", "## Files", ""] + [f"- {k}: {v / 1e6:.2f} MB" for k, v in files.items()]
    (target.artifact / "report.md").write_text("\n".join(lines) + "\n")
