"""Hits of 20 demo test captions through Engine.search (k=10, rerank_k=50) as JSON: run it with two versions of
the code on one index and diff the files (usage: python scripts/search_hits.py INDEX DATA.json OUT.json)."""
import json, sys
from edje_search import Engine
index, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
items = json.load(open(data))
queries = [items[i * 50]["caption"][0] for i in range(20)]
engine = Engine.from_pretrained(index, device="cpu")
res = {}
for q in queries:
    hits = engine.search(q, k=10, rerank_k=50)
    res[q] = [(h.row, h.path, round(h.first_stage_score, 5), None if h.rerank_score is None else round(h.rerank_score, 4)) for h in hits]
json.dump(res, open(out, "w"), indent=1)
print(len(res), "queries;", sum(len(v) for v in res.values()), "hits")
