"""The BERT text encoder: shapes, normalisation, batching, and the real MiniLM offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import BertConfig, BertTokenizerFast

from features.keys import EMB_DIM
from ranking.encoder import TextEncoder

WORDS = [
    "red",
    "blue",
    "running",
    "shoes",
    "steel",
    "pan",
    "kettle",
    "coffee",
    "grinder",
    "leather",
    "wallet",
    "phone",
    "case",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TextEncoder:
    """A one-layer random BERT with a 20-word vocabulary: fast, and output dim = EMB_DIM."""
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=EMB_DIM,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=160,
    )
    return TextEncoder.from_config(config, tokenizer, device="cpu")


TEXTS = ["red running shoes", "steel coffee grinder kettle", "phone", "", "wallet " * 300]


def test_shape_dtype_and_unit_length(tiny: TextEncoder) -> None:
    out = tiny.encode(TEXTS)
    assert out.shape == (len(TEXTS), EMB_DIM) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_batch_equals_one_by_one(tiny: TextEncoder) -> None:
    together = tiny.encode(TEXTS)
    alone = np.stack([tiny.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_chunked_and_length_sorted_keep_input_order(tiny: TextEncoder) -> None:
    texts = [" ".join(WORDS[: 1 + i % len(WORDS)]) for i in range(150)]
    small_chunks = TextEncoder(tiny.model, tiny.tokenizer, device="cpu", batch_size=7)
    np.testing.assert_allclose(small_chunks.encode(texts), tiny.encode(texts), atol=1e-5)
    np.testing.assert_allclose(small_chunks.encode(texts[3:4])[0], tiny.encode(texts)[3], atol=1e-5)


def test_empty_list_and_truncation(tiny: TextEncoder) -> None:
    assert tiny.encode([]).shape == (0, EMB_DIM)
    # Beyond 128 tokens the text is cut, so a longer repetition changes nothing.
    long, longer = tiny.encode(["wallet " * 200, "wallet " * 400])
    np.testing.assert_allclose(long, longer, atol=1e-6)


def test_dim_follows_config(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    config = BertConfig(
        vocab_size=6, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8, max_position_embeddings=130,
    )  # fmt: skip
    enc = TextEncoder.from_config(config, BertTokenizerFast(vocab_file=str(vocab)), device="cpu")
    assert enc.dim == 16 and enc.encode(["hello"]).shape == (1, 16)


@pytest.mark.slow
def test_real_minilm_loads_offline_and_ranks_similar_titles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Any attempt to reach a hub must fail loudly rather than quietly succeed.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    enc = TextEncoder.from_pretrained(device="cpu")
    a, b, c = enc.encode(
        ["Men's trail running shoes", "Lightweight jogging sneakers", "Cast iron frying pan 28 cm"]
    )
    assert enc.dim == EMB_DIM
    assert float(a @ b) > float(a @ c) + 0.2
