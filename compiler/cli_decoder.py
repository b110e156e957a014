"""The ``llmc generate`` and ``llmc bench`` commands (registered on the main Typer app by ``register``).

Both open an artifact folder (one with ``manifest.json``). ``generate`` streams tokens and ends with the
prefill latency and decode tokens/s; ``bench`` times the artifact beside its baselines and writes bench.json.
Errors are raised as ``LlmcError`` for the main CLI to report.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from llmc.errors import ModelError

console = Console()
err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add ``generate`` and ``bench`` to ``app``."""

    @app.command("generate")
    def generate(
        artifact: Path = typer.Argument(..., help="Artifact folder (holds manifest.json)."),
        prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate at most."),
        greedy: bool = typer.Option(
            False, "--greedy", help="Greedy decoding (the default without --temperature)."
        ),
        temperature: float | None = typer.Option(
            None, "--temperature", "-t", help="Sample at this temperature."
        ),
        top_p: float = typer.Option(
            1.0, "--top-p", help="Nucleus sampling: keep this much probability mass."
        ),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: all)."),
        seed: int | None = typer.Option(None, "--seed", help="Random seed for sampling."),
        chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
        ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence."),
    ) -> None:
        """Generate text from a text-generation artifact, streaming tokens as they come."""
        from llmc.runtime.generator import SamplingConfig, load_artifact_generator

        if greedy and temperature is not None:
            raise ModelError("--greedy and --temperature exclude each other")
        sampling = SamplingConfig(
            greedy=temperature is None or temperature == 0,
            temperature=temperature if temperature is not None else 1.0,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
        )
        generator = load_artifact_generator(artifact)
        if generator.tokenizer is None:
            raise ModelError(f"{artifact} carries no tokenizer.json: it cannot turn the prompt into tokens")
        text = generator.tokenizer.chat(prompt) if chat else prompt

        def show(token: int, piece: str) -> None:
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)

        result = generator.generate(
            text, max_new_tokens, sampling=sampling, stream=show, stop_at_eos=not ignore_eos
        )
        console.print()
        err_console.print(
            f"[dim]{len(result.prompt_tokens)} prompt tokens, {len(result.tokens)} new ({result.stop_reason}); "
            f"prefill {result.prefill_ms:.1f} ms, decode {result.decode_tokens_per_s:.1f} tokens/s[/dim]"
        )

    @app.command("bench")
    def bench(
        artifact: Path = typer.Argument(..., help="Artifact folder (holds manifest.json)."),
        baseline: list[str] = typer.Option(
            None, "--baseline", "-b", help="pytorch and/or onnx-plain (repeat the option); default: both."
        ),
        no_baselines: bool = typer.Option(False, "--no-baselines", help="Time the artifact alone."),
        prompt_len: int = typer.Option(128, "--prompt-len", help="Decoders: prompt tokens."),
        new_tokens: int = typer.Option(64, "--new-tokens", help="Decoders: greedy tokens generated per run."),
        batch: list[int] = typer.Option(
            None, "--batch", help="Encoders: batch sizes (repeat; default 1 and 8)."
        ),
        seq_len: int = typer.Option(128, "--seq-len", help="Encoders: sequence length."),
        runs: int = typer.Option(5, "--runs", help="Timed runs (the median is reported)."),
        warmup: int = typer.Option(1, "--warmup", help="Untimed warm-up runs."),
        out: Path = typer.Option(Path("bench.json"), "--out", "-o", help="Where to write the JSON results."),
        no_accuracy: bool = typer.Option(
            False, "--no-accuracy", help="Decoders: skip token agreement and perplexity (extra decode steps)."
        ),
        threads: int = typer.Option(
            None, "--threads", help="Intra-op threads of every candidate (default: the artifact's)."
        ),
        against: list[Path] = typer.Option(
            None, "--against", "-a", help="Another artifact timed side by side (repeat the option)."
        ),
    ) -> None:
        """Time an artifact beside PyTorch eager, the plain ONNX export and other artifacts, in this one process."""
        from llmc.bench import BASELINES, bench_artifact, markdown_table

        baselines = [] if no_baselines else list(baseline or BASELINES)
        options: dict = {"baselines": baselines, "runs": runs, "warmup": warmup}
        options |= {"prompt_len": prompt_len, "new_tokens": new_tokens, "seq_len": seq_len}
        options["accuracy"] = not no_accuracy
        options["against"] = list(against or [])
        options["threads"] = threads
        if batch:
            options["batch_sizes"] = list(batch)
        with err_console.status("benchmarking…"):
            result = bench_artifact(artifact, **options)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        # Plain markdown, not rendered: it stays readable at any width and pastes into reports as is.
        console.print(markdown_table(result), markup=False, highlight=False, soft_wrap=True)
        err_console.print(f"[dim]results written to {out}[/dim]")
