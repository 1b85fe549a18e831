"""Build small indexes in the 0.2 layout (.npy token segments); run it on a checkout of 0.2 (see README.md)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

from edje_search import Engine, load_model
from edje_search.data.synthetic import make_dataset
from edje_search.models.registry import build_tiny_model
out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
work = Path("/tmp/legacy/work")
shutil.rmtree(work, ignore_errors=True)
model_dir = work / "model"
build_tiny_model(seed=0).save_pretrained(model_dir)
make_dataset(work / "shapes", n_train=0, n_val=0, n_test=12, image_size=32, seed=1, progress=False)
expected = {}
for dtype in ("float16", "int8"):
    d = out / dtype
    eng = Engine.create(d, load_model(model_dir), token_dtype=dtype)
    eng.sync(work / "shapes" / "test", num_workers=0, progress=False, batch_size=4, commit_every=5)
    gone = sorted(e.path for e in eng.store.entries)[:1]
    eng.remove(gone)
    hits = {q: [(Path(h.path).name, round(h.score, 4)) for h in eng.search(q, k=5, rerank_k=8)]
            for q in ("a red circle", "two blue squares")}
    rows = {Path(e.path).name: e.row for e in eng.store.entries}
    expected[dtype] = {"hits": hits, "rows": rows, "removed": [Path(p).name for p in gone],
                       "fingerprint": eng.store.config.model_fingerprint}
(out / "expected.json").write_text(json.dumps(expected, indent=1))
print(subprocess.run(["git", "-C", "/work/main", "rev-parse", "HEAD"], capture_output=True, text=True).stdout)
