"""duplicates: exact copies and near-duplicates in an index (loads no model, no torch)."""
from __future__ import annotations

import dataclasses

import click

from .common import echo_text, emit_json, index_option, json_option


@click.command("duplicates")
@index_option
@click.option("--threshold", default=None, type=click.FloatRange(-1.0, 1.0),
              help="Cosine similarity of first-stage embeddings at or above which two images count as "
                   "near-duplicates (default 0.915, where planted copies reached 0.95 recall with the demo "
                   "model; docs/filters.md says how to choose it for yours).")
@json_option
def duplicates(index_dir, threshold, as_json):
    """Group exact copies (same content hash) and near-duplicates (resized, recompressed or lightly
    cropped copies: first-stage vectors within THRESHOLD, found by a FAISS range search)."""
    from edje_search.storage.duplicates import DEFAULT_THRESHOLD, find_duplicates
    from edje_search.storage.index_store import IndexStore

    store = IndexStore.open(index_dir)
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    found = find_duplicates(store, threshold)
    if as_json:
        emit_json({"index": str(index_dir), "images": len(store), "threshold": threshold,
                   **{kind: [dataclasses.asdict(g) for g in groups] for kind, groups in found.items()}})
        return
    for kind, groups in found.items():
        what = "exact copies (same content)" if kind == "exact" else f"near-duplicates (similarity >= {threshold:g})"
        click.echo(f"{len(groups)} group{'s' if len(groups) != 1 else ''} of {what}")
        for i, g in enumerate(groups, 1):
            extra = "" if kind == "exact" else f"  (lowest pair similarity {g.similarity:.4f})"
            click.echo(f"  group {i}: {len(g.rows)} images{extra}")
            for p in g.paths:
                echo_text(f"    {p}")


COMMANDS = (duplicates,)
