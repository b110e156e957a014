"""Generator (prefill + decode with a KV cache) on tiny exported decoders, against PyTorch eager; artifacts,
the bench functions and the generate/bench commands."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import typer
from fixtures_frontends.tiny import EOS, VOCAB, load_torch, tiny_artifact, tiny_folder, tiny_import
from typer.testing import CliRunner

from llmc import bench
from llmc.cli_decoder import register
from llmc.errors import ModelError
from llmc.runtime.generator import (
    Generator,
    SamplingConfig,
    TorchGenerator,
    load_artifact_generator,
    load_artifact_runner,
    pick_token,
    teacher_forced_agreement,
)
from llmc.runtime.runner import OrtRunner
from llmc.runtime.tokenizer import StreamDecoder, Tokenizer

DECODERS = ("llama", "gpt2")
PROMPT = [5, 17, 33, 8, 61, 40, 12]


def onnx_generator(kind: str) -> Generator:
    imported = tiny_import(kind)
    return Generator(
        OrtRunner(imported.info["onnx_path"]), imported.decoder, Tokenizer.from_dir(tiny_folder(kind))
    )


def torch_generator(kind: str) -> TorchGenerator:
    return TorchGenerator(load_torch(kind), tiny_import(kind).decoder, Tokenizer.from_dir(tiny_folder(kind)))


@pytest.mark.parametrize("kind", DECODERS)
def test_greedy_tokens_match_pytorch_with_the_kv_cache(kind):
    ours = onnx_generator(kind).generate(PROMPT, 8, stop_at_eos=False)
    theirs = torch_generator(kind).generate(PROMPT, 8, stop_at_eos=False)
    assert len(ours.tokens) == 8 and ours.tokens == theirs.tokens
    assert ours.prompt_tokens == PROMPT and ours.stop_reason == "max_new_tokens"
    assert ours.prefill_ms > 0 and ours.decode_tokens_per_s > 0 and len(ours.step_ms) == 7


@pytest.mark.parametrize("kind", DECODERS)
def test_prefill_then_decode_equals_a_full_rerun(kind):
    gen = onnx_generator(kind)
    gen.prefill(PROMPT)
    extra = [9, 22, 71]
    for token in extra:
        stepped = gen.step(token)
    assert gen.length == len(PROMPT) + len(extra)
    full = gen.prefill(PROMPT + extra)
    np.testing.assert_allclose(stepped, full, atol=1e-4, rtol=1e-4)
    torch_logits = torch_generator(kind).prefill(PROMPT + extra)
    np.testing.assert_allclose(full, torch_logits, atol=1e-4, rtol=1e-4)


def test_batched_prefill_and_step():
    gen = onnx_generator("llama")
    ids = np.array([PROMPT, PROMPT[::-1]])
    logits = gen.prefill(ids)
    assert logits.shape == (2, VOCAB)
    np.testing.assert_allclose(logits[0], gen.prefill(PROMPT)[0], atol=1e-5)
    gen.prefill(ids)
    assert gen.step([3, 4]).shape == (2, VOCAB)


def test_teacher_forced_agreement():
    ours, theirs = onnx_generator("llama"), torch_generator("llama")
    reference = theirs.generate(PROMPT, 10, stop_at_eos=False).tokens
    agreement = teacher_forced_agreement(ours, PROMPT, reference)
    assert (agreement.matches, agreement.total, agreement.first_mismatch) == (10, 10, None)
    assert agreement.ratio == 1.0
    wrong = list(reference)
    wrong[4] = (wrong[4] + 1) % VOCAB
    agreement = teacher_forced_agreement(ours, PROMPT, wrong)
    assert agreement.first_mismatch == 4 and agreement.matches <= 9  # later steps see the wrong token too
    assert teacher_forced_agreement(ours, PROMPT, []).total == 0


def test_eos_stops_and_max_length_limits():
    imported = tiny_import("llama")
    gen = onnx_generator("llama")
    first = gen.generate(PROMPT, 1).tokens[0]
    spec = type(imported.decoder)(**{**imported.decoder.to_json(), "eos_token_ids": [first]})
    stopped = Generator(gen.runner, spec).generate(PROMPT, 5)
    assert stopped.tokens == [first] and stopped.stop_reason == "eos"
    short = Generator(gen.runner, type(spec)(**{**spec.to_json(), "max_length": 10, "eos_token_ids": []}))
    capped = short.generate(PROMPT, 20)
    assert len(PROMPT) + len(capped.tokens) - 1 == 10 and capped.stop_reason == "max_length"
    with pytest.raises(ModelError, match="longer than the model's max_length"):
        short.generate(list(range(11)), 2)
    with pytest.raises(ModelError, match="empty prompt"):
        gen.generate([], 2)


def test_text_prompts_streaming_and_sampling():
    gen = onnx_generator("llama")
    pieces: list[tuple[int, str]] = []
    result = gen.generate("w5 w17 w33", 6, stream=lambda t, s: pieces.append((t, s)), stop_at_eos=False)
    assert result.prompt_tokens == [5, 17, 33]
    assert [t for t, _ in pieces] == result.tokens
    assert "".join(s for _, s in pieces).split() == result.text.split()
    sampled = [
        gen.generate(PROMPT, 6, sampling=SamplingConfig(greedy=False, seed=7), stop_at_eos=False)
        for _ in "ab"
    ]
    assert sampled[0].tokens == sampled[1].tokens
    tiny_p = gen.generate(
        PROMPT, 6, sampling=SamplingConfig(greedy=False, top_p=1e-6, seed=1), stop_at_eos=False
    )
    assert tiny_p.tokens == gen.generate(PROMPT, 6, stop_at_eos=False).tokens
    with pytest.raises(ModelError, match="no tokenizer"):
        Generator(gen.runner, gen.decoder).generate("w5", 2)


def test_pick_token_filters():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    assert pick_token(logits, SamplingConfig(), rng) == 1
    top2 = {
        pick_token(logits, SamplingConfig(greedy=False, top_k=2, temperature=5.0), rng) for _ in range(50)
    }
    assert top2 == {1, 2}
    with pytest.raises(ModelError):
        SamplingConfig(top_p=0)


def test_tokenizer_chat_template_and_stream_decoder():
    tok = Tokenizer.from_dir(tiny_folder("llama"))
    assert tok.chat("w9") == "w5 w9 w6 "
    stream = StreamDecoder(tok)
    assert [stream.push(t) for t in (7, 8)] == ["w7", " w8"]


def test_generator_rejects_a_model_without_kv_cache():
    encoder = OrtRunner(tiny_import("bert").info["onnx_path"])
    with pytest.raises(ModelError, match="missing"):
        Generator(encoder, tiny_import("llama").decoder)


def test_artifact_loading(tmp_path):
    artifact = tiny_artifact("llama")
    runner, manifest = load_artifact_runner(artifact)
    assert manifest["task"] == "text-generation" and runner.model_path.name == "model.onnx"
    gen = load_artifact_generator(artifact)
    assert gen.tokenizer is not None and gen.decoder.eos_token_ids == [EOS]
    with pytest.raises(ModelError, match="no manifest.json"):
        load_artifact_runner(tmp_path)
    shutil.copytree(tiny_artifact("bert"), tmp_path / "bert")
    with pytest.raises(ModelError, match="cannot generate"):
        load_artifact_generator(tmp_path / "bert")


def test_bench_decoder_side_by_side():
    result = bench.bench_decoder(
        tiny_artifact("llama"), prompt_len=12, new_tokens=6, runs=2, warmup=1, perplexity_tokens=40
    )
    names = [row["name"] for row in result["results"]]
    assert names == ["pytorch", "onnx-plain", "llmc"] and result["reference"] == "pytorch"
    accuracy = result["settings"]["accuracy"]
    assert accuracy["reference"] == "pytorch" and accuracy["prompts"] == 3  # bench prompt + 2 verify prompts
    assert accuracy["perplexity_tokens"] == 40  # the shipped text, all unknown words (w0) for this tokenizer
    for row in result["results"]:
        assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["size_mb"] > 0 and row["rss_mb"] >= 0 and row["greedy_identical"]
        assert row["perplexity"] > 1 and row["perplexity_ratio"] == pytest.approx(1, abs=1e-3)
    assert "tokens_agree" not in result["results"][0]  # the reference is not compared with itself
    for row in result["results"][1:]:
        assert row["tokens_agree"] == row["tokens_total"] == 18 and row["tokens_agree_per_prompt"] == [6] * 3
    assert result["results"][2]["x_onnx-plain"] > 0
    assert "cpu_flags" in result["machine"] and len(result["prompt_tokens"]) == 12
    table = bench.markdown_table(result)
    assert table.startswith("| candidate |") and "| llmc |" in table and "18/18" in table
    assert "tokens = pytorch (teacher-forced)" in table and "(reference)" in table and "perplexity" in table
    json.dumps(result)


def test_bench_against_another_artifact_times_both_with_a_ratio(tmp_path):
    other = shutil.copytree(tiny_artifact("llama"), tmp_path / "llama-copy")
    result = bench.bench_decoder(
        tiny_artifact("llama"),
        baselines=["onnx-plain"],
        against=[other],
        prompt_len=8,
        new_tokens=4,
        runs=2,
        threads=1,
    )
    assert result["machine"]["threads"] == 1
    names = [row["name"] for row in result["results"]]
    assert names == ["onnx-plain", "llmc", "llama-copy"]
    copy_row = result["results"][2]
    assert copy_row["x_llmc"] > 0 and copy_row["greedy_identical"] and copy_row["size_mb"] > 0
    assert copy_row["tokens_agree"] == copy_row["tokens_total"]  # the same model: every token agrees
    assert "decode × llmc" in bench.markdown_table(result)
    with pytest.raises(ModelError, match="feature-extraction"):
        bench.bench_decoder(
            tiny_artifact("llama"), baselines=[], against=[tiny_artifact("bert")], prompt_len=8, new_tokens=4
        )


def test_bench_accuracy_without_baselines_and_turned_off():
    artifact = tiny_artifact("llama")
    alone = bench.bench_decoder(
        artifact, baselines=[], prompt_len=8, new_tokens=4, runs=1, perplexity_tokens=20
    )
    (row,) = alone["results"]
    assert alone["settings"]["accuracy"]["reference"] == "onnx-plain"  # loaded for accuracy only
    assert row["tokens_agree"] == row["tokens_total"] == 12 and row["perplexity_ratio"] == pytest.approx(1)
    off = bench.bench_artifact(artifact, baselines=[], prompt_len=8, new_tokens=4, runs=1, accuracy=False)
    assert "tokens_agree" not in off["results"][0] and "perplexity" not in off["results"][0]
    assert "accuracy not measured" in bench.markdown_table(off)


def test_bench_encoder_and_skipped_baselines(tmp_path):
    artifact = shutil.copytree(tiny_artifact("bert"), tmp_path / "bert")
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["source"]["reference_onnx"] = None
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    result = bench.bench_artifact(artifact, batch_sizes=[1, 2], seq_len=8, runs=2, prompt_len=99)
    assert [row["name"] for row in result["results"]] == ["pytorch", "llmc"]
    assert "onnx-plain" in result["skipped"]
    assert result["results"][1]["min_cosine"] > 0.9999 and result["results"][1]["mean_cosine"] > 0.9999
    assert "skipped onnx-plain" in bench.markdown_table(result)
    with pytest.raises(ModelError, match="unknown baseline"):
        bench.bench_artifact(artifact, baselines=["tensorflow"])


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_generate_streams_and_reports():
    result = CliRunner().invoke(
        cli(), ["generate", str(tiny_artifact("llama")), "--prompt", "w5 w17", "-n", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "prefill" in result.output
    sampled = CliRunner().invoke(
        cli(),
        [
            "generate",
            str(tiny_artifact("llama")),
            "-p",
            "w5",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "3",
        ],
    )
    assert sampled.exit_code == 0, sampled.output


def test_cli_bench_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", str(tiny_artifact("llama")), "--baseline", "onnx-plain", "--prompt-len", "8"]
    result = CliRunner().invoke(cli(), [*args, "--new-tokens", "4", "--runs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [row["name"] for row in data["results"]] == ["onnx-plain", "llmc"]
    assert "decode tok/s" in result.output
