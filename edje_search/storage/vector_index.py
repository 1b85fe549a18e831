"""First-stage vector index: FAISS built from an index-factory string, inner product on
normalised embeddings, FAISS ids = row numbers of the token store and manifest."""
from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np


def configure_faiss() -> None:
    """FAISS settings that avoid slow paths (DESIGN.md): batched queries go through BLAS early."""
    faiss.cvar.distance_compute_blas_threshold = 20


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty index mapping our row ids, e.g. factory "Flat" or "HNSW32,Flat"."""
    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS index factory string {factory!r}: {str(e).splitlines()[0]}") from e
    return faiss.IndexIDMap2(base)


def add_vectors(index: faiss.Index, vectors: np.ndarray, rows: np.ndarray, all_vectors=None) -> None:
    """Add (b, E) vectors under ids ``rows``; trains the index first when it needs training.

    ``all_vectors`` (every committed vector) is used as the training set when given.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not index.is_trained:
        train = vectors if all_vectors is None else np.ascontiguousarray(all_vectors, dtype=np.float32)
        index.train(train)
    index.add_with_ids(vectors, np.asarray(rows, dtype=np.int64))


def row_ids(index: faiss.Index) -> np.ndarray:
    """The row ids held by an index made with :func:`new_index`."""
    return faiss.vector_to_array(index.id_map)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, E) queries -> (scores (Q, k), rows (Q, k)); rows are -1 where fewer than k exist."""
    configure_faiss()
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def write_index(index: faiss.Index, path: str | Path) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def read_index(path: str | Path) -> faiss.Index:
    return faiss.read_index(str(path))
