"""Seconds per reranker training step for joint-encoder depths and stored-token counts.

    python -m benchmarks.reranker_step --run runs/demo --configs 3x12 2x12 3x8 \
        --out benchmarks/results/reranker_step.json

On the CPU, on a demo run's training set and first stage (``RUN/data/train.json``, ``RUN/first``,
its ``features.pt`` when it matches), with the demo's settings otherwise (batch 24 + a hard
negative image and caption each, ITM only, mean head, no dropout), negatives mined within the
batch (the demo's 256-pair pool from step 350 costs no encoder pass, so the same per step).
``LxM``: the first L layers of MiniLM-L6, M stored tokens. The configurations take turns, a few
steps each, so a change in the machine's speed during the run falls on all of them alike; the
figure is the median step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.timing import machine
from edje_search.data.annotations import read_captions
from edje_search.models.first_stage import FirstStage
from edje_search.training.batches import PairBatches
from edje_search.training.common import make_optimizer
from edje_search.training.features import FEATURES_NAME, compute_features
from edje_search.training.mining import match_groups
from edje_search.training.reranker import RerankerTrainConfig, new_reranker, step_losses


class Trainer:
    """One configuration's reranker, optimizer and batch stream."""

    def __init__(self, layers: int, queries: int, first_stage: FirstStage, data, feats, seed: int):
        self.cfg = RerankerTrainConfig(variant="compressed", n_queries=queries, mlp_dim=512, lm_layers=layers,
                                       score_head="mean", dropout=0.0, w_mlm=0, w_recovery=0, batch_size=24,
                                       lr=2e-4, steps=700, seed=seed)
        self.reranker = new_reranker(first_stage, self.cfg).train()
        self.opt, self.sched = make_optimizer(self.reranker.parameters(), self.cfg.lr, self.cfg.weight_decay,
                                              int(self.cfg.warmup_fraction * self.cfg.steps), self.cfg.steps)
        self.data, self.feats = data, feats
        self.groups = torch.from_numpy(match_groups(data.image_ids, data.caption_image, data.captions))
        self.caption_image = torch.tensor(data.caption_image)
        self.batches = PairBatches(np.asarray(data.caption_image), self.cfg.batch_size, seed)

    def step(self) -> float:
        start = time.perf_counter()
        caps = torch.from_numpy(self.batches.next())
        self.opt.zero_grad(set_to_none=True)
        losses = step_losses(self.reranker, None, self.feats, self.data.captions, global_caps=caps,
                             pool_caps=caps, offset=0, size=len(caps), caption_image=self.caption_image,
                             groups=self.groups, tok=self.reranker.tokenizer, cfg=self.cfg,
                             dev=torch.device("cpu"))
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(self.reranker.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a demo run directory (DEMO_DIR)")
    ap.add_argument("--configs", nargs="+", default=["3x12", "2x12", "3x8", "2x8"], help="LAYERSxTOKENS")
    ap.add_argument("--rounds", type=int, default=6, help="turns per configuration")
    ap.add_argument("--steps", type=int, default=5, help="steps per turn (the first turn is warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reranker_step.json"))
    args = ap.parse_args()
    if len(set(args.configs)) != len(args.configs):
        ap.error("each LAYERSxTOKENS once")
    torch.set_num_threads(args.threads)
    data = read_captions(args.run / "data" / "train.json")
    first_stage = FirstStage.from_pretrained(args.run / "first" / "first_stage").eval()
    feats = compute_features(first_stage, data, reuse=args.run / "first" / FEATURES_NAME, progress=False)
    trainers = {}
    for spec in args.configs:
        layers, queries = (int(x) for x in spec.split("x"))
        torch.manual_seed(0)
        trainers[spec] = Trainer(layers, queries, first_stage, data, feats, seed=0)
    times: dict[str, list[float]] = {spec: [] for spec in trainers}
    for turn in range(args.rounds + 1):
        for spec, trainer in trainers.items():
            steps = [trainer.step() for _ in range(args.steps)]
            if turn > 0:
                times[spec] += steps
    base = statistics.median(times[args.configs[0]])
    result = {"machine": machine(), "run": str(args.run), "steps_per_config": args.rounds * args.steps,
              "configs": {spec: {"median_step_s": round(statistics.median(t), 4),
                                 "ratio_to_" + args.configs[0]: round(statistics.median(t) / base, 3)}
                          for spec, t in times.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["configs"], indent=2))


if __name__ == "__main__":
    main()
