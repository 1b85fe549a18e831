"""First-stage vector index: FAISS built from an index-factory string, inner product on
normalised embeddings, FAISS ids = row numbers of the token store and manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    import faiss
except ImportError as e:  # FAISS is an extra: exactly one of faiss-cpu / faiss-gpu (setup.cfg says why)
    raise ImportError("FAISS is not installed: pip install 'edje-search[cpu]', or 'edje-search[gpu]' on a "
                      "CUDA machine (one of the two, never both: they ship the same module)") from e


def configure_faiss() -> None:
    """FAISS settings that avoid slow paths: batched queries go through BLAS from 20 queries on
    (FAISS's default threshold, 20, is kept explicit here so a FAISS upgrade cannot move it)."""
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
    """Plain write; callers make it atomic with fsutil.atomic_write.

    FAISS writes through Python's file object (faiss.PyCallbackIOWriter), so a full disk or an
    I/O error is an OSError naming the file, not FAISS's internal assertion text."""
    try:
        with open(path, "wb") as f:
            faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def read_index(path: str | Path) -> faiss.Index:
    return faiss.read_index(str(path))


# ------------------------------------------------------------------------- recipes by size
AUTO = "auto"
FLAT_BELOW = 100_000  # exact search is cheap enough below this many vectors (autofaiss uses the same order)
PQ_FROM = 3_000_000  # beyond this, raw float vectors no longer fit RAM/page cache comfortably: compress
TRAIN_PER_LIST = 39  # FAISS warns below 39 training points per centroid


def _pow2(x: float) -> int:
    return int(2 ** max(0, round(np.log2(max(x, 1.0)))))


def choose_recipe(n: int, dim: int) -> str:
    """The FAISS factory string for ``n`` vectors of width ``dim`` (the plan autofaiss follows).

    Flat (exact) below 100k; IVF-Flat with about sqrt(n) lists up to a few million (lists are
    memory-mapped, so RAM does not grow with n); OPQ + IVF-PQ with 4 sqrt(n) lists beyond,
    whose candidates are re-scored exactly from the stored vectors.
    """
    if n < FLAT_BELOW:
        return "Flat"
    if n < PQ_FROM:
        return f"IVF{_pow2(np.sqrt(n))},Flat"
    m = 64 if dim % 64 == 0 else 32 if dim % 32 == 0 else 16
    return f"OPQ{m},IVF{_pow2(4 * np.sqrt(n))},PQ{m}"


def n_lists(recipe: str) -> int:
    """Inverted lists of an IVF factory string (0 for non-IVF recipes)."""
    for part in recipe.split(","):
        if part.startswith("IVF"):
            digits = "".join(ch for ch in part[3:] if ch.isdigit())
            return int(digits) if digits else 0
    return 0


def training_rows(recipe: str) -> int:
    """Vectors a recipe needs before it can be trained (0 = no training)."""
    return TRAIN_PER_LIST * n_lists(recipe) if n_lists(recipe) else (256 * 40 if "PQ" in recipe else 0)


def needs_refine(recipe: str) -> bool:
    """Recipes with lossy codes: their candidates are re-scored exactly from the stored vectors."""
    return "PQ" in recipe or "SQ" in recipe


def new_segment_index(recipe: str, dim: int, trained: faiss.Index | None = None) -> faiss.Index:
    """An empty index for one segment: a copy of the trained template, or a fresh untrained-free one.

    IVF indexes keep ids in their inverted lists (memory-mapped on read); other types get an
    IndexIDMap wrapper (ids in RAM: only small, flat segments use it).
    """
    if trained is not None:
        return faiss.clone_index(trained)
    base = faiss.index_factory(dim, recipe, faiss.METRIC_INNER_PRODUCT)
    if is_ivf(base):
        return base
    return faiss.IndexIDMap(base)


def use_gpu_for_training(index: faiss.Index) -> bool:
    """With faiss-gpu and a GPU, run an IVF recipe's k-means on the GPUs (FAISS's documented way:
    a GPU flat index as the clustering index). The trained index stays a CPU index, so it is
    written and memory-mapped as usual. Returns whether a GPU is used."""
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0 or not is_ivf(index):
        return False
    ivf = faiss.extract_index_ivf(index)
    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    return True


def is_ivf(index: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


def read_segment(path: str | Path, recipe: str) -> faiss.Index:
    """Read a segment memory-mapped: IVF inverted lists (IO_FLAG_MMAP) or flat codes (IO_FLAG_MMAP_IFC)
    stay on disk, in the page cache, so RAM does not grow with the index. FAISS takes one flag or
    the other, not both."""
    flag = faiss.IO_FLAG_MMAP if n_lists(recipe) else faiss.IO_FLAG_MMAP_IFC
    return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)


def _ivf_lists(index: faiss.Index, with_codes: bool):
    """(ids, codes or None) of each non-empty inverted list of an IVF index."""
    inv = faiss.extract_index_ivf(index).invlists
    for li in range(inv.nlist):
        size = inv.list_size(li)
        if size:
            ids = faiss.rev_swig_ptr(inv.get_ids(li), size).copy()
            codes = faiss.rev_swig_ptr(inv.get_codes(li), size * inv.code_size).copy() if with_codes else None
            yield ids, codes


def segment_ids(index: faiss.Index) -> np.ndarray:
    """Every id stored in a segment index."""
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map)
    out = [ids for ids, _ in _ivf_lists(index, with_codes=False)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def exact_contents(index: faiss.Index, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, float vectors) held by a segment whose codes are the exact vectors (Flat behind an
    IDMap, IVF-Flat, memory-mapped or not); None for lossy or graph indexes."""
    if hasattr(index, "id_map"):
        inner = faiss.downcast_index(index.index)
        if not isinstance(inner, faiss.IndexFlat):
            return None
        ids = faiss.vector_to_array(index.id_map)
        return ids, faiss.rev_swig_ptr(inner.get_xb(), index.ntotal * dim).reshape(index.ntotal, dim).copy()
    if not isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat):
        return None
    parts = list(_ivf_lists(index, with_codes=True))
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return (np.concatenate([ids for ids, _ in parts]),
            np.concatenate([codes.view(np.float32).reshape(-1, dim) for _, codes in parts]))


def _params(index: faiss.Index, sel, nprobe: int | None, ef_search: int | None):
    if is_ivf(index):
        p = faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe or 1))
        if isinstance(index, faiss.IndexPreTransform):
            return faiss.SearchParametersPreTransform(index_params=p)
        return p
    if ef_search and "HNSW" in type(faiss.downcast_index(getattr(index, "index", index))).__name__:
        return faiss.SearchParametersHNSW(sel=sel, efSearch=int(ef_search))
    return faiss.SearchParameters(sel=sel) if sel is not None else None


SMALL_BATCH = 16  # query batches below this size search on one OpenMP thread


def search_segments(segments: list[faiss.Index], queries: np.ndarray, k: int, *, exclude=None, include=None,
                    nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Search every segment and keep the best ``k`` per query: (scores (Q, k), rows (Q, k), -1 padded).

    ``exclude``: rows to leave out (removed rows still present in older segments). ``include``:
    search only these rows (a filter's live rows; ``exclude`` is then not needed).
    """
    configure_faiss()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if include is not None:
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(include, dtype=np.int64))
    else:
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(exclude, dtype=np.int64))) \
            if exclude is not None and len(exclude) else None
    scores, rows = [], []
    # A few queries are answered fastest on one thread: OpenMP's fork/join per segment costs more
    # than the work, and on a loaded machine its spinning threads cost 10x (measured: 12 ms vs
    # 155 ms for one query over 13 IVF segments at 1M rows, 2 cores under load).
    saved = faiss.omp_get_max_threads()
    if len(q) < SMALL_BATCH:
        faiss.omp_set_num_threads(1)
    try:
        for seg in segments:
            if seg.ntotal == 0:
                continue
            d, i = seg.search(q, min(k, seg.ntotal), params=_params(seg, sel, nprobe, ef_search))
            scores.append(d)
            rows.append(i)
    finally:
        faiss.omp_set_num_threads(saved)
    if not scores:
        return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    d = np.concatenate(scores, axis=1)
    i = np.concatenate(rows, axis=1)
    d = np.where(i < 0, -np.inf, d)
    order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    if d.shape[1] < k:  # fewer candidates than asked: pad like FAISS does
        pad = k - d.shape[1]
        d = np.pad(d, ((0, 0), (0, pad)), constant_values=-np.inf)
        i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
    return d.astype(np.float32), i.astype(np.int64)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row positions of the exact top-k by inner product (recall measurements)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def refine_exact(queries: np.ndarray, rows: np.ndarray, k: int, vectors_of) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate ``rows`` (Q, K) of lossy codes exactly against the stored vectors
    (``vectors_of(rows)`` -> (n, E)) and keep the best ``k``: (scores (Q, k), rows (Q, k))."""
    valid = rows >= 0
    uniq, inverse = np.unique(rows[valid], return_inverse=True)
    vecs = vectors_of(uniq)
    exact = np.full(rows.shape, -np.inf, np.float32)
    q_of = np.broadcast_to(np.arange(len(rows))[:, None], rows.shape)[valid]
    exact[valid] = np.einsum("nd,nd->n", queries[q_of], vecs[inverse])
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, 1), np.take_along_axis(rows, order, 1)
