"""The ``llmc run-batch`` command (registered on the main Typer app by ``register``).

It runs ``llmc.distributed.run_batch`` with a rich progress bar, prints a summary and the failed samples, and
writes ``report.json`` beside the results. Exit codes: 0 every sample ran, 1 some failed (the others are in
the results), 2 nothing could run (bad artifact or inputs, unreachable Ray address) through ``LlmcError``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

err_console = Console(stderr=True, soft_wrap=True)
SHOWN_FAILURES = 20


def register(app: typer.Typer) -> None:
    """Add ``run-batch`` to ``app``."""

    @app.command("run-batch")
    def run_batch_command(
        artifact: Path = typer.Argument(..., help="Artifact folder (holds manifest.json)."),
        inputs: Path = typer.Option(
            ...,
            "--inputs",
            "-i",
            help="A .jsonl file ({'inputs': {...}} or {'prompt': ...} per line) or a folder of .npz.",
        ),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Results folder (shards, manifest, merged results)."
        ),
        workers: int = typer.Option(1, "--workers", "-w", help="Ray actors, one onnxruntime session each."),
        ray_address: str | None = typer.Option(
            None, "--ray", help="Join the Ray cluster at this address (default: start a local Ray)."
        ),
        threads_per_worker: int | None = typer.Option(
            None, "--threads-per-worker", help="Intra-op threads per actor (default: cores // workers)."
        ),
        retries: int = typer.Option(2, "--retries", help="Times a shard is retried after its actor died."),
        shard_size: int | None = typer.Option(
            None, "--shard-size", help="Samples per shard (default: about 4 shards per worker, at most 64)."
        ),
        max_new_tokens: int = typer.Option(
            64,
            "--max-new-tokens",
            "-n",
            help="Prompts: tokens generated when a record gives no max_new_tokens.",
        ),
    ) -> None:
        """Run many samples through an artifact on Ray actors; resumable, results in input order."""
        from llmc.distributed.run_batch import SamplesFailed, run_batch

        with Progress(
            TextColumn("[bold]run-batch[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("samples"),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=err_console,
            transient=False,
        ) as bar:
            task = bar.add_task("starting Ray", total=None)

            def progress(event: str, data: dict[str, Any]) -> None:
                if event == "start":
                    resumed = data["samples"] - data["todo"]
                    note = f"resumed {resumed} finished" if resumed else ""
                    bar.update(task, total=data["samples"], completed=resumed, description=note)
                elif event == "ready":
                    bar.update(task, description=f"{data['workers']} workers x {data['threads']} threads")
                elif event == "shard":
                    bar.advance(task, data["samples"])
                elif event == "retry":
                    bar.console.print(
                        f"[yellow]worker died on shard {data['shard']} (attempt {data['attempt']}): "
                        f"{escape(data['error'])}[/]"
                    )

            report = run_batch(
                artifact,
                inputs,
                out,
                workers=workers,
                address=ray_address,
                threads_per_worker=threads_per_worker,
                retries=retries,
                shard_size=shard_size,
                max_new_tokens=max_new_tokens,
                progress=progress,
            )
        (out / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
        _summary(report)
        if report.exit_code:
            raise SamplesFailed(
                f"{len(report.failed)} of {report.total} samples failed"
                + (f", {len(report.unfinished_shards)} shards unfinished" if report.unfinished_shards else "")
                + f"; see {out / 'report.json'}"
            )


def _summary(report: Any) -> None:
    err_console.print(
        f"{report.succeeded} of {report.total} samples ok, {len(report.failed)} failed; "
        f"{report.shards_run} shards run, {report.shards_resumed} resumed, {report.actor_restarts} actor restarts; "
        f"{report.workers} workers x {report.threads_per_worker} threads, {report.seconds:.1f} s ({report.samples_per_s:.1f} samples/s run)"
    )
    for failure in report.failed[:SHOWN_FAILURES]:
        err_console.print(
            f"[red]failed[/] #{failure['index']} ({escape(failure['where'])}): {escape(failure['error'])}",
            highlight=False,
        )
    if len(report.failed) > SHOWN_FAILURES:
        err_console.print(f"... {len(report.failed) - SHOWN_FAILURES} more in {report.out / 'report.json'}")
    if report.unfinished_shards:
        err_console.print(
            f"[yellow]{len(report.unfinished_shards)} shards unfinished: run again to resume[/]"
        )
    elif report.results is not None:
        err_console.print(f"results: {report.results}")
