"""query: text search, with filters, a relevance cutoff, a sort order and near-duplicate collapsing."""
from __future__ import annotations

import dataclasses
import os

import click

from edje_search.config import DEFAULT_RERANK_K
from edje_search.storage.duplicates import DEFAULT_THRESHOLD as DUPLICATE_THRESHOLD

from .common import BACKENDS, Failure, echo_text, emit_json, index_option, json_option
from .index_commands import device_option

DEDUPE_FETCH = 4  # --dedupe asks for this many times k hits, so k remain after collapsing
NO_MATCH = "no image matches"


@click.command("query")
@click.argument("text", nargs=-1, required=True)
@index_option
@click.option("-k", "k", default=10, show_default=True,
              help="Number of results (an index with fewer images returns them all, with a note on stderr).")
@click.option("--rerank-k", default=DEFAULT_RERANK_K, show_default=True,
              help="First-stage candidates rescored by the joint encoder (0 = no reranking).")
@click.option("--model", default=None, help="Model to query with (default: the index's own model).")
@click.option("--backend", type=click.Choice(BACKENDS), default="eager", show_default=True,
              help="How the reranker runs; onnx-int8 is the fastest on CPUs (see docs/benchmarks.md, fidelity).")
@click.option("--compare", is_flag=True, help="Show first-stage and reranked top-k side by side.")
@click.option("--where", default=None, metavar="EXPR",
              help='Search only images whose metadata passes EXPR, e.g. \'taken >= "2023-06-01" and make = "Canon"\' '
                   "(grammar and fields: docs/filters.md). k hits come back whenever k images pass.")
@click.option("--under", default=None, type=click.Path(file_okay=False), metavar="FOLDER",
              help="Search only images under FOLDER.")
@click.option("--min-prob", default=None, type=click.FloatRange(0.0, 1.0), metavar="P",
              help="Only hits whose match probability (prob) is at least P, possibly none. Only reranked hits "
                   "have one, so at most --rerank-k hits come back. Calibrated by `edje-search calibrate`; "
                   "without it prob is sigmoid(logit), which ranks right but is not a probability.")
@click.option("--sort", default=None, metavar="FIELD",
              help="Order the hits by a metadata field instead of relevance: date, taken, mtime, size, name, ... "
                   "ascending, or -FIELD descending (-date: newest first). Hits without the field come last; "
                   "relevance still chooses which hits.")
@click.option("--dedupe", is_flag=True,
              help="Collapse near-duplicates in the results: a hit whose first-stage similarity to a better hit "
                   "is at or above --dedupe-threshold is listed under it instead of taking a place of the k.")
@click.option("--dedupe-threshold", default=DUPLICATE_THRESHOLD, show_default=True, type=click.FloatRange(-1.0, 1.0),
              help="Cosine similarity at or above which --dedupe treats two hits as the same image (the default "
                   "is `duplicates`' own, chosen where planted copies reached 0.95 recall).")
@device_option
@json_option
def query(text, index_dir, k, rerank_k, model, backend, compare, where, under, min_prob, sort, dedupe,
          dedupe_threshold, device, as_json):
    """Search the index for TEXT; each TEXT argument is one query.

    The first stage's top --rerank-k are reordered by score = joint-encoder logit (rerank) +
    the model's fusion weight x first-stage similarity (first); the weight is 0 unless
    `edje-search calibrate` set it. Hits below --rerank-k keep their first-stage order.
    prob is the match probability of a reranked hit (--min-prob cuts on it)."""
    from edje_search.errors import BadInput
    from edje_search.validation import check_min_prob, check_query

    for q in text:  # the library's rules, checked before the model loads
        check_query(q)
    if k <= 0:
        raise BadInput("-k must be at least 1")
    if rerank_k < 0:
        raise BadInput("--rerank-k must be 0 or more")
    check_min_prob(min_prob, rerank_k, names=("--min-prob", "--rerank-k"))
    if compare and (dedupe or min_prob is not None or sort):
        raise BadInput("--compare shows the whole top k in both orders: it does not combine with --dedupe, "
                       "--min-prob or --sort")
    from edje_search.engine import Engine

    engine = Engine.from_pretrained(index_dir, model=model, backend=backend, device=device)
    n = len(engine)
    if n == 0:
        raise Failure(f"the index {index_dir} is empty: add images with `edje-search build-index`")
    if k > n and not (where or under):
        click.echo(f"note: the index holds only {n} image{'s' if n != 1 else ''}; showing all of them", err=True)
        k = n
    if min_prob is not None and k > rerank_k:
        click.echo(f"note: with --min-prob only reranked hits can pass: at most --rerank-k {rerank_k} hits", err=True)
    if sort:
        engine.sort_hits([], sort)  # an unknown field is refused before any search
    fetch = min(n, k * DEDUPE_FETCH) if dedupe else k  # room for the hits that collapse
    results = engine.search_batch(list(text), k=fetch, rerank_k=rerank_k, where=where, under=under,
                                  min_prob=min_prob, sort=None if dedupe else sort)
    if (where or under) and min_prob is None and not any(results):
        click.echo("no image passes the filter", err=True)
    absorbed: dict[int, list[str]] = {}
    if dedupe:  # collapse in relevance order, then sort what remains
        results, absorbed = _dedupe(index_dir, results, k, dedupe_threshold)
        results = [engine.sort_hits(hits, sort) for hits in results] if sort else results
    if compare:
        plain = engine.search_batch(list(text), k=k, rerank_k=0, where=where, under=under)
        if as_json:
            emit_json([{"query": q, "first_stage": [dataclasses.asdict(h) for h in p],
                        "reranked": [dataclasses.asdict(h) for h in r]} for q, p, r in zip(text, plain, results)])
        else:
            for q, p, r in zip(text, plain, results):
                _print_side_by_side(q, p, r)
        return
    gone = {h.path for hits in results for h in hits if not os.path.exists(h.path)}
    if gone:
        echo_text(f"note: {len(gone)} hits name image files that are gone from disk (first: {sorted(gone)[0]}); "
                  f"`edje-search build-index` drops them", err=True)
    if as_json:
        emit_json([{"query": q, "hits": [{**dataclasses.asdict(h), "missing": h.path in gone,
                                          **({"near_duplicates": absorbed[h.row]} if dedupe else {})} for h in hits]}
                   for q, hits in zip(text, results)])
        return
    for q, hits in zip(text, results):
        _print_hits(q, hits, gone, absorbed, min_prob)


def _print_hits(q: str, hits, gone: set[str], absorbed: dict[int, list[str]], min_prob: float | None) -> None:
    click.echo(f"query: {q}")
    if not hits and min_prob is not None:
        click.echo(f"{NO_MATCH} (no hit reaches --min-prob {min_prob:g})")
        return
    click.echo(f"{'rank':>4}  {'score':>8}  {'rerank':>8}  {'prob':>6}  {'first':>7}  path")
    for h in hits:
        sc, rr = (f"{x:8.3f}" if x is not None else f"{'-':>8}" for x in (h.score, h.rerank_score))
        pr = f"{h.prob:6.3f}" if h.prob is not None else f"{'-':>6}"
        echo_text(f"{h.rank:>4}  {sc}  {rr}  {pr}  {h.first_stage_score:7.4f}  {h.path}" +
                  (" (missing)" if h.path in gone else ""))
        for p in absorbed.get(h.row, []):
            echo_text(f"{'':>4}  {'':>8}  {'':>8}  {'':>6}  {'':>7}    near-duplicate: {p}")


def _dedupe(index_dir, results, k: int, threshold: float):
    """Collapse near-duplicate hits (storage/duplicates.collapse_near); returns the kept hits per
    query, re-ranked 1..k, and kept row -> paths of the hits it absorbed."""
    from edje_search.storage.duplicates import collapse_near
    from edje_search.storage.index_store import IndexStore

    store = IndexStore.open(index_dir)
    out, absorbed = [], {}
    for hits in results:
        by_row = {h.row: h for h in hits}
        groups = collapse_near(store, [h.row for h in hits], threshold)[:k]
        out.append([dataclasses.replace(by_row[g[0]], rank=i + 1) for i, g in enumerate(groups)])
        absorbed.update({g[0]: [by_row[r].path for r in g[1:]] for g in groups})
    return out, absorbed


def _short(path: str, width: int = 34) -> str:
    return path if len(path) <= width else "..." + path[-(width - 3):]


def _print_side_by_side(q, plain, reranked) -> None:
    click.echo(f"query: {q}")
    click.echo(f"{'rank':>4}  {'first stage only':<34} {'score':>7}   {'reranked':<34} {'score':>7}")
    for a, b in zip(plain, reranked):
        rr = f"{b.score:7.3f}" if b.score is not None else f"{'-':>7}"
        echo_text(f"{a.rank:>4}  {_short(a.path):<34} {a.first_stage_score:7.4f}   {_short(b.path):<34} {rr}")
    click.echo("")


COMMANDS = (query,)
