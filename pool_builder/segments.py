"""Segments: users clustered with FAISS k-means (cosine, on normalised vectors).

Segment ids stay stable across re-fits: new centroids are matched to old ones by the
assignment that maximises total similarity (Hungarian method), so segment "u3" keeps
meaning the same neighbourhood after a re-fit.
"""

from __future__ import annotations

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment


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
