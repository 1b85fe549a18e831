"""score, classify: joint-encoder scores of image-caption pairs, and zero-shot labels.

Both read images either as files (the vision tower runs) or as rows of an index (their stored
tokens and vectors: no vision tower, far faster).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .common import echo_text, emit_json, json_option, to_json
from .index_commands import device_option, loader_options

SHOW_BAD = 10  # bad entries named on stderr; all of them are in OUT.skipped.jsonl


def _open(model: str | None, index_dir: str | None, device: str, **scorer_options):
    """(rows scorer or None, model): an index's Engine.scorer() (its own model unless one is named),
    or a model alone."""
    if index_dir is not None:
        from edje_search.engine import Engine

        rows = Engine.from_pretrained(index_dir, model=model, device=device).scorer(**scorer_options)
        return rows, rows.model
    from edje_search.devices import pick_device
    from edje_search.models.registry import load_model

    return None, load_model(model).to(pick_device(device)).eval()


def _shards(pairs: str) -> list[str] | None:
    """The shard paths when PAIRS is webdataset shards (a .tar, a folder or a list of them), else None."""
    if not (os.path.isdir(pairs) or pairs.lower().endswith((".tar", ".txt", ".lst"))):
        return None
    from edje_search.distributed.sources import resolve_source

    source = resolve_source(pairs)
    if source.kind != "shards":
        raise click.UsageError(f"{pairs}: PAIRS must be a .jsonl or .json file, or webdataset .tar shards")
    return list(source.paths)


def _file_id(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@click.command("score")
@click.argument("pairs", required=False, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Output JSON Lines: one {image, caption, logit, prob, cosine} per pair (row too with --index).")
@click.option("--model", default=None, help="Model directory or registered name (default with --index: its own).")
@click.option("--index", "index_dir", default=None, type=click.Path(file_okay=False, exists=True),
              help="Score indexed rows from their stored tokens (no vision tower). PAIRS images are looked "
                   "up by path; without PAIRS every row is scored against the captions in its metadata.")
@click.option("--image-root", default=None, type=click.Path(file_okay=False, exists=True),
              help="Folder PAIRS image paths are relative to (default: the PAIRS file's folder).")
@click.option("--text", "texts", multiple=True,
              help="With --index and no PAIRS: score every row against this text instead (repeatable).")
@click.option("--keep-min-prob", type=click.FloatRange(0, 1), default=None,
              help="Write only pairs whose prob is at least this: filters a data set. prob is the model's "
                   "calibrated match probability (`edje-search calibrate`), else the sigmoid of the logit.")
@click.option("--keep-shards", type=click.Path(file_okay=False), default=None,
              help="With webdataset shards and --keep-min-prob: write DIR/NAME.tar per input shard holding only "
                   "the kept samples (members copied unchanged).")
@click.option("--no-cosine", is_flag=True,
              help="Skip the first-stage cosine (cosine: null): saves the text tower's pass, which can cost more "
                   "than the joint encoder.")
@click.option("--overwrite", is_flag=True, help="Start again even if OUT holds an earlier (unfinished) run.")
@click.option("--chunk", default=512, show_default=True, type=click.IntRange(1),
              help="Pairs read, scored and written durably at a time (what an interruption can lose).")
@loader_options
@device_option
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@json_option
def score_cmd(pairs, out, model, index_dir, image_root, texts, keep_min_prob, keep_shards, no_cosine, overwrite,
              chunk, batch_size, workers, device, no_progress, as_json):
    """Joint-encoder logit, probability and first-stage cosine of every (image, caption) pair.

    PAIRS is JSON Lines of {"image", "caption"} (.jsonl), a BLIP-style JSON list (a caption may be
    a list), or webdataset shards (a .tar, a folder of them, or a .txt list of them; captions from
    KEY.txt, images named SHARD.tar#MEMBER). Streams in chunks; re-running the same command after
    an interruption carries on where it stopped (state in OUT.state.json). Bad entries and
    unreadable images are skipped and listed in OUT.skipped.jsonl with the reason. prob is the
    match probability calibrated by `edje-search calibrate` when the model has that calibration;
    otherwise it is sigmoid(logit), not calibrated: pick --keep-min-prob on labelled validation pairs.
    """
    from edje_search.score_run import ResumableOutput, run_scoring
    from edje_search.score_shards import ShardScorer, shard_pairs, write_kept_shards
    from edje_search.scoring import FileScorer, read_pairs

    if pairs is None and index_dir is None:
        raise click.UsageError("give a PAIRS file, or --index DIR to score indexed rows against their captions")
    if pairs is not None and model is None and index_dir is None:
        raise click.UsageError("give --model to score image files (or --index to score indexed rows)")
    if texts and (pairs is not None or index_dir is None):
        raise click.UsageError("--text goes with --index and no PAIRS file")
    shards = _shards(pairs) if pairs is not None else None
    if keep_shards is not None and (shards is None or keep_min_prob is None):
        raise click.UsageError("--keep-shards goes with webdataset shards as PAIRS and --keep-min-prob")
    rows, loaded = _open(model, index_dir, device, batch_size=max(batch_size, 64), cosine=not no_cosine)
    signature = {"model": loaded.fingerprint(), "keep_min_prob": keep_min_prob, "cosine": not no_cosine,
                 "index": os.path.abspath(index_dir) if index_dir else None}
    if loaded.calibration is not None:  # prob depends on it (absent: the signature of an uncalibrated run)
        signature["calibration"] = loaded.calibration.to_dict()
    if shards is not None:
        signature.update(shards=[_file_id(s) for s in shards])

        def items():
            return shard_pairs(shards)
    elif pairs is not None:
        signature.update(pairs=_file_id(pairs), image_root=os.path.abspath(image_root) if image_root else None)

        def items():
            return read_pairs(pairs, image_root)
    else:
        signature.update(texts=list(texts), generation=rows.generation)

        def items():
            return rows.caption_pairs(texts)
    output = ResumableOutput(out, signature, overwrite=overwrite)
    total = None if no_progress else sum(1 for _ in items())
    if rows is not None:
        scorer = rows
    elif shards is not None:
        scorer = ShardScorer(loaded, batch_size=batch_size, cosine=not no_cosine)
    else:
        scorer = FileScorer(loaded, batch_size=batch_size, num_workers=workers, cosine=not no_cosine)
    shown = []

    def on_bad(bad):
        if len(shown) < SHOW_BAD and not as_json:
            echo_text(f"skipped {bad.where}: {bad.reason}", err=True)
        shown.append(bad)

    try:
        report = run_scoring(items(), scorer, output, min_prob=keep_min_prob, chunk_size=chunk,
                             progress=not no_progress, total=total, on_bad=on_bad)
    finally:
        scorer.close()
    summary = {**vars(report), "skipped_file": str(output.skipped_path)}
    if keep_shards is not None:
        with open(out, encoding="utf-8") as f:
            written = write_kept_shards(shards, (json.loads(line)["image"] for line in f), keep_shards)
        summary["kept_shards"] = {"dir": keep_shards, **vars(written)}
    if as_json:
        emit_json(summary)
        return
    if len(shown) > SHOW_BAD:
        click.echo(f"... and {len(shown) - SHOW_BAD} more", err=True)
    if report.resumed_from and report.resumed_from == report.done:
        resumed = " (already complete: nothing left to score)"
    else:
        resumed = f" (resumed after {report.resumed_from} items)" if report.resumed_from else ""
    kept = f", {report.kept} kept" if keep_min_prob is not None else ""
    echo_text(f"scored {report.scored} pairs{kept}, {report.skipped} skipped{resumed} -> {out}")
    if report.skipped:
        echo_text(f"skipped entries and reasons: {output.skipped_path}")
    if keep_shards is not None:
        k = summary["kept_shards"]
        echo_text(f"{k['shards']} shards holding {k['samples_kept']} kept samples written to {keep_shards}")


def _read_labels(labels: str) -> list[str]:
    """LABELS: a text file with one label per line, or labels separated by commas."""
    path = Path(labels)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        return [x.strip() for x in lines if x.strip()]
    return [x.strip() for x in labels.split(",") if x.strip()]


def _image_paths(images) -> list[str]:
    from edje_search.images import iter_image_files

    out = []
    for item in images:
        out += [str(p) for p in iter_image_files(item)] if os.path.isdir(item) else [item]
    return out


@click.command("classify")
@click.argument("images", nargs=-1, type=click.Path(exists=True))
@click.option("--labels", required=True,
              help="A text file with one label per line, or the labels separated by commas.")
@click.option("--model", default=None, help="Model directory or registered name (default with --index: its own).")
@click.option("--index", "index_dir", default=None, type=click.Path(file_okay=False, exists=True),
              help="Classify every indexed image from its stored tokens instead of IMAGES.")
@click.option("--template", default="a photo of {}", show_default=True,
              help="Prompt for each label; {} is replaced by the label.")
@click.option("--shortlist", default=5, show_default=True, type=click.IntRange(1),
              help="Labels per image, nearest by first-stage cosine, that the joint encoder scores.")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1), help="Labels shown per image.")
@click.option("--multi-label", is_flag=True,
              help="Tagging: every shortlisted label whose sigmoid(logit) reaches --min-prob.")
@click.option("--min-prob", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="With --multi-label: the probability a label needs.")
@click.option("--save-as", "save_as", default=None, metavar="FIELD",
              help="With --index: write each image's top label (with --multi-label: its labels joined by '; ') "
                   "into the index's metadata as FIELD, and its probability as FIELD_prob, so queries can "
                   "filter on them (--where 'FIELD = \"cat\"').")
@loader_options
@device_option
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON Lines on stdout: one {image, labels: [{label, prob, logit, cosine}], first_stage_label} "
                   "per image (row too with --index; error for a file that could not be read).")
def classify_cmd(images, labels, model, index_dir, template, shortlist, top_k, multi_label, min_prob, save_as,
                 batch_size, workers, device, no_progress, as_json):
    """Zero-shot labels for IMAGES (files or folders) or for every image of an index.

    The first stage shortlists labels per image; the joint encoder reads each shortlisted prompt
    with the image and decides. Without --multi-label, prob is a softmax over the shortlist.
    """
    from tqdm.auto import tqdm

    from edje_search.classify import ClassifySettings, classify_files, classify_rows

    if (index_dir is None) == (not images):
        raise click.UsageError("give IMAGES or --index DIR (one of them)")
    if index_dir is None and model is None:
        raise click.UsageError("give --model to classify image files")
    if save_as is not None and index_dir is None:
        raise click.UsageError("--save-as writes into an index's metadata: give --index DIR")
    names = _read_labels(labels)
    if not names:
        raise click.UsageError("--labels holds no label")
    settings = ClassifySettings(template=template, shortlist=shortlist, top_k=top_k, multi_label=multi_label,
                                min_prob=min_prob, batch_size=batch_size)
    rows, loaded = _open(model, index_dir, device, batch_size=batch_size)
    if rows is not None:
        total, results = len(rows), classify_rows(rows, names, None, settings)
        if save_as is not None:
            from edje_search.classify import save_labels

            results = save_labels(index_dir, results, save_as, multi_label=multi_label)
    else:
        paths = _image_paths(images)
        total, results = len(paths), classify_files(loaded, names, paths, settings, num_workers=workers)
    failed = 0
    for res in tqdm(results, total=total, unit="img", desc="classifying", disable=no_progress, dynamic_ncols=True):
        failed += "error" in res
        if as_json:
            click.echo(to_json(res, indent=None))
        elif "error" in res:
            echo_text(f"skipped {res['image']}: {res['error']}", err=True)
        else:
            shown = ", ".join(f"{x['label']} ({x['prob']:.3f})" for x in res["labels"]) or "(no label)"
            echo_text(f"{res['image']}: {shown}")
    if failed and not as_json:
        click.echo(f"{failed} images could not be read", err=True)


COMMANDS = (score_cmd, classify_cmd)
