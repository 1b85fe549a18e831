"""build-index, add, remove, query, info.

Commands import the library inside their bodies, and `info` never imports torch, so it starts
in well under a second.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click

from edje_search.config import DEFAULT_RERANK_K
from edje_search.storage.layout import SKIPPED_FILE

from .common import BACKENDS, Failure, echo_text, emit_json, index_option, json_option

SHOW_SKIPPED = 10  # skipped files named on stderr after a build; the rest are in skipped.jsonl


class ImageFilesCommand(click.Command):
    """A command whose --help ends with the image extensions (looked up only when help is shown)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from edje_search.images import HEIF_AVAILABLE, describe_extensions

        heif = "" if HEIF_AVAILABLE else " (.heic/.heif too once pillow-heif is installed)"
        formatter.write_paragraph()
        formatter.write_text(f"Image files are those named {describe_extensions()}, in any letter case{heif}; "
                             f"build-index, add and sync agree on this list. Files that cannot be used (not "
                             f"regular files, unreadable, over {_limits_text()}) are skipped and listed with "
                             f"the reason in INDEX/{SKIPPED_FILE}.")
        super().format_epilog(ctx, formatter)


def _limits_text() -> str:
    from edje_search.images import MAX_FILE_BYTES, MAX_PIXELS

    return f"{MAX_FILE_BYTES // 2**20} MiB or {MAX_PIXELS / 1e6:.0f} Mpx, extreme aspect ratios, corrupt"


def metadata_option(f):
    return click.option("--metadata", "metadata_file", type=click.Path(exists=True, dir_okay=False), default=None,
                        help='JSON-lines sidecar of user metadata, one {"path": ..., "field": value, ...} per line '
                             "(relative paths are relative to the file); the fields are stored with each image and "
                             "can be filtered on (query --where). Files already indexed get them without being "
                             "embedded again.")(f)


def _read_metadata(metadata_file):
    if not metadata_file:
        return None
    from edje_search.errors import BadInput
    from edje_search.photo_meta import read_sidecar

    try:
        return read_sidecar(metadata_file)
    except (OSError, ValueError) as e:
        raise BadInput(f"--metadata: {e}") from None


def wait_option(f):
    return click.option("--wait", "wait", default=0.0, show_default=True, type=click.FloatRange(0),
                        help="Seconds to wait while another process writes to the index "
                             "(0: fail at once, naming its pid).")(f)


def device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help='Where the model runs: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".')(f)


def loader_options(f):
    f = click.option("--workers", default=2, show_default=True, type=click.IntRange(0),
                     help="Image-decoding worker processes.")(f)
    return click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1),
                        help="Images per model forward pass.")(f)


def _report_build(engine, report, as_json: bool) -> None:
    skipped_file = engine.directory / SKIPPED_FILE  # written by the engine with the build
    if as_json:
        emit_json({**dataclasses.asdict(report), "skipped": [{"path": p, "reason": r} for p, r in report.skipped],
                   "images": len(engine), "index": str(engine.directory)})
        return
    for p, reason in report.skipped[:SHOW_SKIPPED]:
        echo_text(f"skipped {p}: {reason}", err=True)
    if len(report.skipped) > SHOW_SKIPPED:
        click.echo(f"... and {len(report.skipped) - SHOW_SKIPPED} more", err=True)
    click.echo(f"{report.summary()}; index {engine.directory} holds {len(engine)} images")
    if report.skipped:
        click.echo(f"skipped files and reasons: {skipped_file}")


@click.command("build-index", cls=ImageFilesCommand)
@click.argument("images_dir", type=click.Path(exists=True))
@index_option
@click.option("--model", default="edje-demo", show_default=True,
              help="Model directory or registered model name (see `edje-search models`) for a new index. "
                   "An existing index keeps its own model; given explicitly, it must be that model "
                   "(e.g. after the model directory moved).")
@click.option("--factory", default="auto", show_default=True,
              help='FAISS recipe for the first stage: "auto" (chosen by size as the index grows) or a '
                   'factory string such as "Flat" or "HNSW32,Flat". Used when creating the index.')
@click.option("--token-precision", type=click.Choice(["float16", "int8"]), default="float16", show_default=True,
              help="Storage of the reranker tokens: int8 (one scale per token) halves the bytes per image. "
                   "Used when creating the index.")
@loader_options
@click.option("--commit-every", default=512, show_default=True, type=click.IntRange(1),
              help="Images per atomic commit (an interrupted build keeps what was committed).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@device_option
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Build on a Ray cluster (pip install 'edje-search[ray]'): --ray alone joins the running "
                   "cluster or starts a local one; --ray HOST:PORT joins that one. IMAGES_DIR may then also be "
                   "a file list (.txt) or webdataset .tar shards (a .tar, or a folder of them).")
@click.option("--actors", default=None, type=click.IntRange(1),
              help="With --ray: model copies (default: one per GPU of the cluster, else 1).")
@metadata_option
@wait_option
@json_option
@click.pass_context
def build_index(ctx, images_dir, index_dir, model, factory, token_precision, batch_size, workers, commit_every,
                no_progress, device, ray_address, actors, metadata_file, wait, as_json):
    """Index every image under IMAGES_DIR (new or changed files only on re-runs; deleted files are dropped)."""
    from edje_search.engine import Engine
    from edje_search.storage.index_store import CONFIG_FILE

    metadata = _read_metadata(metadata_file)
    if metadata and ray_address is not None:
        raise click.UsageError("--metadata is not supported with --ray (give webdataset .json files instead)")
    explicit = ctx.get_parameter_source("model") is not click.core.ParameterSource.DEFAULT
    exists = (Path(index_dir) / CONFIG_FILE).is_file()
    engine = Engine.create_or_open(index_dir, model if explicit or not exists else None, lock_wait=wait,
                                   device="cpu" if ray_address is not None else device,  # Ray: actors embed
                                   factory=factory, token_dtype=token_precision)
    if ray_address is not None:
        from edje_search.distributed import ray_build_index

        report = ray_build_index(engine, images_dir, address=ray_address or None, actors=actors, device=device,
                                 batch_size=batch_size, commit_every=commit_every, progress=not no_progress)
    else:
        report = engine.sync(images_dir, batch_size=batch_size, num_workers=workers,
                             commit_every=commit_every, progress=not no_progress, metadata=metadata)
    _report_build(engine, report, as_json)


@click.command("add", cls=ImageFilesCommand)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@index_option
@click.option("--model", default=None, help="Open the index with this model (default: its own; must be the same "
                                            "weights).")
@loader_options
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@metadata_option
@wait_option
@json_option
def add(paths, index_dir, model, batch_size, workers, no_progress, metadata_file, wait, as_json):
    """Add image files, or every image under the folders given, to an existing index."""
    from edje_search.errors import BadInput
    from edje_search.images import describe_extensions, is_image_path, iter_image_files

    not_images = [p for p in paths if not os.path.isdir(p) and not is_image_path(p)]
    if not_images:
        raise BadInput(f"{not_images[0]} is not an image file name (image files end in {describe_extensions()})")
    metadata = _read_metadata(metadata_file)
    files = [str(f) for p in paths for f in iter_image_files(p)]
    if not files:
        raise Failure(f"no image files under {', '.join(paths)} (image files end in {describe_extensions()})")
    from edje_search.engine import Engine

    engine = Engine.from_pretrained(index_dir, model=model, writable=True, lock_wait=wait)
    report = engine.add(files, batch_size=batch_size, num_workers=workers, progress=not no_progress,
                        metadata=metadata)
    _report_build(engine, report, as_json)


@click.command("remove")
@click.argument("paths", nargs=-1, required=True)
@index_option
@click.option("--all", "--yes", "allow_all", is_flag=True,
              help="Allow a removal that would leave the index empty (refused otherwise, exit 2).")
@wait_option
@json_option
def remove(paths, index_dir, allow_all, wait, as_json):
    """Remove files, or everything under the folders given, from an index (the files themselves
    are not touched; they need not exist any more). Exits 1 if nothing indexed matched; exits 2
    for an empty or blank argument, and for a removal of every image without --all."""
    from edje_search.validation import removal_paths

    removal_paths(paths)  # '' or ' ' (an unset shell variable) is refused before the index is opened
    from edje_search.engine import Engine

    engine = Engine.from_pretrained(index_dir, writable=True, lock_wait=wait)
    n = engine.remove(paths, allow_all=allow_all)
    if n == 0:
        raise Failure(f"nothing in the index {index_dir} matches {' '.join(paths)} (give indexed files or folders)")
    if as_json:
        emit_json({"removed": n, "images": len(engine)})
    else:
        click.echo(f"{n} removed; index holds {len(engine)} images")


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
@click.option("--dedupe", is_flag=True,
              help="Collapse near-duplicates in the results: a hit whose first-stage similarity to a better hit "
                   "is at or above --dedupe-threshold is listed under it instead of taking a place of the k.")
@click.option("--dedupe-threshold", default=0.95, show_default=True, type=click.FloatRange(-1.0, 1.0),
              help="Cosine similarity at or above which --dedupe treats two hits as the same image.")
@device_option
@json_option
def query(text, index_dir, k, rerank_k, model, backend, compare, where, under, dedupe, dedupe_threshold, device,
          as_json):
    """Search the index for TEXT; each TEXT argument is one query.

    The first stage's top --rerank-k are reordered by score = joint-encoder logit (rerank) +
    the model's fusion weight x first-stage similarity (first); the weight is 0 unless
    `edje-search calibrate` set it. Hits below --rerank-k keep their first-stage order."""
    from edje_search.errors import BadInput
    from edje_search.validation import check_query

    for q in text:  # the library's rule, checked before the model loads
        check_query(q)
    if k <= 0:
        raise BadInput("-k must be at least 1")
    if rerank_k < 0:
        raise BadInput("--rerank-k must be 0 or more")
    from edje_search.engine import Engine

    engine = Engine.from_pretrained(index_dir, model=model, backend=backend, device=device)
    n = len(engine)
    if n == 0:
        raise Failure(f"the index {index_dir} is empty: add images with `edje-search build-index`")
    if k > n and not (where or under):
        click.echo(f"note: the index holds only {n} image{'s' if n != 1 else ''}; showing all of them", err=True)
        k = n
    if dedupe and compare:
        raise BadInput("--dedupe and --compare do not combine")
    fetch = min(n, k * DEDUPE_FETCH) if dedupe else k  # room for the hits that collapse
    results = engine.search_batch(list(text), k=fetch, rerank_k=rerank_k, where=where, under=under)
    if (where or under) and not any(results):
        click.echo("no image passes the filter", err=True)
    if dedupe:
        results, absorbed = _dedupe(index_dir, results, k, dedupe_threshold)
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
        click.echo(f"query: {q}")
        click.echo(f"{'rank':>4}  {'score':>8}  {'rerank':>8}  {'first':>7}  path")
        for h in hits:
            sc, rr = (f"{x:8.3f}" if x is not None else f"{'-':>8}" for x in (h.score, h.rerank_score))
            echo_text(f"{h.rank:>4}  {sc}  {rr}  {h.first_stage_score:7.4f}  {h.path}" +
                      (" (missing)" if h.path in gone else ""))
            for p in absorbed.get(h.row, []) if dedupe else []:
                echo_text(f"{'':>4}  {'':>8}  {'':>8}  {'':>7}    near-duplicate: {p}")


DEDUPE_FETCH = 4  # --dedupe asks for this many times k hits, so k remain after collapsing


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


@click.command("info")
@index_option
@json_option
def info(index_dir, as_json):
    """Describe an index: size, FAISS recipe, token shape and the model that built it (loads no model)."""
    from edje_search.inspection import index_info

    data = index_info(index_dir)
    if as_json:
        emit_json(data)
    else:
        for key, value in data.items():
            echo_text(f"{key:>18}: {value}")


COMMANDS = (build_index, add, remove, query, info)
