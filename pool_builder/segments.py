"""Segments: users clustered with FAISS k-means (cosine, on normalised vectors).

Segment ids stay stable across re-fits: new centroids are matched to old ones by the
assignment that maximises total similarity (Hungarian method), so segment "u3" keeps
meaning the same neighbourhood after a re-fit.
"""

from __future__ import annotations

import base64

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment

from schemas import Centroids

CENTROID_ROWS_PER_MESSAGE = 256  # 256 x 384 float32 = 393 kB, 524 kB in base64: below Kafka's ~1 MB default


def fit_centroids(vectors: np.ndarray, k: int, seed: int = 1234, iterations: int = 20) -> np.ndarray:
    if len(vectors) < k:
        raise ValueError(f"cannot fit {k} segments to {len(vectors)} vectors")
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False)
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return kmeans.centroids.copy()


def assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (inner product) for each vector."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, nearest = index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return nearest[:, 0]


def nearest_users(vectors: np.ndarray, centroids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each centroid, the `k` most similar vectors (inner product): (similarities, row indices)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index.search(np.ascontiguousarray(centroids, dtype=np.float32), k)


def match_to_previous(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Reorder `new` centroids so that row i is the one most like old row i (stable ids)."""
    if old is None or len(old) != len(new):
        return new
    rows, cols = linear_sum_assignment(-(old @ new.T))
    order = np.empty(len(new), dtype=np.int64)
    order[rows] = cols
    return new[order]


def segment_name(kind: str, index: int) -> str:
    return f"{kind[0]}{index}"


def centroid_messages(centroids: np.ndarray, version: int, fitted_on: int,
                      rows_per_message: int = CENTROID_ROWS_PER_MESSAGE) -> list[Centroids]:
    """A fit's centroids as messages for the centroids topic (chunks of rows)."""
    import uuid

    rows = np.ascontiguousarray(centroids, dtype=np.float32)
    starts = range(0, len(rows), rows_per_message)
    fit_id = uuid.uuid4().hex[:12]
    return [Centroids(version=version, fit_id=fit_id, segments=len(rows), dim=rows.shape[1], chunk=n, chunks=len(starts), first_row=start,
                      rows_b64=base64.b64encode(rows[start : start + rows_per_message].tobytes()).decode(), fitted_on=fitted_on)
            for n, start in enumerate(starts)]


class CentroidsReplica:
    """The latest complete centroids read from the topic: chunks gather per version; a version is taken once all
    its chunks arrived and it is newer than the one held (a late chunk of an older fit changes nothing)."""

    def __init__(self) -> None:
        self.version = 0
        self.centroids: np.ndarray | None = None
        self.fitted_on = 0
        self.staged: dict[tuple[int, str], dict[int, Centroids]] = {}

    def apply(self, message: Centroids) -> bool:
        """True when this message completed a newer version."""
        if message.version <= self.version:
            return False
        chunks = self.staged.setdefault((message.version, message.fit_id), {})
        chunks[message.chunk] = message
        if len(chunks) < message.chunks:
            return False
        rows = np.zeros((message.segments, message.dim), dtype=np.float32)
        for chunk in chunks.values():
            block = np.frombuffer(base64.b64decode(chunk.rows_b64), dtype=np.float32).reshape(-1, message.dim)
            rows[chunk.first_row : chunk.first_row + len(block)] = block
        self.version, self.centroids, self.fitted_on = message.version, rows, message.fitted_on
        self.staged = {key: c for key, c in self.staged.items() if key[0] > message.version}
        return True
