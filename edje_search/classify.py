"""Zero-shot classification: the first stage shortlists labels, the joint encoder decides.

Each label becomes a prompt (``template.format(label)``). Per image, the ``shortlist`` labels
whose prompt embeddings are nearest to the image embedding (first stage, cosine) are scored by
the joint encoder against the image's stored tokens. Single-label: ``prob`` is the softmax of
the shortlisted logits; multi-label: ``prob = sigmoid(logit)`` and labels at or above
``min_prob`` are kept. ``first_stage_label`` is the label the first stage alone would give.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .devices import precision_autocast
from .errors import BadInput
from .models.bundle import EdjeModel
from .pipeline import ImageEmbedder
from .scoring import embed_captions, sigmoid


@dataclasses.dataclass(frozen=True)
class ClassifySettings:
    template: str = "{}"
    shortlist: int = 5  # labels per image that the joint encoder scores
    top_k: int = 3  # labels reported per image (single-label)
    multi_label: bool = False
    min_prob: float = 0.5  # multi-label: keep labels with sigmoid(logit) at or above this
    batch_size: int = 64

    def __post_init__(self):
        if "{}" not in self.template:
            raise BadInput(f"the template must contain {{}} where the label goes (got {self.template!r})")
        if self.shortlist < 1 or self.top_k < 1:
            raise BadInput("shortlist and top_k must be at least 1")
        if not 0.0 <= self.min_prob <= 1.0:
            raise BadInput(f"min_prob must be between 0 and 1 (got {self.min_prob})")


def check_labels(labels: Sequence[str]) -> list[str]:
    labels = [str(x).strip() for x in labels]
    if not labels or not all(labels):
        raise BadInput("give at least one label, none of them empty")
    if len(set(labels)) != len(labels):
        raise BadInput("labels repeat: give each label once")
    return labels


class LabelSet:
    """Labels, their prompts and the prompts' first-stage embeddings, computed once per run."""

    def __init__(self, model: EdjeModel, labels: Sequence[str], settings: ClassifySettings = ClassifySettings()):
        self.labels = check_labels(labels)
        self.settings = settings
        self.prompts = [settings.template.replace("{}", label) for label in self.labels]
        self.embeddings = embed_captions(model, self.prompts)
        self.model = model

    def classify(self, vectors: np.ndarray, tokens: torch.Tensor) -> list[dict]:
        """One result per image, given first-stage vectors (N, E) and stored tokens (N, m, D_lm):
        ``{"labels": [{"label", "prob", "logit", "cosine"}, ...], "first_stage_label"}``."""
        s = self.settings
        vectors = np.asarray(vectors, dtype=np.float32)
        n, n_labels = len(vectors), len(self.labels)
        if n == 0:
            return []
        cosines = vectors @ self.embeddings.T  # (N, L)
        width = min(s.shortlist, n_labels)
        shortlist = np.argsort(-cosines, axis=1, kind="stable")[:, :width]  # (N, width), first-stage order
        with precision_autocast(self.model.device):
            logits = self.model.reranker.score_pairs(
                self.prompts, tokens, shortlist.reshape(-1), np.repeat(np.arange(n), width),
                batch_size=s.batch_size).reshape(n, width)
        out = []
        for i in range(n):
            if s.multi_label:
                probs = sigmoid(logits[i])
            else:
                z = np.exp(logits[i].astype(np.float64) - logits[i].max())
                probs = z / z.sum()
            order = np.argsort(-logits[i], kind="stable")
            chosen = [j for j in order if probs[j] >= s.min_prob] if s.multi_label else list(order[: s.top_k])
            out.append({"labels": [{"label": self.labels[shortlist[i, j]], "prob": round(float(probs[j]), 6),
                                    "logit": round(float(logits[i, j]), 6),
                                    "cosine": round(float(cosines[i, shortlist[i, j]]), 6)} for j in chosen],
                        "first_stage_label": self.labels[shortlist[i, 0]]})
        return out


def classify_rows(rows_scorer, labels: Sequence[str], rows: Sequence[int] | None = None,
                  settings: ClassifySettings = ClassifySettings(), *, chunk: int = 1024) -> Iterator[dict]:
    """Classify indexed rows (default: every live row, in manifest order) from their stored vectors
    and tokens, ``chunk`` rows at a time; ``rows_scorer`` is ``Engine.scorer()``. Yields
    ``{"row", "image", "labels", "first_stage_label"}``."""
    label_set = LabelSet(rows_scorer.model, labels, settings)
    if rows is None:
        entries = ((row, path) for row, path, _ in rows_scorer.entries())
    else:
        wanted = [int(r) for r in rows]
        live = rows_scorer.paths(wanted)
        gone = [r for r in wanted if r not in live]
        if gone:
            raise BadInput(f"rows not in the index: {gone[:10]}")
        entries = ((r, live[r]) for r in wanted)
    batch: list[tuple[int, str]] = []
    for item in entries:
        batch.append(item)
        if len(batch) >= chunk:
            yield from _classify_row_batch(label_set, rows_scorer, batch)
            batch = []
    if batch:
        yield from _classify_row_batch(label_set, rows_scorer, batch)


def _classify_row_batch(label_set: LabelSet, rows_scorer, batch: list[tuple[int, str]]) -> list[dict]:
    vectors, tokens = rows_scorer.row_data([r for r, _ in batch])
    results = label_set.classify(vectors, tokens)
    return [{"row": r, "image": path, **res} for (r, path), res in zip(batch, results)]


def classify_files(model: EdjeModel, labels: Sequence[str], paths: Sequence[str],
                   settings: ClassifySettings = ClassifySettings(), *, num_workers: int = 2,
                   chunk: int = 1024) -> Iterator[dict]:
    """Classify image files (vision tower running); yields ``{"image", "labels", "first_stage_label"}``
    per readable file, or ``{"image", "error"}`` for a file that could not be used."""
    label_set = LabelSet(model, labels, settings)
    with ImageEmbedder(model, batch_size=settings.batch_size, num_workers=num_workers,
                       token_dtype="float32") as embedder:
        for s in range(0, len(paths), chunk):
            for batch in embedder.embed([str(p) for p in paths[s:s + chunk]], progress=False):
                for path, reason in batch.failed:
                    yield {"image": path, "error": reason}
                results = label_set.classify(batch.vectors, torch.from_numpy(batch.tokens))
                for path, res in zip(batch.paths, results):
                    yield {"image": path, **res}


def classify(model_or_engine, labels: Sequence[str], images=None, *, rows: Sequence[int] | None = None,
             settings: ClassifySettings = ClassifySettings(), num_workers: int = 0) -> list[dict]:
    """The library entry point: labels for image files (``images``, with an EdjeModel or an Engine)
    or for indexed rows (``rows``, or every row when ``images`` is None, with an Engine)."""
    is_engine = hasattr(model_or_engine, "scorer")
    if images is not None:
        model = model_or_engine.scorer().model if is_engine else model_or_engine
        return list(classify_files(model, labels, [str(p) for p in images], settings, num_workers=num_workers))
    if not is_engine:
        raise BadInput("classifying indexed rows needs an Engine (Engine.from_pretrained(INDEX))")
    return list(classify_rows(model_or_engine.scorer(batch_size=settings.batch_size), labels, rows, settings))


def label_fields(result: dict, field: str) -> dict:
    """The metadata a classification gives one row: ``field`` = the top label (single-label) or
    the kept labels joined by "; " (multi-label, so ``field glob "*cat*"`` finds them), and
    ``{field}_prob`` = the top label's probability. Empty when no label was kept."""
    labels = result.get("labels") or []
    if not labels:
        return {}
    top = max(labels, key=lambda x: x["prob"])
    value = "; ".join(x["label"] for x in labels) if result.get("multi_label") else top["label"]
    return {field: value, f"{field}_prob": round(float(top["prob"]), 4)}


def save_labels(index_dir, results: Iterable[dict], field: str, *, multi_label: bool = False,
                lock_wait: float = 0.0, chunk: int = 10_000) -> Iterator[dict]:
    """Pass ``results`` (of :func:`classify_rows`) through, writing each row's labels into its
    metadata (:func:`label_fields`) so that filters can use them (``--where 'kind = "cat"'``).
    Holds the index's writer lock while it runs; rows are updated ``chunk`` at a time, each chunk
    one transaction; other metadata fields are kept. Metadata is not versioned: readers see new
    labels at once."""
    from .storage.index_store import IndexStore

    if not field.isidentifier() or field.startswith("_"):
        raise BadInput(f"--save-as {field!r}: a field name is letters, digits and _, not starting with _ or a digit")
    store = IndexStore.open(index_dir, mode="r+", lock_wait=lock_wait)
    with store.writing():
        pending: dict[int, dict] = {}
        for res in results:
            if "row" in res and "error" not in res:
                pending[int(res["row"])] = label_fields({**res, "multi_label": multi_label}, field)
            if len(pending) >= chunk:
                _write_labels(store, pending, field)
                pending = {}
            yield res
        if pending:
            _write_labels(store, pending, field)


def _write_labels(store, labels: dict[int, dict], field: str) -> None:
    current = store.entries_of_rows(list(labels))
    updates = {}
    for row, fields in labels.items():
        meta = {k: v for k, v in (current[row].meta or {}).items() if k not in (field, f"{field}_prob")}
        updates[row] = {**meta, **fields}
    store.manifest.update_meta(updates)
