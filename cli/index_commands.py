"""build-index, add, remove, query, info."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from .main import BACKENDS, cli, emit_json, index_option, json_option


def _write_skipped(index_dir: Path, skipped: list[tuple[str, str]]) -> Path:
    path = index_dir / "skipped.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p, reason in skipped:
            f.write(json.dumps({"path": p, "reason": reason}) + "\n")
    tmp.replace(path)
    return path


def _report_build(engine, report, as_json: bool) -> None:
    skipped_file = _write_skipped(engine.store.directory, report.skipped)
    if as_json:
        emit_json({**dataclasses.asdict(report), "skipped": [{"path": p, "reason": r} for p, r in report.skipped],
                   "images": len(engine.store), "index": str(engine.store.directory)})
        return
    click.echo(f"{report.summary()}; index {engine.store.directory} holds {len(engine.store)} images")
    if report.skipped:
        click.echo(f"skipped files and reasons: {skipped_file}")


@cli.command("build-index")
@click.argument("images_dir", type=click.Path(exists=True))
@index_option
@click.option("--model", default="edje-demo", show_default=True,
              help="Model directory or registered model name (see `edje-search models`). "
                   "Used when creating the index; an existing index keeps its model.")
@click.option("--factory", default="Flat", show_default=True,
              help='FAISS index-factory string for the first stage, e.g. "Flat" or "HNSW32,Flat".')
@click.option("--token-precision", type=click.Choice(["float16", "int8"]), default="float16", show_default=True,
              help="Storage of the reranker tokens: int8 (one scale per token) halves the bytes per image. "
                   "Used when creating the index.")
@click.option("--batch-size", default=32, show_default=True, help="Images per model forward pass.")
@click.option("--workers", default=2, show_default=True, help="Image-decoding worker processes.")
@click.option("--commit-every", default=512, show_default=True,
              help="Images per atomic commit (an interrupted build keeps what was committed).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@json_option
def build_index(images_dir, index_dir, model, factory, token_precision, batch_size, workers, commit_every, no_progress,
                as_json):
    """Index every image under IMAGES_DIR (new or changed files only on re-runs; deleted files are dropped)."""
    from edje_search import Engine, load_model
    from edje_search.storage.index_store import CONFIG_FILE

    index_path = Path(index_dir)
    if (index_path / CONFIG_FILE).is_file():
        engine = Engine.from_pretrained(index_path, writable=True)
    else:
        engine = Engine.create(index_path, load_model(model), factory=factory, token_dtype=token_precision)
    report = engine.sync(images_dir, batch_size=batch_size, num_workers=workers,
                         commit_every=commit_every, progress=not no_progress)
    _report_build(engine, report, as_json)


@cli.command("add")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@index_option
@click.option("--batch-size", default=32, show_default=True, help="Images per model forward pass.")
@click.option("--workers", default=2, show_default=True, help="Image-decoding worker processes.")
@json_option
def add(paths, index_dir, batch_size, workers, as_json):
    """Add image files or folders to an existing index."""
    from edje_search import Engine
    from edje_search.images import iter_image_files

    engine = Engine.from_pretrained(index_dir, writable=True)
    files = [str(f) for p in paths for f in iter_image_files(p)]
    report = engine.add(files, batch_size=batch_size, num_workers=workers)
    _report_build(engine, report, as_json)


@cli.command("remove")
@click.argument("paths", nargs=-1, required=True)
@index_option
@json_option
def remove(paths, index_dir, as_json):
    """Remove image files from an index (the files themselves are not touched)."""
    from edje_search import Engine

    engine = Engine.from_pretrained(index_dir, writable=True)
    n = engine.remove(paths)
    if as_json:
        emit_json({"removed": n, "images": len(engine.store)})
    else:
        click.echo(f"{n} removed; index holds {len(engine.store)} images")


@cli.command("query")
@click.argument("text", nargs=-1, required=True)
@index_option
@click.option("-k", "k", default=10, show_default=True, help="Number of results.")
@click.option("--rerank-k", default=20, show_default=True,
              help="First-stage candidates rescored by the joint encoder (0 = no reranking).")
@click.option("--model", default=None, help="Model to query with (default: the index's own model).")
@click.option("--backend", type=click.Choice(BACKENDS), default="eager", show_default=True,
              help="How the reranker runs; onnx-int8 is the fastest on CPUs (see the README's fidelity table).")
@click.option("--compare", is_flag=True, help="Show first-stage and reranked top-k side by side.")
@json_option
def query(text, index_dir, k, rerank_k, model, backend, compare, as_json):
    """Search the index for TEXT; each TEXT argument is one query.

    The first stage's top --rerank-k are reordered by score = joint-encoder logit (rerank) +
    the model's fusion weight x first-stage similarity (first); the weight is 0 unless
    `edje-search calibrate` set it. Hits below --rerank-k keep their first-stage order."""
    from edje_search import Engine

    if k <= 0:
        raise click.BadParameter("must be at least 1", param_hint="-k")
    if rerank_k < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--rerank-k")
    engine = Engine.from_pretrained(index_dir, model=model, backend=backend)
    if len(engine.store) == 0:
        raise click.ClickException(f"the index {index_dir} is empty: add images with `edje-search build-index`")
    if k > len(engine.store):
        raise click.BadParameter(f"the index holds only {len(engine.store)} images", param_hint="-k")
    results = engine.search_batch(list(text), k=k, rerank_k=rerank_k)
    if compare:
        plain = engine.search_batch(list(text), k=k, rerank_k=0)
        if as_json:
            emit_json([{"query": q, "first_stage": [dataclasses.asdict(h) for h in p],
                        "reranked": [dataclasses.asdict(h) for h in r]} for q, p, r in zip(text, plain, results)])
        else:
            for q, p, r in zip(text, plain, results):
                _print_side_by_side(q, p, r)
        return
    if as_json:
        emit_json([{"query": q, "hits": [dataclasses.asdict(h) for h in hits]} for q, hits in zip(text, results)])
        return
    for q, hits in zip(text, results):
        click.echo(f"query: {q}")
        click.echo(f"{'rank':>4}  {'score':>8}  {'rerank':>8}  {'first':>7}  path")
        for h in hits:
            sc, rr = (f"{x:8.3f}" if x is not None else f"{'-':>8}" for x in (h.score, h.rerank_score))
            click.echo(f"{h.rank:>4}  {sc}  {rr}  {h.first_stage_score:7.4f}  {h.path}")


def _short(path: str, width: int = 34) -> str:
    return path if len(path) <= width else "..." + path[-(width - 3):]


def _print_side_by_side(q, plain, reranked) -> None:
    click.echo(f"query: {q}")
    click.echo(f"{'rank':>4}  {'first stage only':<34} {'score':>7}   {'reranked':<34} {'score':>7}")
    for a, b in zip(plain, reranked):
        rr = f"{b.score:7.3f}" if b.score is not None else f"{'-':>7}"
        click.echo(f"{a.rank:>4}  {_short(a.path):<34} {a.first_stage_score:7.4f}   {_short(b.path):<34} {rr}")
    click.echo("")


@cli.command("info")
@index_option
@json_option
def info(index_dir, as_json):
    """Describe an index: size, FAISS recipe, token shape and the model that built it."""
    from edje_search import Engine

    data = Engine.from_pretrained(index_dir).info()
    if as_json:
        emit_json(data)
    else:
        for key, value in data.items():
            click.echo(f"{key:>18}: {value}")


@cli.command("verify")
@index_option
@json_option
def verify(index_dir, as_json):
    """Check that an index's manifest, FAISS ids and token/vector stores agree (exit 1 if not)."""
    from edje_search.storage.index_store import IndexStore

    store = IndexStore.open(index_dir)
    problems = store.verify()
    if as_json:
        emit_json({"index": str(index_dir), "images": len(store), "ok": not problems, "problems": problems})
    elif problems:
        for p in problems:
            click.echo(f"problem: {p}", err=True)
    else:
        click.echo(f"ok: {len(store)} images, generation {store.generation}")
    if problems:
        raise SystemExit(1)
