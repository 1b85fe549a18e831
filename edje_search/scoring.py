"""Joint scores of any (image, caption) pair: from image files, or from an index's stored tokens.

Every pair gets the joint encoder's logit, its match probability ``prob`` and the first stage's
cosine. ``prob`` is the logit through the model's calibration when ``edje-search calibrate``
stored one (calibration.py), else ``sigmoid(logit)``: the reranker is trained to rank a matching
caption above a non-matching one, so that orders pairs well but is not a calibrated probability
(choose a filtering threshold on labelled validation pairs then).

Inputs (:func:`read_pairs`): JSON Lines of ``{"image", "caption"}`` or a BLIP-style JSON list;
a caption may be a list (one pair per caption). Indexed rows (:meth:`RowScorer.caption_pairs`)
pair with the captions kept in their manifest metadata.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .calibration import sigmoid  # noqa: F401  (classify and the server import it from here)
from .devices import precision_autocast
from .errors import BadInput
from .models.bundle import EdjeModel
from .pipeline import ImageEmbedder
from .ranking import float_tensor


@dataclasses.dataclass(frozen=True)
class Pair:
    position: int  # place in the input's stream of pairs and bad entries (resuming counts these)
    image: str  # as written in the input
    caption: str
    path: str = ""  # the file (or indexed path) the image resolves to
    row: int | None = None  # the indexed row, when scoring from an index
    data: bytes | None = dataclasses.field(default=None, repr=False, compare=False)  # image bytes (shards)


@dataclasses.dataclass(frozen=True)
class BadEntry:
    position: int
    where: str
    reason: str


def _records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record or exception) for each entry of a JSON Lines file (streamed) or a JSON list."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"line {n}", json.loads(line)
                    except json.JSONDecodeError as e:
                        yield f"line {n}", ValueError(f"invalid JSON ({e.msg})")
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path} is neither JSON Lines (.jsonl) nor a JSON list: {e}") from None
    if not isinstance(data, list):
        raise BadInput(f"{path}: expected a JSON list of {{\"image\", \"caption\"}} entries")
    for n, rec in enumerate(data):
        yield f"entry {n}", rec


def read_pairs(pairs_file: str | Path, image_root: str | Path | None = None) -> Iterator[Pair | BadEntry]:
    """The pairs of an annotation file, in order, with a :class:`BadEntry` for each entry that is
    not usable (malformed JSON, no image, empty caption); image paths are resolved against
    ``image_root`` (default: the file's folder). Always the same stream for the same file."""
    pairs_file = Path(pairs_file)
    if not pairs_file.is_file():
        raise BadInput(f"no pairs file at {pairs_file}")
    root = Path(image_root) if image_root is not None else pairs_file.parent
    position = 0
    for where, rec in _records(pairs_file):
        reason = None
        if isinstance(rec, Exception):
            reason = str(rec)
        elif not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not rec["image"]:
            reason = "entry has no 'image' path"
        else:
            caps = rec.get("caption")
            caps = [caps] if isinstance(caps, str) else caps
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                reason = "caption must be a non-empty string or a list of them"
        if reason is not None:
            yield BadEntry(position, where, reason)
            position += 1
            continue
        path = os.path.abspath(root / rec["image"])
        for c in caps:
            yield Pair(position, rec["image"], c.strip(), path)
            position += 1


@torch.inference_mode()
def embed_captions(model: EdjeModel, captions: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """First-stage text embeddings (N, E) float32, L2-normalised."""
    out = []
    for s in range(0, len(captions), batch_size):
        with precision_autocast(model.device):
            emb = model.embed_texts(list(captions[s:s + batch_size]))
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.first_stage.embed_dim), np.float32)


def joint_and_cosine(model: EdjeModel, captions: Sequence[str], vectors: np.ndarray, tokens: torch.Tensor,
                     image_idx: np.ndarray, *, batch_size: int = 64,
                     cosine: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, cosines) of the pairs (``captions[i]``, image ``image_idx[i]``), images given by
    their first-stage vectors (U, E) and stored tokens (U, m, D_lm). ``cosine=False`` skips the
    first-stage text tower (cosines None), which can cost more than the joint encoder itself."""
    first = {}  # caption -> its index among the distinct captions (each is encoded once)
    caption_idx = np.array([first.setdefault(c, len(first)) for c in captions], dtype=np.int64)
    unique = list(first)
    image_idx = np.asarray(image_idx, dtype=np.int64)
    with precision_autocast(model.device):
        logits = model.reranker.score_pairs(unique, tokens, caption_idx, image_idx, batch_size=batch_size)
    if not cosine:
        return logits, None
    text = embed_captions(model, unique)
    cosines = np.einsum("ij,ij->i", text[caption_idx], np.asarray(vectors, np.float32)[image_idx])
    return logits, cosines.astype(np.float32)


def records(model: EdjeModel, pairs: Sequence[Pair], logits: np.ndarray, cosines: np.ndarray | None) -> list[dict]:
    """One output record per scored pair: logit, the model's match probability, cosine (or None)."""
    probs = model.match_probability(np.asarray(logits))
    out = []
    for i, pair in enumerate(pairs):
        rec = {"image": pair.image, "caption": pair.caption, "logit": round(float(logits[i]), 6),
               "prob": round(float(probs[i]), 6), "cosine": None if cosines is None else round(float(cosines[i]), 6)}
        if pair.row is not None:
            rec["row"] = pair.row
        out.append(rec)
    return out


class FileScorer:
    """Scores pairs whose images are files: decode workers and the vision tower, kept for a run."""

    def __init__(self, model: EdjeModel, *, batch_size: int = 32, num_workers: int = 2, cosine: bool = True):
        self.model = model
        self.batch_size = batch_size
        self.cosine = cosine
        # float32 tokens: the joint encoder sees what Reranker.score(pixel_values=...) computes
        self._embedder = ImageEmbedder(model, batch_size=batch_size, num_workers=num_workers, token_dtype="float32")

    def score(self, pairs: list[Pair]) -> tuple[list[dict], list[BadEntry]]:
        """Records of the pairs whose image could be read (input order), and the others."""
        paths = list(dict.fromkeys(p.path for p in pairs))
        where, vectors, tokens, failed = {}, [], [], {}
        for batch in self._embedder.embed(paths, progress=False):
            failed.update(batch.failed)
            for path in batch.paths:
                where[path] = len(where)
            vectors.append(batch.vectors)
            tokens.append(batch.tokens)
        good = [p for p in pairs if p.path in where]
        bad = [BadEntry(p.position, p.image, "image file missing" if not os.path.lexists(p.path)
                        else failed.get(p.path, "image not read")) for p in pairs if p.path not in where]
        if not good:
            return [], bad
        logits, cosines = joint_and_cosine(
            self.model, [p.caption for p in good], np.concatenate(vectors), torch.from_numpy(np.concatenate(tokens)),
            np.array([where[p.path] for p in good]), batch_size=self.batch_size, cosine=self.cosine)
        return records(self.model, good, logits, cosines), bad

    def close(self) -> None:
        self._embedder.close()


class RowScorer:
    """Joint scores of indexed rows, from their stored tokens and vectors (no vision tower).

    Made by ``Engine.scorer()`` over the engine's open generation and model. Scores pairs for a
    scoring run (:meth:`score`), texts against rows (:meth:`score_texts`), and hands rows' data
    to zero-shot classification (:meth:`row_data`).
    """

    def __init__(self, store, model: EdjeModel, *, batch_size: int = 64, cosine: bool = True):
        self._store = store
        self.model = model
        self.batch_size = batch_size
        self.cosine = cosine

    @property
    def generation(self) -> int:
        return int(self._store.generation)

    def __len__(self) -> int:
        return len(self._store)

    def entries(self) -> Iterator[tuple[int, str, dict | None]]:
        """(row, path, metadata) of every live row, in manifest order."""
        for e in self._store.iter_entries():
            yield e.row, e.path, e.meta

    def paths(self, rows: Iterable[int]) -> dict[int, str]:
        return self._store.paths(rows)

    def row_data(self, rows: Sequence[int]) -> tuple[np.ndarray, torch.Tensor]:
        """(first-stage vectors (U, E), stored tokens (U, m, D_lm) float32) of live ``rows``;
        rows that are not live are refused (BadInput)."""
        rows = [int(r) for r in rows]
        live = self._store.paths(rows)
        gone = [r for r in rows if r not in live]
        if gone:
            raise BadInput(f"rows not in the index: {gone[:10]}")
        tokens = float_tensor(self._store.tokens.read(np.asarray(rows, np.int64)))
        return np.asarray(self._store.vectors(rows), dtype=np.float32), tokens

    def caption_pairs(self, texts: Sequence[str] = ()) -> Iterator[Pair | BadEntry]:
        """Every live row with the captions in its metadata (``caption``: a string or a list), or
        with each of ``texts`` when given; rows in manifest order."""
        position = 0
        for row, path, meta in self.entries():
            caps = list(texts) if texts else (meta or {}).get("caption")
            caps = [caps] if isinstance(caps, str) else caps
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                yield BadEntry(position, f"row {row}", "no caption in the row's metadata")
                position += 1
                continue
            for c in caps:
                yield Pair(position, path, c.strip(), path, row)
                position += 1

    def score_texts(self, texts: Sequence[str], rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, cosines) of (``texts[i]``, row ``rows[i]``) pairs; rows must be live."""
        texts = [str(t) for t in texts]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(texts) != len(rows):
            raise BadInput(f"{len(texts)} texts but {len(rows)} rows: give one row per text")
        if any(not t.strip() for t in texts):
            raise BadInput("empty text: every text needs some words")
        if len(rows) == 0:
            return np.zeros(0, np.float32), (np.zeros(0, np.float32) if self.cosine else None)
        unique, image_idx = np.unique(rows, return_inverse=True)
        vectors, tokens = self.row_data(unique.tolist())
        return joint_and_cosine(self.model, texts, vectors, tokens, image_idx, batch_size=self.batch_size,
                                cosine=self.cosine)

    def score(self, pairs: list[Pair]) -> tuple[list[dict], list[BadEntry]]:
        """Records of the pairs whose image is indexed (looked up by path unless the pair names its
        row), and the others as bad entries: the scorer protocol of score_run.run_scoring."""
        need = list(dict.fromkeys(p.path for p in pairs if p.row is None))
        found = {path: e.row for path, e in self._store.lookup_paths(need).items()} if need else {}
        pairs = [p if p.row is not None or p.path not in found else dataclasses.replace(p, row=found[p.path])
                 for p in pairs]
        good = [p for p in pairs if p.row is not None]
        bad = [BadEntry(p.position, p.image, "image is not in the index") for p in pairs if p.row is None]
        if not good:
            return [], bad
        rows, image_idx = np.unique(np.array([p.row for p in good], dtype=np.int64), return_inverse=True)
        vectors, tokens = self.row_data(rows.tolist())
        logits, cosines = joint_and_cosine(self.model, [p.caption for p in good], vectors, tokens, image_idx,
                                           batch_size=self.batch_size, cosine=self.cosine)
        return records(self.model, good, logits, cosines), bad

    def close(self) -> None:
        pass


def chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def keep(record: dict, min_prob: float | None) -> bool:
    return min_prob is None or (not math.isnan(record["prob"]) and record["prob"] >= min_prob)
