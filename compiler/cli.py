"""The ``llmc`` command line: the only place that prints, and where errors become exit codes.

Exit codes: 0 ok, 1 verification failed, 2 bad input (spec, model, pass, target). Anything else is a bug in
llmc: it prints a one-line message, and the traceback only with ``--debug``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmc.errors import LlmcError, ModelError, VerificationError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="llmc: compile LLMs into fast inference artifacts."
)
# Wide when piped (logs, CI): tables of pass names and statistics should not be cut at 80 columns.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)
_state = {"debug": False}


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of internal errors")] = False,
) -> None:
    _state["debug"] = debug


# -- compile --------------------------------------------------------------------------------------------
@app.command()
def compile(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="the YAML plan")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="artifact folder (default: spec output.dir)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing artifact")] = False,
    dump_ir: Annotated[
        Path | None, typer.Option("--dump-ir", help="write numbered IR dumps into this folder")
    ] = None,
    dump_mode: Annotated[str | None, typer.Option(help="after-each | after-change | none")] = None,
    verify_each: Annotated[
        bool | None, typer.Option("--verify-each/--no-verify-each", help="verify after every pass")
    ] = None,
) -> None:
    """Import the model, run the plan, lower to every target, verify, write the artifact."""
    from llmc.driver import compile_spec
    from llmc.pass_manager import DUMP_MODES
    from llmc.spec import load_spec

    if dump_mode is not None and dump_mode not in DUMP_MODES:
        raise typer.BadParameter(f"--dump-mode must be one of {', '.join(DUMP_MODES)}")
    spec = load_spec(spec_path)
    with console.status("compiling") as status:

        def progress(event: str, data: dict) -> None:
            if event == "pass":
                status.update(f"pass {data['index']}: {data['name']}")
            elif event == "imported":
                console.print(f"[bold]imported[/] {data['summary'].line()}")
            else:
                status.update(f"{event} {' '.join(str(v) for v in data.values())}")

        result = compile_spec(
            spec,
            out=out,
            force=force,
            dump_dir=dump_ir,
            dump_mode=dump_mode,
            verify_each=verify_each,
            progress=progress,
        )
    table = Table(title="passes", show_lines=False)
    for col in ("#", "pass", "ms", "nodes before", "nodes after", "changed", "stats"):
        table.add_column(
            col, justify="right" if col in ("#", "ms", "nodes before", "nodes after") else "left"
        )
    for target in result.targets:
        for r in result.pipeline.records + (target.legalize.records if target is result.targets[0] else []):
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
            table.add_row(
                str(r.index),
                r.name,
                f"{r.seconds * 1000:.1f}",
                str(r.nodes_before),
                str(r.nodes_after),
                "yes" if r.changed else "no",
                stats,
            )
        break
    if result.pipeline.records:
        console.print(table)
    console.print(f"[bold]optimized[/] {result.optimized.line()}")
    for target in result.targets:
        if target.golden is not None:
            worst = min((r.cosine for r in target.golden.rows), default=1.0)
            max_abs = max((r.max_abs for r in target.golden.rows), default=0.0)
            kind = "prompts" if target.golden.tokens else "samples"
            line = (
                f"[green]verified[/] {target.name}: {len(target.golden.rows)} outputs × {target.golden.samples} {kind}, "
                f"max abs {max_abs:.3g}, min cosine {worst:.6f}"
            )
            if target.golden.tokens:
                matched = sum(t.matched for t in target.golden.tokens)
                total = sum(t.total for t in target.golden.tokens)
                line += f", greedy tokens equal {matched}/{total}"
            console.print(line)
        elif getattr(target, "verify_skipped", None):
            console.print(f"[yellow]not verified[/] {target.name}: {escape(target.verify_skipped)}")
        console.print(f"[bold green]artifact[/] {target.artifact}")
    if result.dumps:
        console.print(f"IR dumps: {result.dumps}")
    console.print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))


# -- run ------------------------------------------------------------------------------------------------
@app.command()
def run(
    artifact: Annotated[Path, typer.Argument(help="an artifact folder written by llmc compile")],
    inputs: Annotated[
        Path | None, typer.Option("--inputs", "-i", help=".npz with one array per input")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write the outputs to this .npz")] = None,
    seed: Annotated[int, typer.Option(help="seed for random inputs when --inputs is not given")] = 0,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="pipeline-partitioned artifacts: run the stages on Ray actors ('local' or a cluster address)",
        ),
    ] = None,
) -> None:
    """Run an artifact on inputs (plain onnxruntime underneath) and show or save its outputs."""
    from llmc.golden import load_inputs, make_inputs
    from llmc.runtime.artifact import load_artifact

    runner, manifest = load_artifact(artifact)
    if ray is not None:
        if not manifest.get("pipeline_stages"):
            raise ModelError(f"{artifact} is not partitioned into stages: --ray runs pipeline stages only")
        from llmc.targets.cpu.target import load_runner

        runner = load_runner(artifact, manifest, ray_address=ray)
    if inputs:
        feeds = load_inputs(inputs, runner.inputs)
    else:  # static-shape targets (tpu) take the shapes of their first bucket
        bucket = (manifest.get("buckets") or [{}])[0].get("inputs", {})
        feeds = make_inputs(runner.inputs, seed=seed, shapes={k: list(v) for k, v in bucket.items()})
    if out is not None and out.exists():
        raise ModelError(f"{out} already exists; not overwriting it")
    results: dict[str, np.ndarray] = {}
    for k, feed in enumerate(feeds):
        outputs = runner.run(feed)
        for name, value in outputs.items():
            results[name if len(feeds) == 1 else f"{name}@{k}"] = np.asarray(value)
    table = Table(title=f"outputs of {artifact}")
    for col in ("output", "dtype", "shape", "min", "max", "mean"):
        table.add_column(col)
    for name, value in results.items():
        numeric = value.dtype.kind in "fiub" and value.size
        table.add_row(
            name,
            str(value.dtype),
            str(list(value.shape)),
            f"{value.min():.4g}" if numeric else "",
            f"{value.max():.4g}" if numeric else "",
            f"{value.astype(np.float64).mean():.4g}" if numeric else "",
        )
    console.print(table)
    if out is not None:
        np.savez(out, **results)
        console.print(f"wrote {out}")


# -- inspect --------------------------------------------------------------------------------------------
@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="an .onnx file or an artifact folder")],
    format: Annotated[str, typer.Option("--format", "-f", help="text | json | dot")] = "text",
) -> None:
    """Show the IR: ops, parameters, sizes, inputs/outputs, and the graph (ONNX text, JSON or Graphviz dot)."""
    from llmc.inspect import describe, to_dot
    from llmc.ir import load_model, to_text
    from llmc.targets.base import read_manifest

    if format not in ("text", "json", "dot"):
        raise typer.BadParameter("--format must be text, json or dot")
    model_path = path
    if path.is_dir():
        manifest = read_manifest(path)
        if "model" not in manifest:  # not an ONNX artifact (tpu: StableHLO modules): show its manifest
            if format == "json":
                sys.stdout.write(json.dumps(manifest, indent=2) + "\n")
            else:
                _print_manifest(manifest)
            return
        model_path = path / manifest["model"]
    graph = load_model(model_path)
    info = describe(graph, model_path)
    if format == "json":
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    if format == "dot":
        sys.stdout.write(to_dot(graph))
        return
    console.print(
        f"[bold]{model_path}[/]  {info['nodes']} nodes, {info['params']:,} params, {info['weight_bytes'] / 1e6:.2f} MB weights, file {info['file_bytes'] / 1e6:.2f} MB"
    )
    console.print("opsets: " + ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in info["opsets"].items()))
    io = Table(title="interface")
    for col in ("kind", "name", "dtype", "shape"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for row in info[kind]:
            io.add_row(kind[:-1], row["name"], row["dtype"], str(row["shape"]))
    console.print(io)
    ops = Table(title="ops")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in info["ops"].items():
        ops.add_row(op, str(count))
    console.print(ops)
    sys.stdout.write(to_text(graph) + "\n")


def _print_manifest(manifest: dict) -> None:
    console.print(f"[bold]target[/] {manifest.get('target')}  task {manifest.get('task')}")
    for key in ("inputs", "outputs"):
        for row in manifest.get(key, []):
            console.print(f"  {key[:-1]} {row.get('name')}: {row.get('dtype')} {row.get('shape')}")
    table = Table(title="files")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for name, size in manifest.get("files", {}).items():
        table.add_row(name, f"{size:,}")
    console.print(table)
    for bucket in manifest.get("buckets", []):
        console.print(f"  bucket {bucket.get('dims')}: {bucket.get('module')}")


# -- explain --------------------------------------------------------------------------------------------
@app.command()
def explain(
    artifact: Annotated[Path, typer.Argument(help="an artifact folder written by llmc compile")],
) -> None:
    """For each fusion: how many sites fused, and for the sites that matched partly, why they were not."""
    from llmc.driver import explain_lines
    from llmc.targets.base import read_manifest

    manifest = read_manifest(artifact)
    records = manifest.get("pipeline", {}).get("passes", [])
    console.print(f"[bold]{artifact}[/]: pipeline `{manifest.get('pipeline', {}).get('text', '')}`")
    for line in explain_lines(records):
        console.print(line, markup=False, highlight=False)


# -- sensitivity, bisect --------------------------------------------------------------------------------
def _analysis_progress(status) -> object:
    def progress(event: str, data: dict) -> None:
        if event == "pass":
            status.update(f"pass {data['index']}: {data['name']}")
        elif event == "evaluate" and data["total"]:
            status.update(f"quantizing group {data['index']}/{data['total']}: {data['group']}")
        elif event == "evaluate":
            status.update(f"quantizing {data['group']}")
        elif event == "check":
            status.update(f"golden check: {data['label']}")
        elif event == "reference":
            status.update("float reference outputs")
        else:
            status.update(f"{event} {' '.join(str(v) for v in data.values())}")

    return progress


def _check_by(by: str) -> None:
    from llmc.sensitivity import GROUPINGS

    if by not in GROUPINGS:
        raise LlmcError(f"--by must be one of {', '.join(GROUPINGS)}, not '{by}'")


def _sensitivity_table(report, top: int | None = None) -> Table:
    table = Table(title=f"sensitivity of {report.pass_name} by {report.by} ({report.data})")
    table.add_column("#", justify="right")
    table.add_column("group")
    table.add_column("weights", justify="right")
    for col in report.columns:
        table.add_column(col, justify="right")
    table.add_column("share", justify="right")
    for i, group in enumerate(report.groups[:top] if top else report.groups, 1):
        values = [f"{group.metrics[c]:.4g}" for c in report.columns]
        table.add_row(str(i), group.name, str(len(group.weights)), *values, f"{group.share:.1%}")
    return table


def _exclude_line(globs: list[str]) -> str:
    return "exclude: " + json.dumps(globs)


# options of the analysis commands (sensitivity, bisect)
SamplesOption = Annotated[int, typer.Option("--samples", min=1, help="calibration windows / input samples")]
TokensOption = Annotated[int, typer.Option("--tokens", min=2, help="decoders: tokens per window")]
JsonOption = Annotated[Path | None, typer.Option("--json", help="also write the results to this file")]


@app.command()
def sensitivity(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="the YAML plan")],
    pass_name: Annotated[
        str | None, typer.Option("--pass", help="the pass to analyse (default: the first quantization pass)")
    ] = None,
    by: Annotated[str, typer.Option("--by", help="group weights by layer | kind | weight")] = "layer",
    top: Annotated[int, typer.Option("--top", min=1, help="groups in the suggested exclude: line")] = 3,
    samples: SamplesOption = 4,
    tokens: TokensOption = 32,
    json_out: JsonOption = None,
) -> None:
    """Rank groups of weights by the error quantizing each adds (KL / top-1 for decoders, 1 - cosine else)."""
    from llmc.sensitivity import analyze
    from llmc.spec import load_spec

    _check_by(by)
    spec = load_spec(spec_path)
    with console.status("sensitivity") as status:
        report = analyze(
            spec,
            pass_name=pass_name,
            by=by,
            samples=samples,
            tokens=tokens,
            progress=_analysis_progress(status),
        )
    console.print(_sensitivity_table(report))
    total = ", ".join(f"{k} {v:.4g}" for k, v in report.total.items())
    console.print(f"all {len(report.groups)} groups quantized together: {total}")
    console.print(
        f"to keep the {min(top, len(report.groups))} most sensitive group(s) in float, give "
        f"{report.pass_name} (pipeline step {report.pass_index + 1}):"
    )
    console.print("  " + _exclude_line(report.suggested_exclude(top)), markup=False, highlight=False)
    console.print(f"time: {report.seconds:.1f}s")
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        console.print(f"wrote {json_out}")


@app.command()
def bisect(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="the YAML plan")],
    by: Annotated[
        str, typer.Option("--by", help="quantization: group weights by layer | kind | weight")
    ] = "layer",
    samples: SamplesOption = 4,
    tokens: TokensOption = 32,
    json_out: JsonOption = None,
) -> None:
    """Find the first pass that makes the golden check fail and, for quantization, the layers to exclude.

    Exit codes: 0 cause found, 1 the whole pipeline passes or no cause found, 2 bad input.
    """
    from llmc.bisect import run_bisect
    from llmc.spec import load_spec

    _check_by(by)
    spec = load_spec(spec_path)
    with console.status("bisect") as status:
        report = run_bisect(spec, by=by, samples=samples, tokens=tokens, progress=_analysis_progress(status))
    table = Table(title="golden checks")
    for col in ("#", "graph checked", "result", "key metric", "s"):
        table.add_column(col, justify="right" if col in ("#", "s") else "left")
    for i, check in enumerate(report.checks, 1):
        result = "[green]pass[/]" if check.passed else "[red]FAIL[/]"
        table.add_row(str(i), escape(check.label), result, escape(check.metric), f"{check.seconds:.1f}")
    if report.checks:
        console.print(table)
    if report.sensitivity is not None:
        console.print(_sensitivity_table(report.sensitivity, top=10))
    if report.culprit:
        console.print(f"[bold red]{escape(report.conclusion)}[/]")
        console.print(f"first failing step: {report.culprit}", markup=False, highlight=False)
    if report.exclude is not None:
        console.print(f"add to {report.culprit.split('{')[0]} (pipeline step {report.culprit_number}):")
        console.print("  " + _exclude_line(report.exclude), markup=False, highlight=False)
    console.print(f"time: {report.seconds:.1f}s")
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        console.print(f"wrote {json_out}")
    if not report.found:
        from llmc.bisect import NoCulprit

        raise NoCulprit(f"no failing pass found: {report.conclusion}")


# -- passes, schema -------------------------------------------------------------------------------------
@app.command()
def passes() -> None:
    """List every registered pass with its one-line doc and its options."""
    from llmc.pass_manager import registered_passes

    table = Table(title="registered passes")
    table.add_column("pass", no_wrap=True)
    table.add_column("what it does")
    table.add_column("options")
    for name, cls in registered_passes().items():
        opts = []
        for field_name, field in cls.Options.model_fields.items():
            default = field.get_default(call_default_factory=True)
            opts.append(f"{field_name}={default!r}")
        table.add_row(name, cls.summary(), ", ".join(opts))
    console.print(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the spec (point your editor's YAML plugin at it)."""
    from llmc.spec import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


def _register_optional_commands() -> None:
    try:
        from llmc.cli_decoder import register
    except ImportError:
        return
    register(app)
    from llmc.cli_distributed import register as register_run_batch

    register_run_batch(app)


_register_optional_commands()


def main() -> None:
    try:
        app(standalone_mode=False)
    except LlmcError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        if _state["debug"]:
            err_console.print_exception()
        sys.exit(exc.exit_code)
    except VerificationError as exc:  # pragma: no cover - subclass of LlmcError, kept for clarity
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors are ClickException
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False
        )
        if _state["debug"]:
            err_console.print_exception()
        else:
            err_console.print("run with --debug for the traceback, and please report it")
        sys.exit(3)


if __name__ == "__main__":
    main()
