"""Static token embeddings distilled from a sentence encoder, and the pooled features of a text window.

The embedding matrix (`models/encoder.npz`, int8 with one scale per token) and the WordPiece tokenizer
(`models/encoder_tokenizer.json`) are made by `scripts/distill_encoder.py` from all-MiniLM-L6-v2 with
model2vec's distillation: every vocabulary token passed through the transformer once, reduced by PCA. At
run time a window's features are plain numpy over those vectors (no PyTorch): the unit-length mean and
the per-dimension maximum of its tokens' vectors, and the window's length in tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

ENCODER_NAME = "encoder"
WINDOW_TOKENS = 256
STRIDE_TOKENS = 128


@dataclass(slots=True)
class Tokens:
    """A text's tokens: vocabulary ids and character spans (in the text that was tokenised)."""

    ids: I64
    starts: I64
    ends: I64

    def __len__(self) -> int:
        return len(self.ids)


def token_windows(
    count: int, window: int = WINDOW_TOKENS, stride: int = STRIDE_TOKENS
) -> list[tuple[int, int]]:
    """Overlapping token windows covering all `count` tokens; for very long texts the stride grows to the
    window size so the number of windows stays near `count / window` (work stays linear)."""
    if count <= window:
        return [(0, count)]
    stride = stride if count <= 64 * window else window
    starts = list(range(0, count - window, stride))
    starts.append(count - window)
    return [(start, start + window) for start in starts]


@dataclass
class StaticEncoder:
    embeddings: F32  # vocabulary x dims
    tokenizer: Tokenizer
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def feature_size(self) -> int:
        return 2 * self.dims + 1

    def tokenize(self, text: str) -> Tokens:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        if len(ids) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return Tokens(empty, empty, empty)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        return Tokens(ids, offsets[:, 0], offsets[:, 1])

    def features(self, ids: I64) -> F32:
        """[unit mean | max | log length] of one window's token vectors (zeros for no tokens)."""
        out = np.zeros(self.feature_size, dtype=np.float32)
        if len(ids) == 0:
            return out
        vectors = self.embeddings[ids]
        mean = vectors.mean(axis=0)
        norm = float(np.linalg.norm(mean))
        dims = self.dims
        out[:dims] = mean / norm if norm > 0 else mean
        out[dims : 2 * dims] = vectors.max(axis=0)
        out[-1] = math.log1p(len(ids)) / math.log1p(WINDOW_TOKENS)
        return out

    @classmethod
    def load(cls, directory: Path, name: str = ENCODER_NAME) -> StaticEncoder:
        with np.load(directory / f"{name}.npz") as data:
            values = np.asarray(data["embeddings"], dtype=np.float32)
            scale = np.asarray(data["scale"], dtype=np.float32)
        tokenizer = Tokenizer.from_file(str(directory / f"{name}_tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        meta_path = directory / f"{name}.json"
        metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return cls(values * scale[:, None], tokenizer, metadata)


__all__ = ["STRIDE_TOKENS", "WINDOW_TOKENS", "StaticEncoder", "Tokens", "token_windows"]
