"""Deterministic embeddings and relevance scores for /v1/embeddings, /score and /rerank (pure).

An embedding is the normalised sum of one pseudo-random vector per token (derived from the token id
and the seed with SHAKE-128), so texts that share words get similar vectors and the same text always
gets the same unit vector. Scores map cosine similarity from [-1, 1] to [0, 1].
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from collections import Counter


def _token_vector(token_id: int, dim: int, seed: int) -> bytes:
    return hashlib.shake_128(f"{seed}:{token_id}".encode()).digest(dim)


def embed(token_ids: list[int], dim: int, seed: int = 0) -> list[float]:
    acc = [0.0] * dim
    for tid, weight in Counter(token_ids).items():
        for i, b in enumerate(_token_vector(tid, dim, seed)):
            acc[i] += weight * (b - 127.5)
    norm = math.sqrt(sum(v * v for v in acc)) or 1.0
    return [v / norm for v in acc]


def truncate(vector: list[float], dims: int) -> list[float]:
    """Matryoshka-style shortening: keep the first `dims` values, renormalise."""
    head = vector[:dims]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def relevance(a: list[float], b: list[float]) -> float:
    return (cosine(a, b) + 1.0) / 2.0


def to_base64(vector: list[float]) -> str:
    """vLLM's base64 encoding: little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
