"""Near-duplicate threshold on a trained model: recall of planted copies and the false-pair rate.

All test images go into a folder, and for some of them (``--originals``, chosen at random)
copies are planted beside them: resized to 0.75x and to 2x, recompressed as JPEG (quality 40),
and cropped to the central 90% of each side at a random offset. The folder is indexed with the
model (build-index's path, Engine.sync). For thresholds from 0.80 to 0.995 the script counts, from
the stored first-stage vectors:

* recall: planted (original, copy) pairs whose cosine is at or above the threshold, per kind of copy
  and overall;
* false pairs: pairs at or above it whose images come from different originals, as a share of all
  pairs reported, per 1,000 images, and among the unaltered test images alone.

The threshold chosen is the highest with overall recall >= ``--target``; `edje-search duplicates`
(storage/duplicates.find_duplicates, the FAISS range search) is then run at it on the same index
and its groups checked against the planted copies.

    python -m benchmarks.near_duplicates --model MODEL --data DATA/test.json \
        --out benchmarks/results/near_duplicates_demo.json
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.cutoff import publish
from edje_search import Engine, load_model
from edje_search.evaluation import load_eval_set
from edje_search.storage.duplicates import find_duplicates
from edje_search.storage.index_store import IndexStore

KINDS = ("resize_0.75x", "resize_2x", "jpeg_q40", "crop_90pct")


def plant(src: Path, dst_dir: Path, kind: str, rng: np.random.Generator) -> Path:
    img = Image.open(src).convert("RGB")
    w, h = img.size
    stem = src.stem
    if kind == "resize_0.75x":
        out = dst_dir / f"{stem}_small.png"
        img.resize((round(w * 0.75), round(h * 0.75)), Image.BICUBIC).save(out)
    elif kind == "resize_2x":
        out = dst_dir / f"{stem}_large.png"
        img.resize((w * 2, h * 2), Image.BICUBIC).save(out)
    elif kind == "jpeg_q40":
        out = dst_dir / f"{stem}_q40.jpg"
        img.save(out, "JPEG", quality=40)
    else:
        cw, ch = round(w * 0.9), round(h * 0.9)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = dst_dir / f"{stem}_crop.png"
        img.crop((x, y, x + cw, y + ch)).save(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="annotations whose images are used (BLIP-style JSON)")
    ap.add_argument("--originals", type=int, default=250, help="images that get planted copies")
    ap.add_argument("--target", type=float, default=0.95, help="recall the chosen threshold must reach")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    data = load_eval_set(a.data)
    work = Path(a.work or tempfile.mkdtemp(prefix="neardup-")).resolve()
    shutil.rmtree(work, ignore_errors=True)
    lib = work / "lib"
    lib.mkdir(parents=True)
    source: dict[str, str] = {}  # file -> the original it comes from
    kind_of: dict[str, str] = {}
    originals = []
    for p in data.images:
        dst = lib / Path(p).name
        shutil.copy(p, dst)
        source[str(dst)] = str(dst)
        originals.append(dst)
    for i in rng.choice(len(originals), a.originals, replace=False):
        for kind in KINDS:
            copy = plant(originals[i], lib, kind, rng)
            source[str(copy)], kind_of[str(copy)] = str(originals[i]), kind
    model = load_model(a.model).eval()
    engine = Engine.create(work / "idx", model, device="cpu")
    engine.sync(lib, progress=False, num_workers=1)
    by_path = {p: r for r, p in engine.paths(range(len(source) + 16)).items()}
    assert set(by_path) == set(source), "every file is indexed"
    rows = sorted(by_path.values())
    path_of = {r: p for p, r in by_path.items()}
    vecs = engine.vectors(rows)
    sims = vecs @ vecs.T
    iu = np.triu_indices(len(rows), 1)
    pair_sims = sims[iu]
    src = np.array([source[path_of[r]] for r in rows])
    same = src[iu[0]] == src[iu[1]]
    is_original = np.array([source[path_of[r]] == path_of[r] for r in rows])
    both_originals = is_original[iu[0]] & is_original[iu[1]]
    row_index = {r: i for i, r in enumerate(rows)}
    planted = {kind: [] for kind in KINDS}
    for copy, kind in kind_of.items():
        planted[kind].append(float(sims[row_index[by_path[copy]], row_index[by_path[source[copy]]]]))
    all_planted = np.array([s for v in planted.values() for s in v])
    sweep = []
    for t in np.round(np.arange(0.80, 0.9951, 0.005), 3):
        reported = pair_sims >= t
        false = int((reported & ~same).sum())
        sweep.append({"threshold": float(t), "recall": float(np.mean(all_planted >= t)),
                      "recall_by_kind": {k: float(np.mean(np.array(v) >= t)) for k, v in planted.items()},
                      "pairs_reported": int(reported.sum()), "false_pairs": false,
                      "false_pair_rate": false / int(reported.sum()) if reported.any() else 0.0,
                      "false_pairs_per_1000_images": 1000 * false / len(rows),
                      "false_pairs_between_originals": int((reported & both_originals).sum())})
    ok = [s for s in sweep if s["recall"] >= a.target]
    chosen = max(ok, key=lambda s: s["threshold"]) if ok else None
    check = None
    if chosen:
        found = find_duplicates(IndexStore.open(work / "idx"), chosen["threshold"])
        group_of = {p: gi for gi, g in enumerate(found["near"] + found["exact"]) for p in g.paths}
        together = [group_of.get(c) is not None and group_of.get(c) == group_of.get(source[c]) for c in kind_of]
        check = {"near_groups": len(found["near"]), "exact_groups": len(found["exact"]),
                 "planted_copies_grouped_with_their_original": float(np.mean(together)),
                 "groups_mixing_originals": sum(len({source[p] for p in g.paths}) > 1 for g in found["near"])}
    out = {"command": "python -m benchmarks.near_duplicates " + " ".join(sys.argv[1:]),
           "model": str(model.path), "images": len(rows), "originals_with_copies": a.originals,
           "planted_pairs": len(all_planted), "kinds": list(KINDS),
           "planted_similarity": {k: {"min": min(v), "p5": float(np.percentile(v, 5)), "median": float(np.median(v))}
                                  for k, v in planted.items()},
           "other_pairs_similarity": {"max": float(pair_sims[~same].max()),
                                      "p99_9": float(np.percentile(pair_sims[~same], 99.9))},
           "target_recall": a.target, "chosen": chosen, "find_duplicates_at_chosen": check, "sweep": sweep}
    publish(out, a.out, work if a.work is None else None)


if __name__ == "__main__":
    main()
