"""``llmc run-batch`` on a local Ray runtime: order, equality with one process, faults, resume, bad input.

Ray starts once for the module (2 CPUs, no dashboard) and stops at its end; every batch uses at most two
actors and a tiny MLP artifact compiled here, so that the module stays in seconds per test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from clitools import run_cli
from graphs import mlp_model

from llmc.errors import ModelError
from llmc.runtime.runner import OrtRunner

ray = pytest.importorskip("ray")

from llmc.distributed._shards import read_results  # noqa: E402
from llmc.distributed.run_batch import CrashInjection, run_batch  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 << 20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4 -> 8 -> 3 MLP with a symbolic batch, compiled by ``compile_spec`` for the CPU target."""
    from llmc.driver import compile_spec
    from llmc.spec import parse_spec

    folder = tmp_path_factory.mktemp("mlp")
    onnx.save(mlp_model(4, 8, 3), folder / "mlp.onnx")
    text = (
        "model: {source: onnx, path: mlp.onnx}\npipeline: [eliminate-dead-code]\ntargets: {cpu: {}}\n"
        "verify: {samples: 1, dims: {batch: 2}}\noutput: {dir: artifact}\n"
    )
    return compile_spec(parse_spec(text, folder / "spec.yaml"), out=folder / "artifact").targets[0].artifact


def _samples(n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((i % 3 + 1, 4)).astype(np.float32) for i in range(n)]


def _jsonl(path: Path, samples: list[np.ndarray], extra: dict[int, str] | None = None) -> Path:
    """Samples as JSONL records; ``extra`` puts raw lines at the given (final, 0-based) positions."""
    lines = [json.dumps({"inputs": {"x": x.tolist()}}) for x in samples]
    for position, line in sorted((extra or {}).items()):
        lines.insert(position, line)
    path.write_text("\n".join(lines) + "\n")
    return path


def _npz_folder(path: Path, samples: list[np.ndarray]) -> Path:
    path.mkdir()
    for i, x in enumerate(samples):
        np.savez(path / f"sample-{i:03d}.npz", x=x)
    return path


def _reference(artifact: Path, samples: list[np.ndarray]) -> list[np.ndarray]:
    """The same samples in one process, straight through onnxruntime (one thread, like each actor here)."""
    runner = OrtRunner(artifact / "model.onnx", intra_op_threads=1)
    return [runner.run({"x": x})["y"] for x in samples]


def _assert_results(results_file: Path, expected: list[np.ndarray]) -> None:
    with np.load(results_file) as archive:
        assert archive.files == [f"{i}/y" for i in range(len(expected))]  # input order, in the file too
    results = read_results(results_file)
    for i, y in enumerate(expected):
        np.testing.assert_array_equal(results[i]["y"], y)


def _ensure_command() -> None:
    """Register run-batch on the app when cli.py does not (yet) do it itself."""
    from llmc.cli import app
    from llmc.cli_distributed import register

    if not any(command.name == "run-batch" for command in app.registered_commands):
        register(app)


# -- results ---------------------------------------------------------------------------------------------
def test_order_preserved_and_equal_to_one_process(local_ray, mlp_artifact: Path, tmp_path: Path) -> None:
    samples = _samples(11)
    report = run_batch(
        mlp_artifact, _jsonl(tmp_path / "in.jsonl", samples), tmp_path / "out", workers=2, shard_size=2
    )
    assert report.exit_code == 0 and report.succeeded == 11 and report.failed == []
    assert report.shards == 6 and report.shards_run == 6 and report.threads_per_worker == 1
    _assert_results(report.results, _reference(mlp_artifact, samples))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(int(k) for k in manifest["shards"]) == list(range(6))


def test_killed_actor_is_replaced_and_its_shard_retried(
    local_ray, mlp_artifact: Path, tmp_path: Path
) -> None:
    samples = _samples(8)
    events: list[tuple[str, dict]] = []
    report = run_batch(
        mlp_artifact,
        _jsonl(tmp_path / "in.jsonl", samples),
        tmp_path / "out",
        workers=2,
        shard_size=2,
        inject_crash=CrashInjection(shard=1, after=1),
        progress=lambda event, data: events.append((event, data)),
    )
    assert report.actor_restarts == 1 and report.exit_code == 0 and report.succeeded == 8
    (retry,) = [data for event, data in events if event == "retry"]
    assert retry["shard"] == 1 and "ActorDiedError" in retry["error"]
    _assert_results(report.results, _reference(mlp_artifact, samples))


def test_a_shard_that_keeps_killing_its_actor_fails_alone(
    local_ray, mlp_artifact: Path, tmp_path: Path
) -> None:
    """With no retries the shard's samples are reported failed; the other shards complete and merge."""
    samples = _samples(6)
    report = run_batch(
        mlp_artifact,
        _jsonl(tmp_path / "in.jsonl", samples),
        tmp_path / "out",
        workers=1,
        shard_size=2,
        retries=0,
        inject_crash=CrashInjection(shard=0),
    )
    assert [f["index"] for f in report.failed] == [0, 1] and "worker died 1 times" in report.failed[0][
        "error"
    ]
    assert report.succeeded == 4 and report.exit_code == 1 and report.unfinished_shards == []
    results = read_results(report.results)
    assert sorted(results) == [2, 3, 4, 5]


# -- resume ----------------------------------------------------------------------------------------------
def test_resume_runs_only_the_unfinished_shards(local_ray, mlp_artifact: Path, tmp_path: Path) -> None:
    samples = _samples(8)
    inputs, out = _npz_folder(tmp_path / "in", samples), tmp_path / "out"
    first = run_batch(mlp_artifact, inputs, out, workers=2, shard_size=2, stop_after=2)
    assert first.shards_run == 2 and len(first.unfinished_shards) == 2 and first.results is None
    assert first.exit_code == 1
    finished = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("shard-*.npz")}
    assert len(finished) == 2

    second = run_batch(mlp_artifact, inputs, out, workers=1)  # another worker count: the shard size is kept
    assert second.shards_run == 2 and second.shards_resumed == 2 and second.exit_code == 0
    for name, (data, mtime) in finished.items():  # finished shards were not written again
        assert (out / name).read_bytes() == data and (out / name).stat().st_mtime_ns == mtime
    _assert_results(second.results, _reference(mlp_artifact, samples))

    (out / "shard-00003.npz").unlink()  # a lost shard file: only that shard runs again
    third = run_batch(mlp_artifact, inputs, out, workers=2)
    assert third.shards_run == 1 and third.shards_resumed == 3
    _assert_results(third.results, _reference(mlp_artifact, samples))

    fully_done = run_batch(mlp_artifact, inputs, out, workers=2)  # nothing to do: Ray is not even used
    assert fully_done.shards_run == 0 and fully_done.shards_resumed == 4


def test_an_output_folder_of_other_inputs_is_refused(mlp_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(
        json.dumps({"format": 1, "identity": {"inputs": "x"}, "shard_size": 2})
    )
    with pytest.raises(ModelError, match="other inputs or another artifact"):
        run_batch(mlp_artifact, _jsonl(tmp_path / "in.jsonl", _samples(2)), out)


# -- bad input -------------------------------------------------------------------------------------------
def test_malformed_records_are_reported_by_line_and_the_rest_run(
    local_ray, mlp_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _ensure_command()
    samples = _samples(4)
    bad_lines = {
        1: "{not json",
        3: json.dumps({"inputs": {"wrong_name": [[1, 2, 3, 4]]}}),
        4: json.dumps({"something": 1}),
    }
    inputs = _jsonl(tmp_path / "in.jsonl", samples, bad_lines)
    out = tmp_path / "out"
    result = run_cli(capsys, "run-batch", mlp_artifact, "--inputs", inputs, "--out", out, "--workers", "2")
    assert result.code == 1, result.err
    assert "#1 (line 2): not valid JSON" in result.err
    assert "#3 (line 4)" in result.err and "missing ['x'], unknown ['wrong_name']" in result.err
    assert '#4 (line 5): a record needs "inputs"' in result.err
    report = json.loads((out / "report.json").read_text())
    assert [f["index"] for f in report["failed"]] == [1, 3, 4] and report["succeeded"] == 4
    results = read_results(out / "results.npz")
    expected = _reference(mlp_artifact, samples)
    for index, y in zip([0, 2, 5, 6], expected, strict=True):
        np.testing.assert_array_equal(results[index]["y"], y)


def test_unreachable_ray_address_is_exit_2(mlp_artifact: Path, tmp_path: Path, capsys) -> None:
    _ensure_command()
    inputs = _jsonl(tmp_path / "in.jsonl", _samples(2))
    result = run_cli(
        capsys,
        "run-batch",
        mlp_artifact,
        "--inputs",
        inputs,
        "--out",
        tmp_path / "out",
        "--ray",
        "127.0.0.1:1",
    )
    assert result.code == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in result.err and "Traceback" not in result.err


@pytest.mark.parametrize(
    ("make_inputs", "message"),
    [
        (lambda d: d / "missing.jsonl", "inputs not found"),
        (lambda d: (d / "empty.jsonl").write_text("\n") and d / "empty.jsonl", "no records"),
        (lambda d: (d / "p.jsonl").write_text('{"prompt": "hi"}\n') and d / "p.jsonl", "inputs are prompts"),
    ],
)
def test_inputs_that_cannot_run_are_exit_2(
    mlp_artifact: Path, tmp_path: Path, capsys, make_inputs, message
) -> None:
    _ensure_command()
    result = run_cli(
        capsys, "run-batch", mlp_artifact, "--inputs", make_inputs(tmp_path), "--out", tmp_path / "o"
    )
    assert result.code == 2 and message in result.err


def test_a_folder_that_is_not_an_artifact_is_exit_2(tmp_path: Path, capsys) -> None:
    _ensure_command()
    inputs = _jsonl(tmp_path / "in.jsonl", _samples(1))
    result = run_cli(capsys, "run-batch", tmp_path, "--inputs", inputs, "--out", tmp_path / "o")
    assert result.code == 2 and "not an llmc artifact" in result.err


# -- decoders --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_prompts_generate_like_one_process(local_ray, tmp_path: Path) -> None:
    """Greedy generations of a tiny LLaMA on two actors equal those of the in-process Generator."""
    from fixtures_frontends.tiny import tiny_artifact

    from llmc.runtime.generator import SamplingConfig, load_artifact_generator

    artifact = tiny_artifact("llama")
    prompts = ["w5 w17 w33", "w40 w41", "w8", "w3 w9 w27 w81", "w12 w13 w14"]
    lines = [json.dumps({"prompt": p, "max_new_tokens": 4 + i}) for i, p in enumerate(prompts)]
    lines.insert(2, json.dumps({"prompt": ""}))
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    report = run_batch(artifact, tmp_path / "prompts.jsonl", tmp_path / "out", workers=2, shard_size=2)
    assert [(f["index"], f["where"]) for f in report.failed] == [(2, "line 3")]
    results = read_results(report.results)
    assert list(results) == [0, 1, 3, 4, 5]
    generator = load_artifact_generator(artifact)
    for index, (prompt, budget) in zip(results, [(p, 4 + i) for i, p in enumerate(prompts)], strict=True):
        expected = generator.generate(prompt, budget, sampling=SamplingConfig(greedy=True))
        assert results[index] == {
            "index": index,
            "prompt": prompt,
            "text": expected.text,
            "tokens": expected.tokens,
        }
