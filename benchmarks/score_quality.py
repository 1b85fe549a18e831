"""How well joint scores filter pairs and label images, against the first stage alone.

Needs a trained model and the generated "shapes" splits it was trained for (`make demo` writes
both), e.g.::

    python -m benchmarks.score_quality --model runs/home/models/edje-demo --data runs/demo/data

Filtering: on the val and test images, each image keeps its first caption, except 20% whose
caption becomes a hard mismatch (the caption of the scene with its relation reversed or with the
two objects' colours swapped) and 20% whose caption is another image's. A pair is kept when its
score reaches a threshold chosen on val (best F1) for the joint probability and for the cosine;
precision and recall on test are reported over all pairs and per kind of mismatch, with the AUROC
of each score for matches against each kind of mismatch (no threshold).

Zero-shot: labels "a {colour} {shape}" (every combination; right when the label names one of the
scene's objects) and "a {colour} {shape} and a {colour} {shape}" (every pair; right when it names
both of the scene's objects, which only a score that binds colour to shape can tell from the
same words bound the other way); the joint encoder (first-stage shortlist) against the first
stage's nearest label.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.cutoff import auroc
from edje_search.data.synthetic import COLORS, RELATIONS, SHAPES, SIZES

RESULTS = Path(__file__).parent / "results" / "score_quality.json"
PHRASE = re.compile(rf"\b(a|one|two|three) ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})s?\b")
RELATION = re.compile(rf" ({'|'.join(sorted(RELATIONS, key=len, reverse=True))}) ")


def hard_mismatch(caption: str, rng: random.Random) -> str | None:
    """The caption of a scene that differs only in binding or relation, or None if none differs."""
    objects = list(PHRASE.finditer(caption))
    options = []
    rel = RELATION.search(caption)
    if rel:
        options.append(caption[:rel.start(1)] + RELATIONS[rel.group(1)] + caption[rel.end(1):])
    if len(objects) == 2 and objects[0].group(3) != objects[1].group(3):
        a, b = objects
        swapped = (caption[:a.start(3)] + b.group(3) + caption[a.end(3):b.start(3)] + a.group(3)
                   + caption[b.end(3):])
        options.append(swapped)
    return rng.choice(options) if options else None


def mismatched_pairs(entries: list[dict], root: Path, seed: int) -> tuple[list[dict], np.ndarray, list[str]]:
    """Pairs (image, caption), whether each matches, and its kind (match, hard, random)."""
    rng = random.Random(seed)
    pairs, labels, kinds = [], [], []
    for i, e in enumerate(entries):
        caption, kind = e["caption"][0], "match"
        draw = rng.random()
        if draw < 0.2:
            swapped = hard_mismatch(caption, rng)
            if swapped is not None:
                caption, kind = swapped, "hard"
        elif draw < 0.4:
            other = rng.randrange(len(entries) - 1)
            caption, kind = entries[other + (other >= i)]["caption"][0], "random"
        pairs.append({"image": str(root / e["image"]), "caption": caption})
        labels.append(kind == "match")
        kinds.append(kind)
    return pairs, np.array(labels), kinds


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The keep-threshold with the best F1 on (scores, labels). A sweep over the sorted scores
    (no metrics library is among the dependencies)."""
    order = np.argsort(-scores)
    tp = np.cumsum(labels[order])
    kept = np.arange(1, len(scores) + 1)
    f1 = 2 * tp / (kept + labels.sum())
    return float(scores[order][int(np.argmax(f1))])


def precision_recall(keep: np.ndarray, labels: np.ndarray) -> dict:
    tp = int((keep & labels).sum())
    return {"precision": tp / max(int(keep.sum()), 1), "recall": tp / max(int(labels.sum()), 1),
            "kept": int(keep.sum()), "pairs": int(len(labels))}


def score_split(model, pairs: list[dict], work: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    from edje_search.score_run import ResumableOutput, run_scoring
    from edje_search.scoring import FileScorer, read_pairs

    src = work / f"{name}.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = work / f"{name}_scores.jsonl"
    scorer = FileScorer(model, batch_size=32, num_workers=1)
    try:
        run_scoring(read_pairs(src), scorer, ResumableOutput(out, {}, overwrite=True), progress=False)
    finally:
        scorer.close()
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == len(pairs), "every generated pair must be scored"
    return np.array([r["prob"] for r in records]), np.array([r["cosine"] for r in records])


def filtering(model, data: Path, work: Path, seed: int) -> dict:
    splits = {}
    for split in ("val", "test"):
        entries = json.loads((data / f"{split}.json").read_text())
        pairs, labels, kinds = mismatched_pairs(entries, data, seed)
        splits[split] = (*score_split(model, pairs, work, split), labels, np.array(kinds))
    out = {}
    for name, col in (("joint_prob", 0), ("first_stage_cosine", 1)):
        threshold = best_f1_threshold(splits["val"][col], splits["val"][2])
        scores, labels, kinds = splits["test"][col], splits["test"][2], splits["test"][3]
        keep = scores >= threshold
        out[name] = {"threshold_from_val": threshold, "all": precision_recall(keep, labels)}
        for kind in ("hard", "random"):
            sub = (kinds == "match") | (kinds == kind)
            out[name][f"matches_and_{kind}"] = precision_recall(keep[sub], labels[sub])
            # threshold-free: how often a match outscores a mismatch of this kind
            out[name][f"auroc_match_vs_{kind}"] = auroc(scores[sub], labels[sub])
            out[name][f"{kind}_mismatches_kept"] = int((keep & (kinds == kind)).sum())
        out[name]["test_counts"] = {k: int((kinds == k).sum()) for k in ("match", "hard", "random")}
    return out


def zero_shot(model, data: Path, shortlist: int) -> dict:
    """Top-1 accuracy with one-object labels "a {colour} {shape}" (right when it names one of the
    scene's objects) and two-object labels "a {colour} {shape} and a {colour} {shape}" (right when
    it names exactly the scene's two objects, in either order; scenes of two distinct objects)."""
    from edje_search.classify import ClassifySettings, classify_files

    entries = json.loads((data / "test.json").read_text())
    objects = {str(data / e["image"]): {(m.group(3), m.group(4)) for m in PHRASE.finditer(e["caption"][0])}
               for e in entries}
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    one = {f"a {c} {s}": {(c, s)} for c, s in kinds}
    two = {f"a {a[0]} {a[1]} and a {b[0]} {b[1]}": {a, b} for i, a in enumerate(kinds) for b in kinds[i + 1:]}
    out = {"shortlist": shortlist}
    for name, labels, images, right in (
            ("one_object", one, list(objects), lambda got, truth: got <= truth),
            ("two_objects", two, [k for k, v in objects.items() if len(v) == 2], lambda got, truth: got == truth)):
        results = list(classify_files(model, list(labels), images, ClassifySettings(shortlist=shortlist, top_k=1),
                                      num_workers=1))
        joint = np.mean([right(labels[r["labels"][0]["label"]], objects[r["image"]]) for r in results])
        first = np.mean([right(labels[r["first_stage_label"]], objects[r["image"]]) for r in results])
        out[name] = {"labels": len(labels), "images": len(results), "joint_top1_accuracy": float(joint),
                     "first_stage_top1_accuracy": float(first)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained model directory")
    ap.add_argument("--data", type=Path, required=True, help="make-dataset output (val.json, test.json; shapes style)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shortlist", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from edje_search import load_model

    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        res = {"model": str(args.model), "data": str(args.data), "filtering": filtering(model, args.data, Path(tmp),
                                                                                        args.seed),
               "zero_shot": zero_shot(model, args.data, args.shortlist)}
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
