"""The Hugging Face frontend on tiny random LLaMA (GQA), GPT-2 and BERT models: names, axes, numerics, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fixtures_frontends.tiny import EOS, VOCAB, load_torch, tiny_folder, tiny_import

from llmc.errors import ModelError
from llmc.frontends import hf
from llmc.frontends.export import ExportFailed

DECODERS = ("llama", "gpt2")


def session(kind: str) -> ort.InferenceSession:
    return ort.InferenceSession(tiny_import(kind).info["onnx_path"], providers=["CPUExecutionProvider"])


def decoder_feeds(kind: str, batch: int, seq: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    spec = tiny_import(kind).decoder
    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64),
    }
    for i in range(spec.num_layers):
        for name in (spec.past_key, spec.past_value):
            shape = (batch, spec.num_kv_heads, past, spec.head_dim)
            feeds[name.format(i=i)] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def torch_decoder(kind: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    model = load_torch(kind)
    spec = tiny_import(kind).decoder
    flat = [
        torch.from_numpy(feeds[n.format(i=i)])
        for i in range(spec.num_layers)
        for n in (spec.past_key, spec.past_value)
    ]
    with torch.no_grad():
        out = hf.DecoderWrapper(model)(
            torch.from_numpy(feeds["input_ids"]),
            torch.from_numpy(feeds["attention_mask"]),
            torch.from_numpy(feeds["position_ids"]),
            *flat,
        )
    return [t.numpy() for t in out]


@pytest.mark.parametrize("kind", DECODERS)
def test_decoder_io_follows_the_decoder_spec(kind):
    imported = tiny_import(kind)
    spec = imported.decoder
    assert imported.task == "text-generation" and imported.source == "hf"
    assert imported.info["exporter"] == "dynamo"
    assert spec.num_layers == 2 and spec.vocab_size == VOCAB and spec.max_length == 128
    assert spec.num_kv_heads == (2 if kind == "llama" else 4)
    assert spec.eos_token_ids == [EOS] and spec.bos_token_id == 1
    sess = session(kind)
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    outputs = {o.name: o.shape for o in sess.get_outputs()}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["input_ids"] == ["batch", "seq"] and inputs["attention_mask"] == ["batch", "total"]
    assert inputs["past_key_values.1.value"] == ["batch", spec.num_kv_heads, "past", spec.head_dim]
    assert outputs["logits"] == ["batch", "seq", VOCAB]
    assert outputs["present.1.key"] == ["batch", spec.num_kv_heads, "total", spec.head_dim]
    assert imported.graph.inputs == list(inputs) and imported.graph.outputs == list(outputs)


def test_initializers_keep_pytorch_names():
    llama = set(tiny_import("llama").graph.initializers)
    assert {
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
    } <= llama
    assert not any(name.startswith(("hf.", "module.")) for name in llama)
    gpt2 = set(tiny_import("gpt2").graph.initializers)
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"} & gpt2
    bert = set(tiny_import("bert").graph.initializers)
    assert "encoder.layer.1.attention.self.query.weight" in bert


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize(("batch", "seq", "past"), [(2, 5, 0), (1, 1, 7), (3, 4, 2)])
def test_decoder_matches_pytorch(kind, batch, seq, past):
    feeds = decoder_feeds(kind, batch, seq, past)
    got = session(kind).run(None, feeds)
    want = torch_decoder(kind, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_assets_are_the_tokenizer_and_config_files():
    assets = tiny_import("llama").assets
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"} <= set(assets)
    assert all(path.is_file() for path in assets.values())


def test_encoder_matches_pytorch_with_padding():
    imported = tiny_import("bert")
    assert imported.decoder is None and imported.task == "feature-extraction"
    sess = ort.InferenceSession(imported.info["onnx_path"], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state"]
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (2, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    types = np.zeros_like(ids)
    got = sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
    model = load_torch("bert")
    with torch.no_grad():
        want = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(types),
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1, :6], want[1, :6], atol=1e-4, rtol=1e-4)


def test_max_length_caps_the_decoder_spec():
    config = load_torch("llama").config
    assert hf.decoder_spec(tiny_folder("llama"), config, max_length=32).max_length == 32
    assert hf.decoder_spec(tiny_folder("llama"), config, max_length=4096).max_length == 128


def test_folder_without_config_is_a_model_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json"):
        hf.import_hf(tmp_path, task="text-generation", work_dir=tmp_path / "out")
    with pytest.raises(ModelError, match="not found"):
        hf.import_hf(tmp_path / "missing", task="text-generation", work_dir=tmp_path / "out")


def test_unsupported_task_and_bad_config_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not supported"):
        hf.import_hf(tiny_folder("llama"), task="classification", work_dir=tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ModelError, match="cannot load"):
        hf.import_hf(tmp_path, task="text-generation", work_dir=tmp_path / "out")


def test_export_failure_names_architecture_and_workaround(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise ExportFailed(
            {"dynamo": "RuntimeError: data-dependent control flow", "torchscript": "TypeError: nope"}
        )

    monkeypatch.setattr(hf, "export_onnx", fail)
    with pytest.raises(ModelError) as info:
        hf.import_hf(tiny_folder("gpt2"), task="text-generation", work_dir=tmp_path)
    text = str(info.value)
    assert "GPT2LMHeadModel" in text and "data-dependent control flow" in text
    assert "source: onnx" in text and "\n" in text  # the hint line


@pytest.mark.parametrize("kind", DECODERS)
def test_torchscript_fallback_exports_a_working_decoder(tmp_path, kind):
    model = load_torch(kind)
    result = hf.export_decoder(model, tmp_path / "model.onnx", exporters=("torchscript",))
    assert result.exporter == "torchscript"
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    names = {i.name for i in onnx.load(str(result.path)).graph.initializer}
    assert {"model.layers.0.self_attn.q_proj.weight", "transformer.h.0.attn.c_attn.weight"} & names
    for batch, seq, past in [(1, 3, 0), (2, 1, 4)]:
        feeds = decoder_feeds(kind, batch, seq, past, seed=3)
        for got, want in zip(sess.run(None, feeds), torch_decoder(kind, feeds), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_gguf_rejects_files_that_are_not_gguf(tmp_path):
    from llmc.frontends.gguf import import_gguf

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ModelError, match="not a GGUF file"):
        import_gguf(fake, work_dir=tmp_path / "out")
    with pytest.raises(ModelError, match="not found"):
        import_gguf(tmp_path / "missing.gguf", work_dir=tmp_path / "out")
    with pytest.raises(ModelError, match="text-generation"):
        import_gguf(fake, task="feature-extraction", work_dir=tmp_path / "out")


def test_gguf_rejects_tensor_types_it_cannot_dequantize(tmp_path, monkeypatch):
    import gguf
    import numpy as np

    from llmc.frontends.gguf import import_gguf

    monkeypatch.setenv("LLMC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    qtype = gguf.GGMLQuantizationType.Q8_1
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    writer.add_tensor("token_embd.weight", np.zeros((2, block_bytes), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="cannot dequantize: Q8_1"):
        import_gguf(path, work_dir=tmp_path / "out")
    assert not any((tmp_path / "cache").rglob("*.safetensors"))
