"""make-dataset, train first-stage, train reranker, eval, calibrate."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click

from edje_search.config import DEFAULT_RERANK_K, PRECISIONS
from edje_search.training.configs import FirstStageTrainConfig, RerankerTrainConfig

from .common import BACKENDS, emit_json, json_option
from .config_flags import config_flags, config_from_flags


def threads_option(f):
    return click.option("--threads", default=None, type=click.IntRange(min=1),
                        help="CPU threads for torch (default: torch's choice, one per core). On a shared "
                             "machine 1-2 can be several times faster than oversubscribed cores.")(f)


def _use_threads(threads: int | None) -> None:
    from edje_search.training.common import set_threads

    set_threads(threads)


class _ProgressSafeHandler(logging.Handler):
    """Writes each log line through tqdm, so a line printed during training lands on its own line
    above the progress bar instead of after it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never stop training
            self.handleError(record)


def _show_training_messages() -> None:
    """Print the training modules' log lines (what was loaded, warnings) on stderr, one line each."""
    log = logging.getLogger("edje_search.training")
    if not any(getattr(h, "_edje_cli", False) for h in log.handlers):
        handler = _ProgressSafeHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._edje_cli = True
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _read_training_data(annotations: str, image_root: str | None):
    from edje_search.data.annotations import read_captions

    data = read_captions(annotations, image_root)
    for where, reason in data.problems[:20]:
        click.echo(f"skipped {where}: {reason}", err=True)
    if len(data.problems) > 20:
        click.echo(f"... and {len(data.problems) - 20} more skipped entries", err=True)
    if len(data.images) < 2:
        raise click.UsageError(f"{annotations}: need at least two usable images, found {len(data.images)}")
    click.echo(f"{len(data.images)} images, {len(data.captions)} captions, {len(data.problems)} entries skipped",
               err=True)
    return data


@click.command("make-dataset")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--train", "n_train", default=20000, show_default=True, help="Training images.")
@click.option("--val", "n_val", default=500, show_default=True, help="Validation images.")
@click.option("--test", "n_test", default=1000, show_default=True, help="Test images.")
@click.option("--image-size", default=48, show_default=True, help="Side of the square images in pixels.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same data set).")
@click.option("--style", type=click.Choice(["shapes", "heldout", "glyphs"]), default="shapes", show_default=True,
              help="shapes: the project's generator; heldout: other shapes, colours, backgrounds, layouts and "
                   "caption templates, for checking that a recipe carries over to unseen data; glyphs: a third "
                   "one, of order, direction and containment with solid or hollow objects.")
def make_dataset_cmd(out_dir, n_train, n_val, n_test, image_size, seed, style):
    """Render the generated compositional shapes data set (train/val/test + annotation JSON)."""
    from edje_search.data.synthetic import make_dataset

    files = make_dataset(out_dir, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed,
                         style=style)
    for split, path in files.items():
        click.echo(f"{split}: {path}")


@click.group("train")
def train():
    """Train the first stage or the reranker (run under `torchrun` for several processes)."""


def _data_options(f):
    f = click.option("--image-root", default=None, type=click.Path(exists=True, file_okay=False),
                     help="Folder the annotation's image paths are relative to (default: the file's folder).")(f)
    return click.option("--data", "annotations", required=True, type=click.Path(exists=True, dir_okay=False),
                        help="Training annotations: BLIP-style JSON list or JSON Lines of {image, caption}.")(f)


@train.command("first-stage")
@_data_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder; the model goes to OUT/first_stage, resumable state to OUT/train_state.pt.")
@config_flags(FirstStageTrainConfig)
@click.option("--features/--no-features", default=True, show_default=True,
              help="Also write the trained model's features of the training set to OUT/features.pt "
                   "(image embeddings, vision tokens, caption embeddings), for `train reranker --features`.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@threads_option
def train_first_stage_cmd(annotations, image_root, out_dir, config_file, features, device, threads, **flags):
    """Contrastively train a small ViT against the locked bundled MiniLM text tower."""
    from edje_search.training.features import FEATURES_NAME
    from edje_search.training.first_stage import train_first_stage

    cfg = config_from_flags(FirstStageTrainConfig, flags, config_file)
    if cfg.epochs:
        cfg = dataclasses.replace(cfg, steps=None)
    _use_threads(threads)
    _show_training_messages()
    data = _read_training_data(annotations, image_root)
    _save_run_config(out_dir, cfg)
    model = train_first_stage(data, out_dir, cfg, device=device, save_features=features)
    model.save_pretrained(Path(out_dir) / "first_stage")
    click.echo(f"first stage saved to {Path(out_dir) / 'first_stage'}")
    if features:
        click.echo(f"training-set features saved to {Path(out_dir) / FEATURES_NAME} "
                   "(for `train reranker --features`)")


@train.command("reranker")
@_data_options
@click.option("--first-stage", "first_stage_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="First-stage directory (from `train first-stage`, or an EDJE model's first_stage/).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder; the model goes to OUT/model, resumable state to OUT/train_state.pt.")
@config_flags(RerankerTrainConfig)
@click.option("--teacher", "teacher_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Trained model directory to distil from (e.g. the local variant).")
@click.option("--init-from", default=None, type=click.Path(exists=True, file_okay=False),
              help="Start from this model directory's reranker (fine-tuning).")
@click.option("--features", "features_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Features of the training set from `train first-stage` (its OUT/features.pt): used when "
                   "they match this first stage and data, instead of encoding every image and caption again.")
@click.option("--language-model", "lm_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="BERT directory to start the joint encoder from (default: bundled MiniLM-L6).")
@click.option("--val-data", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Auto mode: a labelled validation split (evaluation format, paths relative to its folder) "
                   "instead of images carved from --data.")
@click.option("--name", default="edje", show_default=True, help="Name recorded in the model directory.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
@threads_option
def train_reranker_cmd(annotations, image_root, first_stage_dir, out_dir, config_file, teacher_dir, init_from,
                       features_path, lm_dir, val_data, name, device, threads, **flags):
    """Train the adapter + joint encoder with ITM (hard negatives), MLM, recovery and distillation."""
    from edje_search.training.reranker import train_reranker

    cfg = config_from_flags(RerankerTrainConfig, flags, config_file)
    if not teacher_dir:
        cfg = dataclasses.replace(cfg, w_distill=0.0)
    _use_threads(threads)
    _show_training_messages()
    if val_data and not cfg.auto:
        raise click.UsageError("--val-data is read by --auto only")
    data = _read_training_data(annotations, image_root)
    val = _read_training_data(val_data, None) if val_data else None
    _save_run_config(out_dir, cfg)
    train_reranker(first_stage_dir, data, out_dir, cfg, teacher_dir=teacher_dir, init_from=init_from,
                   lm_dir=lm_dir, features_path=features_path, name=name, device=device, val_data=val)
    click.echo(f"model saved to {Path(out_dir) / 'model'}")


def _save_run_config(out_dir: str, cfg) -> None:
    """OUT/train_config.json: what this run was told (``--config`` reads it back)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


@click.command("eval")
@_data_options
@click.option("--model", "models", multiple=True, required=True,
              help="Model directory or name; repeat to compare rerankers sharing one first stage.")
@click.option("--rerank-k", default=DEFAULT_RERANK_K, show_default=True, help="First-stage candidates to rerank.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Joint-encoder precision while scoring; auto is what search uses (bf16 or fp16 autocast "
                   "on CUDA, fp32 on the CPU).")
@click.option("--batch-size", default=128, show_default=True, help="Pairs per joint-encoder batch.")
@click.option("--backend", type=click.Choice(BACKENDS), default="eager", show_default=True,
              help="How the rerankers run (see `edje-search query --help`).")
@click.option("--token-precision", type=click.Choice(["float16", "int8", "float32"]), default="float16",
              show_default=True,
              help="Score the stored tokens as an index of this precision holds them (build-index's "
                   "--token-precision); float32 for comparison.")
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False),
              help="Also write the results as JSON to this file.")
@threads_option
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@json_option
def eval_cmd(annotations, image_root, models, rerank_k, precision, batch_size, backend, token_precision, out_file,
             threads, device, as_json):
    """Recall@1/5/10, text-to-image and image-to-text, first stage vs reranked."""
    from edje_search import load_model
    from edje_search.evaluation import evaluate, format_table, load_eval_set
    from edje_search.devices import pick_device

    _use_threads(threads)
    data = load_eval_set(annotations, image_root)
    loaded = [load_model(m).to(pick_device(device)).eval() for m in models]
    for m in loaded:
        m.reranker.use_backend(backend)
    results = evaluate(loaded, data, rerank_k=rerank_k, precision=precision, batch_size=batch_size,
                       token_dtype=token_precision)
    results["data"] = str(annotations)
    if out_file:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(json.dumps(results, indent=2) + "\n")
    if as_json:
        emit_json(results)
    else:
        click.echo(format_table(results))


@click.command("calibrate")
@_data_options
@click.option("--model", "model_name", required=True, help="Model directory or name to calibrate.")
@click.option("--rerank-k", default=DEFAULT_RERANK_K, show_default=True, help="First-stage candidates to rerank.")
@click.option("--weights", default=None,
              help="Comma-separated fusion weights to try (default: 0,1,2,5,10,20,50,100,200).")
@click.option("--fit", type=click.Choice(["both", "fusion", "probability"]), default="both", show_default=True,
              help="What to fit and write: the fusion weight, the match-probability calibration, or both.")
@click.option("--batch-size", default=128, show_default=True, help="Pairs per joint-encoder batch.")
@click.option("--dry-run", is_flag=True, help="Report what was fitted without writing it.")
@threads_option
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@json_option
def calibrate_cmd(annotations, image_root, model_name, rerank_k, weights, fit, batch_size, dry_run, threads, device,
                  as_json):
    """Fit, on a labelled split, how reranked hits are ranked and what their probability means.

    Fusion weight: reranked hits are ranked by joint-encoder logit + W x first-stage similarity
    (as ALBEF and BLIP add their contrastive similarity to the matching score; W = 0 is the
    joint encoder alone); each W is scored by mean R@1 of both directions. Match probability:
    Platt scaling, prob = sigmoid(a x logit + b), fitted on each caption with its own image and
    with the other first-stage candidates it reranks; `query --min-prob` cuts on it. --data
    should be a validation split, not the test split you report. Both go into the model's
    edje.json, which search, eval and score then use; stored index rows do not change.
    """
    from edje_search import load_model
    from edje_search.calibration import Calibration
    from edje_search.devices import pick_device
    from edje_search.evaluation import FUSION_GRID, calibrate_fusion, load_eval_set
    from edje_search.models.names import is_hub_ref

    try:
        grid = [float(w) for w in weights.split(",")] if weights else list(FUSION_GRID)
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {weights!r}",
                                 param_hint="--weights") from None
    if any(w < 0 for w in grid):
        raise click.BadParameter("fusion weights must be >= 0", param_hint="--weights")
    if rerank_k < 2:
        raise click.BadParameter("needs at least 2 candidates per caption", param_hint="--rerank-k")
    if is_hub_ref(model_name) and not dry_run:
        raise click.UsageError("a hub model lives in the read-only hub cache: copy its directory and calibrate "
                               "the copy, or use --dry-run")
    _use_threads(threads)
    data = load_eval_set(annotations, image_root)
    model = load_model(model_name).to(pick_device(device)).eval()
    result = calibrate_fusion(model, data, rerank_k=rerank_k, weights=grid, batch_size=batch_size,
                              fusion=fit != "probability", probability=fit != "fusion")
    result.update(model=str(model.path), data=str(annotations), previous=model.fusion_weight, written=not dry_run,
                  previous_calibration=model.calibration.to_dict() if model.calibration else None)
    if "calibration" in result:
        result["calibration"]["data"] = str(annotations)
    if not dry_run:
        if result["best"] is not None:
            model.fusion_weight = result["best"]
        if "calibration" in result:
            model.calibration = Calibration.from_dict(result["calibration"])
        model.save_info()
    if as_json:
        emit_json(result)
        return
    _print_calibration(result, rerank_k, dry_run, model.path)


def _print_calibration(result: dict, rerank_k: int, dry_run: bool, model_path) -> None:
    click.echo(f"{result['n_images']} images, {result['n_captions']} captions, rerank_k={rerank_k}")
    where = "not written (--dry-run)" if dry_run else f"written to {model_path}/edje.json"
    if result["rows"]:
        first = result["first_stage"]
        click.echo(f"{'weight':>11} | {'t2i R@1':>8} {'i2t R@1':>8} | vs first stage")
        click.echo(f"{'first stage':>11} | {first['t2i']['R@1']:8.1f} {first['i2t']['R@1']:8.1f} |")
        for row in result["rows"]:
            mark = "  <- best" if row["fusion_weight"] == result["best"] else ""
            gain = f" | {row['t2i']['R@1'] - first['t2i']['R@1']:+6.1f} {row['i2t']['R@1'] - first['i2t']['R@1']:+6.1f}"
            click.echo(f"{row['fusion_weight']:11g} | {row['t2i']['R@1']:8.1f} {row['i2t']['R@1']:8.1f}{gain}{mark}")
        click.echo(f"fusion weight {result['best']:g} {where} (was {result['previous']:g})")
    cal = result.get("calibration")
    if cal:
        click.echo(f"match probability = sigmoid({cal['a']:.4f} x logit {cal['b']:+.4f}), fitted on {cal['positives']} "
                   f"matching and {cal['negatives']} non-matching pairs; mean log loss {cal['log_loss']:.4f} "
                   f"(sigmoid(logit): {cal['log_loss_sigmoid']:.4f}); {where}")


COMMANDS = (make_dataset_cmd, train, eval_cmd, calibrate_cmd)
