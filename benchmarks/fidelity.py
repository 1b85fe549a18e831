"""Fidelity of the fast paths against eager fp32 on a trained model and a labelled split.

    python -m benchmarks.fidelity --model runs/hb_c/model --data runs/demo/data/test.json

For each reranker backend, and for int8 token storage (tokens quantised with one scale per
token, then scored in eager fp32): the largest logit difference from eager over every reranked
pair, how often the reranked top-1 is the same, and Recall@1 in both directions.
Writes benchmarks/results/fidelity.json.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from edje_search.evaluation import (encode_set, first_correct_rank, first_stage_rankings, load_eval_set, pair_scorer,
                                    recall_at_k, rerank_order, rerank_scores, served_tokens)
from edje_search.models.registry import load_model

from .timing import machine
from .run import RESULTS

DEFAULT_BACKENDS = ("eager", "dynamic-int8", "onnx", "onnx-int8")


def _ranked(order: np.ndarray, rerank_k: int, scorer) -> tuple[np.ndarray, np.ndarray]:
    scores = rerank_scores(order, rerank_k, scorer)
    return rerank_order(order, scores), scores


def fidelity(model_dir: str, data_file: str, backends=DEFAULT_BACKENDS, rerank_k: int = 10,
             batch_size: int = 64) -> dict:
    backends = ("eager",) + tuple(b for b in backends if b != "eager")  # eager is the reference
    model = load_model(model_dir).eval()
    data = load_eval_set(data_file)
    enc = encode_set(model, data, token_dtype="float32")
    orders, _, targets = first_stage_rankings(enc, data)
    tokens = enc.tokens[0]
    int8_tokens = torch.from_numpy(served_tokens(tokens.numpy(), "int8"))
    cases = [(b, b, tokens) for b in backends] + [("int8 tokens (eager)", "eager", int8_tokens)]
    rows, ref = [], {}
    for name, backend, toks in cases:
        model.reranker.use_backend(backend)
        t0 = time.perf_counter()
        row = {"name": name, "backend": backend, "token_storage": "int8" if toks is int8_tokens else "fp32"}
        for d in ("t2i", "i2t"):
            scorer = pair_scorer(model, data.captions, toks, captions_are_queries=d == "t2i",
                                 batch_size=batch_size, progress=False)
            order, scores = _ranked(orders[d], rerank_k, scorer)
            row[d] = recall_at_k(first_correct_rank(order, targets[d]))
            if name == "eager":
                ref[d] = (order[:, 0], scores)
            row[f"{d} top1_agreement"] = float(np.mean(order[:, 0] == ref[d][0]))
            row[f"{d} max_abs_logit_error"] = float(np.abs(scores - ref[d][1]).max())
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for row in rows:
        row["t2i R@1 delta"] = row["t2i"]["R@1"] - base["t2i"]["R@1"]
        row["i2t R@1 delta"] = row["i2t"]["R@1"] - base["i2t"]["R@1"]
    return {"machine": machine(), "time": time.strftime("%F %T"), "model": str(model_dir), "data": str(data_file),
            "n_images": len(data.images), "n_captions": len(data.captions), "rerank_k": rerank_k, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rerank-k", type=int, default=10)
    ap.add_argument("--backends", default=",".join(DEFAULT_BACKENDS))
    ap.add_argument("--out", default=str(RESULTS / "fidelity.json"))
    args = ap.parse_args()
    res = fidelity(args.model, args.data, tuple(args.backends.split(",")), args.rerank_k)
    with open(args.out, "w") as f:
        f.write(json.dumps(res, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
