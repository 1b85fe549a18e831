"""How many first-stage candidates to rerank: recall and query time against rerank_k.

    python -m benchmarks.rerank_k --model edje-demo --data runs/demo/data/test.json --index indexes/demo

For each rerank_k: Recall@1/5/10 in both directions on the labelled split (the evaluation's own
path, `evaluation.rerank_set`, encoded once), and the median wall time of `Engine.search` for
single text queries on the index (k=10; the test captions as queries). The library's default,
`config.DEFAULT_RERANK_K`, is chosen from this table. Writes benchmarks/results/rerank_k.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from edje_search import Engine
from edje_search.evaluation import encode_set, load_eval_set, rerank_set
from edje_search.models.registry import load_model

from .run import RESULTS
from .timing import machine


def sweep(model_name: str, data_file: str, index_dir: str, ks: list[int], n_queries: int) -> dict:
    model = load_model(model_name).eval()
    data = load_eval_set(data_file)
    enc = encode_set(model, data, progress=False)
    engine = Engine.from_pretrained(index_dir, device="cpu")
    queries = data.captions[:: max(1, len(data.captions) // n_queries)][:n_queries]
    rows = []
    for k in ks:
        ranked = rerank_set(model, data, enc, enc.tokens[0], rerank_k=k, progress=False)
        engine.search(queries[0], k=10, rerank_k=k)  # warm-up
        times = []
        for q in queries:
            t0 = time.perf_counter()
            engine.search(q, k=10, rerank_k=k)
            times.append(1000 * (time.perf_counter() - t0))
        rows.append({"rerank_k": k, "t2i": ranked.recall("t2i", model.fusion_weight),
                     "i2t": ranked.recall("i2t", model.fusion_weight),
                     "query_ms_p50": round(statistics.median(times), 2), "queries_timed": len(times)})
        print(json.dumps(rows[-1]))
    return {"model": model_name, "data": data_file, "index": index_dir, "images": len(data.images),
            "fusion_weight": model.fusion_weight, "rows": rows, "machine": machine()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--ks", default="5,10,20,50,100")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--out", default=str(RESULTS / "rerank_k.json"))
    args = ap.parse_args()
    res = sweep(args.model, args.data, args.index, [int(k) for k in args.ks.split(",")], args.queries)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
