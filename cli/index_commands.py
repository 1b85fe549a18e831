"""build-index, add, remove, info (query: query_commands.py; verify, repair, migrate:
maintenance_commands.py).

Commands import the library inside their bodies, and `info` never imports torch, so it starts
in well under a second.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click

from edje_search.storage.layout import SKIPPED_FILE

from .common import Failure, echo_text, emit_json, index_option, json_option

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


COMMANDS = (build_index, add, remove, info)
