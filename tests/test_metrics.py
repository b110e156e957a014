"""Accuracy metrics (llmc.metrics) on tiny models: perplexity through the KV cache against a direct computation
from full-sequence logits, free-running token agreement, encoder cosine and classifier top-1, the metrics
table, and spec thresholds that fail a compile (exit 1) with that table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from clitools import run_cli
from fixtures_frontends.tiny import VOCAB, load_torch, tiny_folder, tiny_import
from onnx import TensorProto, helper, numpy_helper

from llmc.calibration import decoder_feeds
from llmc.errors import ModelError, VerificationError
from llmc.golden import compare_runners, raise_if_failed
from llmc.ir import clone, save_model
from llmc.metrics import (
    DEFAULT_EVAL_TEXT,
    MetricCheck,
    cosine_stats,
    eval_tokens,
    free_running_agreement,
    metrics_markdown,
    perplexity,
    row_cosines,
    token_windows,
    top1_agreement,
)
from llmc.pass_manager import run_pipeline
from llmc.runtime.generator import Generator, TorchGenerator
from llmc.runtime.runner import OrtRunner
from llmc.runtime.tokenizer import Tokenizer
from llmc.spec import Tolerances

IDS = [int(t) for t in np.random.default_rng(3).integers(3, VOCAB, 22)]
PROMPT = [5, 17, 33, 8, 61]


def onnx_loop(path: Path | None = None) -> Generator:
    imported = tiny_import("llama")
    runner = OrtRunner(path or imported.info["onnx_path"])
    return Generator(runner, imported.decoder, Tokenizer.from_dir(tiny_folder("llama")))


def direct_nll(logits_of_window) -> tuple[float, int]:
    """Summed NLL of every window of IDS (windows of 8) from full-sequence logits [seq, vocab]."""
    nll, scored = 0.0, 0
    for window in token_windows(IDS, 8):
        logits = torch.from_numpy(np.asarray(logits_of_window(window), np.float64))
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(window[1:])
        nll -= float(logp[torch.arange(len(targets)), targets].sum())
        scored += len(targets)
    return nll, scored


def test_perplexity_equals_a_direct_computation_from_full_sequence_logits(tmp_path: Path) -> None:
    imported = tiny_import("llama")
    runner = OrtRunner(imported.info["onnx_path"])

    def onnx_logits(window: list[int]) -> np.ndarray:  # the plain export computes logits for every position
        return runner.run(decoder_feeds(imported.graph, imported.decoder, window), ["logits"])["logits"][0]

    model = load_torch("llama")

    def torch_logits(window: list[int]) -> np.ndarray:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([window])).logits[0].numpy()

    ours = perplexity(onnx_loop(), IDS, window=8)
    assert (ours.tokens, ours.windows) == (7 + 7 + 5, 3)  # 22 tokens: windows of 8, 8, 6
    for full in (onnx_logits, torch_logits):
        nll, scored = direct_nll(full)
        assert scored == ours.tokens
        assert ours.value == pytest.approx(np.exp(nll / scored), rel=1e-4)
    # A graph whose logits cover the last position only gives the same perplexity (KV cache, one token a step).
    graph = clone(imported.graph)
    run_pipeline(graph, ["logits-last-token"])
    save_model(graph, tmp_path / "last.onnx")
    last = perplexity(onnx_loop(tmp_path / "last.onnx"), IDS, window=8)
    assert last.value == pytest.approx(ours.value, rel=1e-5) and last.tokens == ours.tokens
    # Windows longer than the model's max_length are cut to it; one window scores all but the first token.
    assert perplexity(onnx_loop(), IDS, window=10_000).tokens == len(IDS) - 1


def test_token_windows_and_eval_text(tmp_path: Path) -> None:
    assert token_windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail is dropped
    with pytest.raises(ModelError, match="at least 2"):
        token_windows([1, 2], 1)
    tokenizer = Tokenizer.from_dir(tiny_folder("llama"))
    text = tmp_path / "text.txt"
    text.write_text("w5 w17 w33 w8 w61")
    assert eval_tokens(tokenizer, text, 4) == [5, 17, 33, 8]
    text.write_text("w5")
    with pytest.raises(ModelError, match="gives 1 token"):
        eval_tokens(tokenizer, text)
    with pytest.raises(ModelError, match="cannot read"):
        eval_tokens(tokenizer, tmp_path / "missing.txt")
    shipped = DEFAULT_EVAL_TEXT.read_text()
    assert 400 <= len(shipped.split()) <= 600 and "def " in shipped
    assert shipped != (DEFAULT_EVAL_TEXT.with_name("calibration.txt")).read_text()


def test_free_running_agreement_identical_and_perturbed() -> None:
    ours = onnx_loop()
    decoder = ours.decoder
    reference = TorchGenerator(load_torch("llama"), decoder)
    continuation = reference.generate(PROMPT, 12, stop_at_eos=False).tokens
    same = free_running_agreement(ours, PROMPT, continuation)
    assert (same.leading, same.equal, same.total, same.ratio) == (12, 12, 12, 1.0)
    assert same.tokens == continuation

    perturbed = load_torch("llama")
    torch.manual_seed(1)
    with torch.no_grad():
        for param in perturbed.parameters():
            if param.dim() > 1:
                param.add_(torch.randn_like(param) * 0.1)
    other = free_running_agreement(TorchGenerator(perturbed, decoder), PROMPT, continuation)
    assert other.total == 12 and other.leading < 12 and other.equal < 12
    assert other.leading <= other.equal and other.ratio == other.leading / 12
    assert free_running_agreement(ours, PROMPT, []).total == 0


def test_cosine_and_top1() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    out = np.array([[1.0, 1.0], [0.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(row_cosines(ref, out), [np.sqrt(0.5), 1.0, 1.0])
    stats = cosine_stats([(ref, out), (ref[:1], ref[:1])])
    assert stats.samples == 4 and stats.min == pytest.approx(np.sqrt(0.5))
    assert stats.mean == pytest.approx((np.sqrt(0.5) + 3) / 4)
    logits = np.array([[[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]]])
    assert top1_agreement([(logits, np.roll(logits, 1, axis=-1))]) == (0, 2)
    assert top1_agreement([(logits, logits * 2)]) == (2, 2)
    with pytest.raises(ModelError, match="shapes"):
        row_cosines(ref, out[:2])


def test_metric_checks_and_table() -> None:
    checks = [
        MetricCheck("top-1 agreement", 0.75, 0.9, detail="3/4 samples"),
        MetricCheck("perplexity ratio", 1.02, 1.05, higher_is_better=False),
        MetricCheck("perplexity ratio", 1.08, 1.05, higher_is_better=False),
        MetricCheck("free-running", 0.5),
        MetricCheck("nan", float("nan"), 1.0, higher_is_better=False),
    ]
    assert [c.result for c in checks] == ["FAIL", "pass", "FAIL", "reported", "FAIL"]
    table = metrics_markdown(checks)
    assert table.splitlines()[0] == "| metric | value | threshold | result | detail |"
    assert "| top-1 agreement | 0.7500 | >= 0.9 | FAIL | 3/4 samples |" in table
    assert "| perplexity ratio | 1.0200 | <= 1.05 | pass |  |" in table
    assert json.loads(json.dumps(checks[0].to_json()))["passed"] is False


def classifier(path: Path, weights: np.ndarray) -> Path:
    """probs = Softmax(x @ W) over 4 classes."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("Softmax", ["z"], ["probs"])],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(weights.astype(np.float32), "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_classification_top1_agreement(tmp_path: Path) -> None:
    weights = np.random.default_rng(0).standard_normal((8, 4))
    reference = OrtRunner(classifier(tmp_path / "ref.onnx", weights))
    swapped = OrtRunner(classifier(tmp_path / "swapped.onnx", weights[:, [1, 0, 2, 3]]))
    feeds = [{"x": np.random.default_rng(k).standard_normal((16, 8)).astype(np.float32)} for k in range(2)]
    loose = Tolerances(max_abs=1.0, max_rel=1e3, cosine=-1.0)
    same = compare_runners(reference, reference, feeds, loose, task="classification", min_top1=1.0)
    assert [(m.name, m.value, m.passed) for m in same.metrics] == [("top-1 agreement, probs", 1.0, True)]
    assert same.metrics[0].detail == "32/32 samples"
    report = compare_runners(reference, swapped, feeds, loose, task="classification", min_top1=0.9)
    assert all(r.passed for r in report.rows) and not report.passed  # only the metric fails
    assert report.metrics[0].value < 0.9
    with pytest.raises(VerificationError, match="top-1 agreement, probs") as exc:
        raise_if_failed(report, "target 'cpu'")
    assert "| top-1 agreement, probs |" in str(exc.value) and "FAIL" in str(exc.value)
    reported = compare_runners(reference, swapped, feeds, loose, task="classification")
    assert reported.passed and reported.metrics[0].result == "reported"


def test_encoder_cosine_per_sample(tmp_path: Path) -> None:
    weights = np.random.default_rng(0).standard_normal((8, 4))
    reference = OrtRunner(classifier(tmp_path / "ref.onnx", weights))
    feeds = [{"x": np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)}]
    report = compare_runners(reference, reference, feeds, Tolerances(), task="feature-extraction")
    (check,) = report.metrics
    assert check.name == "cosine per sample, probs" and check.value == pytest.approx(1.0)
    assert check.threshold == Tolerances().cosine and "of 5 samples" in check.detail


# -- compile with thresholds ---------------------------------------------------------------------------------
def decoder_spec(tmp_path: Path, verify: str) -> Path:
    (tmp_path / "text.txt").write_text(" ".join(f"w{t}" for t in IDS))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model:\n  source: hf\n  path: {tiny_folder('llama')}\n  task: text-generation\n"
        "pipeline: [logits-last-token]\ntargets:\n  cpu: {}\n"
        "verify:\n  prompts: ['w5 w17 w33 w8']\n  new_tokens: 6\n  perplexity_text: text.txt\n"
        f"  perplexity_tokens: 20\n  perplexity_window: 10\n{verify}output:\n  dir: out\n"
    )
    return spec


def test_compile_reports_decoder_metrics(tmp_path: Path, capsys) -> None:
    spec = decoder_spec(tmp_path, "  max_perplexity_ratio: 1.001\n  min_free_running_agreement: 1.0\n")
    result = run_cli(capsys, "compile", spec)
    assert result.code == 0, result.err
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| metric | value | threshold | result | detail |" in report
    assert (
        "| teacher-forced greedy tokens vs onnx (worst prompt) | 1.0000 | >= 1 | pass | 6/6 over 1 prompts |"
        in report
    )
    assert "| free-running greedy tokens vs onnx (leading, all prompts) | 1.0000 | >= 1 | pass |" in report
    assert (
        "| perplexity ratio vs onnx | 1.0000 | <= 1.001 | pass |" in report
        and "on 18 tokens (2 windows)" in report
    )


def test_missed_threshold_fails_the_compile_with_a_table(tmp_path: Path, capsys) -> None:
    result = run_cli(capsys, "compile", decoder_spec(tmp_path, "  max_perplexity_ratio: 0.5\n"))
    assert result.code == 1
    assert "accuracy misses the spec's thresholds: perplexity ratio vs onnx" in result.err
    assert "| perplexity ratio vs onnx | 1.0000 | <= 0.5 | FAIL |" in result.err
    assert "| teacher-forced greedy tokens vs onnx (worst prompt) | 1.0000 | >= 1 | pass |" in result.err
    assert not (tmp_path / "out").exists()


def test_thresholds_that_do_not_fit_the_task_or_the_text(tmp_path: Path, capsys) -> None:
    classifier(tmp_path / "model.onnx", np.ones((8, 4)))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model:\n  path: model.onnx\ntargets:\n  cpu: {}\n"
        "verify:\n  dims: {batch: 2}\n  max_perplexity_ratio: 1.05\noutput:\n  dir: out\n"
    )
    result = run_cli(capsys, "compile", spec)
    assert result.code == 2 and "verify.max_perplexity_ratio does not apply" in result.err
    assert "spec.yaml:7" in result.err
    bad_text = decoder_spec(tmp_path, "").read_text().replace("text.txt", "nope.txt")
    spec.write_text(bad_text)
    result = run_cli(capsys, "compile", spec)
    assert result.code == 2 and "cannot read the perplexity text" in result.err
