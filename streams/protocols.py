"""What the agents need from their collaborators, as protocols (injected, never global)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from features.user_state import Vector


class ItemVectors(Protocol):
    def vector(self, item_id: str) -> Vector | None:
        """The item's text embedding, or None for an unknown or text-less item."""
        ...


class QueryEncoder(Protocol):
    """Embeds search queries for the ingest path: the Triton client, asynchronously (the
    BERT model itself is ``ranking.encoder.TextEncoder``, run inside Triton)."""

    async def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """BERT embeddings [n, 384], L2-normalised; raises a ShoprecError when unavailable."""
        ...
