"""verify, repair, migrate: checking and keeping an index whole. None of them imports torch
(except `verify --deep`, which loads the model), so they start in well under a second."""
from __future__ import annotations

import dataclasses

import click

from .common import echo_text, emit_json, index_option, json_option
from .index_commands import wait_option


@click.command("verify")
@index_option
@click.option("--deep", default=0, show_default=True, type=click.IntRange(0),
              help="Also re-embed this many indexed files (a fixed sample) and compare them with their stored "
                   "vectors and tokens; loads the model.")
@json_option
def verify(index_dir, deep, as_json):
    """Check every manifest row against FAISS, the stored vectors and tokens, and the model's
    fingerprint (exit 1 with the problems if anything is wrong; `edje-search repair` fixes what it can)."""
    from edje_search.inspection import verify_index
    from edje_search.storage.index_store import IndexStore
    from edje_search.storage.integrity import unchecked_segments
    from edje_search.storage.manifest_check import gone_files

    store = IndexStore.open(index_dir)  # a missing or unreadable index is an error, not a problem list
    if deep:
        from edje_search.engine import Engine

        problems = Engine.from_pretrained(index_dir).verify(deep=deep)
    else:
        problems = verify_index(index_dir)
    unchecked = unchecked_segments(store)  # committed before checksums were recorded: not an error
    gone = gone_files(store)  # the index is whole, but queries would return these
    if as_json:
        emit_json({"index": str(index_dir), "images": len(store), "ok": not problems, "problems": problems,
                   "unchecked_segments": len(unchecked), "files_gone": [{"row": r, "path": p} for r, p in gone]})
    elif problems:
        for p in problems:
            echo_text(f"problem: {p}", err=True)
    else:
        click.echo(f"ok: {len(store)} images, generation {store.generation}")
    if unchecked and not as_json:
        echo_text(f"note: {len(unchecked)} segments were written without checksums and are unchecked "
                  f"(first: {unchecked[0]})", err=True)
    for r, p in ([] if as_json else gone):
        echo_text(f"note: row {r} names a file that is gone: {p} (`edje-search build-index` drops it)", err=True)
    if problems:
        raise SystemExit(1)


@click.command("repair")
@index_option
@wait_option
@json_option
def repair(index_dir, wait, as_json):
    """Rebuild FAISS from the stored vectors, drop rows whose vectors or tokens are unreadable
    (listed; run build-index again to embed those files anew) and remove stray files. Loads no model."""
    from edje_search.inspection import verify_index
    from edje_search.storage.index_store import IndexStore

    store = IndexStore.open(index_dir, mode="r+", lock_wait=wait)
    with store.writing():
        report = store.repair()
    problems = verify_index(index_dir)
    if not as_json:
        for p in report.damaged + report.manifest:
            echo_text(f"damaged: {p}", err=True)
    _finish(as_json, {**dataclasses.asdict(report), "images": len(store), "problems_left": problems},
            report.dropped, f"{report.summary()}; index holds {len(store)} images", problems, "problem left")


@click.command("migrate")
@index_option
@wait_option
@json_option
def migrate(index_dir, wait, as_json):
    """Convert an index written by edje-search 0.2 (tokens in .npy segments) to the Zarr token
    store, in place, keeping every row. Safe to interrupt: until its one commit the old index is
    whole, and running it again starts over. Loads no model; a no-op on a current index."""
    from edje_search.inspection import verify_index
    from edje_search.storage.migrate import migrate as migrate_index

    report = migrate_index(index_dir, lock_wait=wait, progress=not as_json)
    problems = verify_index(index_dir)
    _finish(as_json, {**dataclasses.asdict(report), "index": str(index_dir), "problems": problems},
            report.dropped, report.summary(), problems, "problem")


def _finish(as_json: bool, payload: dict, dropped: list[str], summary: str, problems: list[str],
            label: str) -> None:
    """What repair and migrate print when they are done: the JSON payload, or the dropped files,
    the summary and the problems left; exit 1 while problems remain."""
    if as_json:
        emit_json(payload)
    else:
        for p in dropped:
            echo_text(f"dropped {p}", err=True)
        click.echo(summary)
        for p in problems:
            echo_text(f"{label}: {p}", err=True)
    if problems:
        raise SystemExit(1)


COMMANDS = (verify, repair, migrate)
