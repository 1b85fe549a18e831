"""``train reranker --auto``: a run sized from the data, steered by a validation curve.

- Length: at most ``--max-epochs`` passes over the training captions, cut to what fits in
  ``--max-minutes`` once the first steps and the first validation have been timed (validation
  is given about 15% of the time). The learning-rate schedule (linear warm-up, cosine decay)
  is sized to that length.
- Validation every ``val_every`` steps (chosen: 3-12 evaluations per run) on the validation
  split (:mod:`.validation`); the score is the mean R@1 of both directions, logit alone.
- Hard negatives: in-batch first; the ``--mining-pool`` pool (256 when not given) from the
  first validation that fails to beat the best score by ``--min-delta`` (the in-batch curve's
  plateau), or from half the planned steps when the curve has not flattened by then.
- Early stopping: ``--patience`` validations without such a gain once the pool is on.
- The best validated weights are kept (``OUT/best_reranker.pt``) and are what the run saves.

The curve, the plan and the decisions live in the resumable checkpoint, so a resumed run goes on
with the same curve; ``OUT/val_curve.json`` and ``OUT/val_curve.png`` are rewritten after each
validation.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from ..fsutil import atomic_write_text
from .common import SizedCosine, load_checkpoint, save_checkpoint
from .configs import RerankerTrainConfig

logger = logging.getLogger(__name__)

AUTO_POOL = 256  # the pool of the paper (8 x 32) and of the demo recipe
PROBE_STEPS = 10  # steps timed before the run's length is chosen
VAL_SHARE = 0.15  # of the time budget spent validating
MIN_EVALS, MAX_EVALS = 3, 12
TOKENS_PER_IMAGE_WARNING = 250  # training images per stored token below which the data set is called small
CURVE_NAME, PLOT_NAME, BEST_NAME = "val_curve.json", "val_curve.png", "best_reranker.pt"


def max_steps(cfg: RerankerTrainConfig, n_captions: int) -> int:
    """Steps of ``cfg.max_epochs`` passes over ``n_captions`` training captions (at least 1)."""
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, math.ceil(cfg.max_epochs * n_captions / per_step))


def plan_length(limit: int, done: int, step_s: float, val_s: float, left_s: float | None,
                fixed_every: int = 0) -> tuple[int, int]:
    """(total steps, steps between validations) for a run at step ``done`` with ``left_s`` seconds
    left (None: no budget), ``step_s`` per step and ``val_s`` per validation, at most ``limit`` steps."""
    def evals_for(train_s: float) -> int:
        return min(MAX_EVALS, max(MIN_EVALS, int(VAL_SHARE / (1 - VAL_SHARE) * train_s / max(val_s, 1e-6))))

    total = limit
    if left_s is not None:
        # the steps that fit once the validations are paid for (one more for the final one)
        train_s = max(0.0, left_s * (1 - VAL_SHARE))
        n_evals = evals_for(train_s)
        fits = done + int(max(0.0, left_s - (n_evals + 1) * val_s) / max(step_s, 1e-6))
        total = max(done + 1, min(limit, fits))
    n_evals = evals_for((total - done) * step_s)
    every = fixed_every or max(1, math.ceil(total / n_evals))
    return total, every


class AutoRun:
    """The plan, the validation curve and the decisions of one auto run (main process only)."""

    def __init__(self, cfg: RerankerTrainConfig, out_dir: Path, n_captions: int, n_images: int,
                 validate, first_stage_recall: dict, n_queries: dict, n_val_images: int, state: dict | None,
                 start: float):
        self.cfg, self.out_dir, self.validate_fn = cfg, Path(out_dir), validate
        self.limit = max_steps(cfg, n_captions)
        self.n_images = n_images
        self.pool = cfg.mining_pool or AUTO_POOL
        self.start = start  # time.monotonic() when this process began the run
        s = state or {}
        self.total = s.get("total", self.limit)
        self.every = s.get("every", cfg.val_every or max(1, math.ceil(self.limit / MAX_EVALS)))
        self.planned = s.get("planned", False)
        self.pool_from = s.get("pool_from")
        self.best = s.get("best")  # {"step", "score", "t2i", "i2t"}
        self.bad = s.get("bad", 0)
        self.stopped = s.get("stopped")
        self.points: list[dict] = list(s.get("points", []))
        self.elapsed_before = s.get("elapsed", 0.0)
        self.val_s = s.get("val_s")
        self.first_stage = first_stage_recall
        self.meta = {"n_val_images": n_val_images, "n_queries": n_queries, "rerank_k": cfg.val_rerank_k}
        self.probe_start: tuple[int, float] | None = None
        self.val_since_probe = 0.0  # seconds validating since probe_start, not counted as step time
        self.last_eval: tuple[int, float] | None = None  # (step, when it ended) of this process's last validation

    # ------------------------------------------------------------------------------- state
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.start

    def state_dict(self) -> dict:
        return {"total": self.total, "every": self.every, "planned": self.planned, "pool_from": self.pool_from,
                "best": self.best, "bad": self.bad, "stopped": self.stopped, "points": self.points,
                "elapsed": self.elapsed(), "val_s": self.val_s}

    def budget_s(self) -> float | None:
        return None if self.cfg.max_minutes is None else 60.0 * self.cfg.max_minutes

    def pool_size(self, step: int) -> int:
        return self.pool if self.pool_from is not None and step >= self.pool_from else 0

    def warn_if_small(self) -> None:
        per_token = self.n_images / max(1, self.cfg.n_queries)
        if self.cfg.variant == "compressed" and per_token < TOKENS_PER_IMAGE_WARNING:
            logger.warning("warning: %d training images for %d stored tokens per image (%.0f per token, under "
                           "%d): the adapter may fit the training images rather than learn; fewer --n-queries "
                           "or more images", self.n_images, self.cfg.n_queries, per_token,
                           TOKENS_PER_IMAGE_WARNING)

    # ------------------------------------------------------------------------------- steps
    def begin(self, step: int, reranker: torch.nn.Module, sched) -> None:
        """Before the first step of this process: the first-stage baseline and step-0 validation
        (a fresh run), and the timing of the next steps."""
        if not self.points:
            self.evaluate(step, reranker)
        self.probe_start, self.val_since_probe = (step, time.monotonic()), 0.0

    def after_step(self, step: int, reranker: torch.nn.Module, sched) -> bool:
        """Bookkeeping after optimizer step ``step``; True when a validation ran (checkpoint now)."""
        if not self.planned and self.probe_start and step - self.probe_start[0] >= min(PROBE_STEPS, self.limit):
            self._plan(step, sched)
        if self.pool_from is None and step >= self.total // 2:
            self.pool_from = step
            logger.info("step %d: half the planned steps without an in-batch plateau: mining among %d pairs from "
                        "now on", step, self.pool)
        budget = self.budget_s()
        step_s = self._step_s(step)
        out_of_time = budget is not None and step_s is not None and \
            self.elapsed() + step_s + (self.val_s or 0.0) > budget
        due = step % self.every == 0 or step >= self.total or out_of_time
        if not due:
            return False
        since = self.last_eval
        self.evaluate(step, reranker)
        if self.planned and budget is not None and since is not None and step > since[0] and self.stopped is None:
            self._replan(step, sched, (self.last_eval[1] - self.val_s - since[1]) / (step - since[0]))
        if self.stopped is None and (step >= self.total or out_of_time):
            self.stopped = "budget" if out_of_time or (budget is not None and self.total < self.limit) else "max epochs"
        return True

    def _step_s(self, step: int) -> float | None:
        if self.probe_start is None or step <= self.probe_start[0]:
            return None
        spent = time.monotonic() - self.probe_start[1] - self.val_since_probe
        return max(spent, 0.0) / (step - self.probe_start[0])

    def _replan(self, step: int, sched, step_s: float) -> None:
        """Fit the rest of the run to the budget at the step time since the last validation (the
        machine may have got slower or faster), and resize the learning-rate schedule with it."""
        left = self.budget_s() - self.elapsed()
        val_s = self.val_s or 0.0
        # each step also pays 1/every of a validation; one more validation at the end
        fits = step + int(max(0.0, left - val_s) / max(step_s + val_s / self.every, 1e-6))
        total = max(step + 1, min(self.limit, fits))
        if abs(total - self.total) > 0.05 * self.total:
            logger.info("auto: %.2f s a step since the last validation -> at most %d steps (was %d)", step_s, total,
                        self.total)
            self.total = total
            schedule = sched.lr_lambdas[0]
            if isinstance(schedule, SizedCosine):
                schedule.total = total

    def _plan(self, step: int, sched) -> None:
        step_s = self._step_s(step) or 1.0
        budget = self.budget_s()
        left = None if budget is None else budget - self.elapsed()
        self.total, self.every = plan_length(self.limit, step, step_s, self.val_s or 0.0, left, self.cfg.val_every)
        self.planned = True
        schedule = sched.lr_lambdas[0]
        if isinstance(schedule, SizedCosine):
            schedule.warmup, schedule.total = int(self.cfg.warmup_fraction * self.total), self.total
        logger.info("auto: %.2f s a step, %.0f s a validation -> at most %d steps (%s), validating every %d",
                    step_s, self.val_s or 0.0, self.total,
                    f"{self.limit} for {self.cfg.max_epochs:g} epochs" + (
                        f", {budget / 60:g} min budget" if budget is not None else ""), self.every)

    # ------------------------------------------------------------------------------- validation
    def evaluate(self, step: int, reranker: torch.nn.Module) -> None:
        began = time.monotonic()
        recall = self.validate_fn(reranker)
        self.val_s = time.monotonic() - began
        self.last_eval = (step, time.monotonic())
        self.val_since_probe += self.val_s
        score = (recall["t2i"]["R@1"] + recall["i2t"]["R@1"]) / 2
        # "pool": the pool of the step that led here
        point = {"step": step, "time": round(self.elapsed(), 1), "score": score, "pool": self.pool_size(step - 1),
                 "t2i": recall["t2i"], "i2t": recall["i2t"]}
        self.points.append(point)
        gain = {d: recall[d]["R@1"] - self.first_stage[d]["R@1"] for d in ("t2i", "i2t")}
        improved = self.best is None or score >= self.best["score"] + self.cfg.min_delta
        if self.best is None or score > self.best["score"]:
            self.best = {"step": step, "score": score, "t2i": recall["t2i"], "i2t": recall["i2t"]}
            save_checkpoint(self.out_dir / BEST_NAME, model=reranker.state_dict(), step=step)
        note = "best" if self.best["step"] == step else f"best {self.best['score']:.1f} at step {self.best['step']}"
        # a plateau is a curve that rose and stopped rising, not one still at its step-0 level
        risen = self.best["score"] >= self.points[0]["score"] + self.cfg.min_delta
        if step > 0 and not improved and self.pool_from is None and risen:
            self.pool_from, self.bad = step, 0
            note += f"; in-batch negatives plateaued: mining among {self.pool} pairs from now on"
        elif step > 0 and not improved and self.pool_from is not None:
            self.bad += 1
            if self.bad >= self.cfg.patience:
                self.stopped = "plateau"
                note += f"; no gain of {self.cfg.min_delta:g} in {self.bad} validations: stopping"
        elif improved:
            self.bad = 0
        logger.info("step %d: val R@1 t2i %.1f (%+.1f over the first stage) i2t %.1f (%+.1f) [%s]", step,
                    recall["t2i"]["R@1"], gain["t2i"], recall["i2t"]["R@1"], gain["i2t"], note)
        self.write_curve()

    def should_stop(self) -> bool:
        return self.stopped is not None

    # ------------------------------------------------------------------------------- the end
    def finish(self, reranker: torch.nn.Module) -> dict:
        """Load the best weights into ``reranker``, write the curve, log the summary (and warnings)."""
        best = load_checkpoint(self.out_dir / BEST_NAME)
        if best is not None:
            reranker.load_state_dict(best["model"])
        self.stopped = self.stopped or "max epochs"
        self.write_curve()
        b = self.best
        gain = {d: b[d]["R@1"] - self.first_stage[d]["R@1"] for d in ("t2i", "i2t")}
        last = self.points[-1]["step"] if self.points else 0
        logger.info("auto: stopped at step %d (%s) after %.1f min; kept step %d: val R@1 t2i %.1f (%+.1f) i2t %.1f "
                    "(%+.1f) over the first stage on %d images; hard-negative pool %s", last, self.stopped,
                    self.elapsed() / 60, b["step"], b["t2i"]["R@1"], gain["t2i"], b["i2t"]["R@1"], gain["i2t"],
                    self.meta["n_val_images"],
                    f"from step {self.pool_from}" if self.pool_from is not None else "never switched on")
        if self.stopped != "plateau" and self._still_rising():
            logger.warning("warning: the validation gain was still rising when the run ended (%s): a longer "
                           "--max-minutes or more --max-epochs may gain more", self.stopped)
        return self.summary()

    def _still_rising(self) -> bool:
        scores = [p["score"] for p in self.points if p["step"] > 0]
        return len(scores) >= 2 and self.best["step"] == self.points[-1]["step"] and \
            scores[-1] >= scores[-2] + self.cfg.min_delta

    def summary(self) -> dict:
        return {"first_stage": self.first_stage, "points": self.points, "best": self.best,
                "pool_from": self.pool_from, "pool": self.pool, "stopped": self.stopped, "total": self.total,
                "every": self.every, "max_steps": self.limit, "minutes": round(self.elapsed() / 60, 2), **self.meta}

    def write_curve(self) -> None:
        atomic_write_text(self.out_dir / CURVE_NAME, json.dumps(self.summary(), indent=1) + "\n")
        try:
            plot_curve(self.summary(), self.out_dir / PLOT_NAME)
        except Exception as e:  # noqa: BLE001 - a plot is a convenience; the JSON holds the curve
            logger.info("val curve plot not written: %s", e)


def plot_curve(curve: dict, path: Path) -> None:
    """The validation R@1 of both directions against the step, the first stage, the pool switch and the best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = [p["step"] for p in curve["points"]]
    for d, colour in (("t2i", "tab:blue"), ("i2t", "tab:orange")):
        ax.plot(steps, [p[d]["R@1"] for p in curve["points"]], "o-", color=colour, label=f"{d} R@1 (logit)")
        ax.axhline(curve["first_stage"][d]["R@1"], color=colour, ls=":", label=f"{d} first stage")
    if curve.get("pool_from") is not None:
        ax.axvline(curve["pool_from"], color="grey", ls="--", label=f"pool of {curve['pool']} on")
    if curve.get("best"):
        ax.axvline(curve["best"]["step"], color="green", ls="-", alpha=0.4, label="kept")
    ax.set_xlabel("step")
    ax.set_ylabel("validation R@1 (%)")
    ax.set_title(f"{curve['n_val_images']} validation images, stopped: {curve.get('stopped') or 'running'}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prepare(first_stage, data, feats, cfg: RerankerTrainConfig, out_dir: Path, *, val_data=None,
            state: dict | None, start: float, progress: bool = True):
    """(training data, its features, the AutoRun) of an auto run on ``data``.

    Without ``val_data`` the validation images are carved from ``data`` (the same ones on resume:
    the carve is seeded by ``cfg.seed``) and their cached features reused.
    """
    from .features import compute_features
    from .validation import carve, make_validation_set, subset, subset_features, validate, validation_size

    if val_data is None:
        train_idx, val_idx = carve(data, validation_size(len(data.images), cfg.val_images), cfg.seed)
        val_set, val_feats = subset(data, val_idx), subset_features(feats, data, val_idx)
        data, feats = subset(data, train_idx), subset_features(feats, data, train_idx)
        logger.info("auto: %d training images, %d carved out for validation", len(data.images), len(val_idx))
    else:
        val_set = val_data
        val_feats = compute_features(first_stage, val_data, cache=Path(out_dir) / "val_features.pt",
                                     progress=progress)
    vs = make_validation_set(val_set, val_feats, rerank_k=cfg.val_rerank_k, n_queries=cfg.val_queries,
                             seed=cfg.seed)
    run = AutoRun(cfg, out_dir, len(data.captions), len(data.images),
                  lambda reranker: validate(first_stage, reranker, vs), vs.first_stage, vs.n_queries,
                  len(val_set.images), state, start)
    fs = vs.first_stage
    logger.info("auto: validating on %d images (%d t2i / %d i2t queries, top %d reranked); first stage R@1 "
                "t2i %.1f i2t %.1f", len(val_set.images), vs.n_queries["t2i"], vs.n_queries["i2t"], cfg.val_rerank_k,
                fs["t2i"]["R@1"], fs["i2t"]["R@1"])
    run.warn_if_small()
    return data, feats, run
