"""Joint scores beyond search: `score` (files or stored tokens, resumable, filtering), Reranker.rank,
Engine.score and `classify`, end to end on generated scenes with the tiny random model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edje_search import Engine, load_model
from edje_search.classify import ClassifySettings, classify, classify_rows
from edje_search.errors import BadInput
from edje_search.pipeline import embed_pixels
from edje_search.score_run import ResumableOutput, run_scoring
from edje_search.scoring import FileScorer, read_pairs, sigmoid
from edje_search_cli.main import cli, register_commands

register_commands()
ROOT = Path(__file__).resolve().parents[2]


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def assert_same_records(got: list[dict], expected: list[dict], atol: float = 1e-5) -> None:
    """Same pairs in the same order, scores equal up to float noise (batching differs)."""
    assert [(r["image"], r["caption"]) for r in got] == [(r["image"], r["caption"]) for r in expected]
    for key in ("logit", "prob", "cosine"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in expected], atol=atol)


def pixels_of(model, paths) -> torch.Tensor:
    return torch.stack([model.first_stage.preprocess(Image.open(p).convert("RGB")) for p in paths])


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def pairs_file(shapes_dir, tmp_path_factory) -> Path:
    """JSON Lines pairs over the test scenes: every caption of 10 images, with bad entries between
    them (malformed line, missing image, corrupt image, empty caption, no image key)."""
    d = tmp_path_factory.mktemp("pairs")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    entries = json.loads((shapes_dir / "test.json").read_text())[:10]
    lines = []
    for i, e in enumerate(entries):
        for c in e["caption"]:
            lines.append(json.dumps({"image": str(shapes_dir / e["image"]), "caption": c}))
        if i == 2:
            lines += ["{not json", json.dumps({"image": str(d / "missing.png"), "caption": "a red circle"}),
                      json.dumps({"image": "broken.png", "caption": "a blue square"}),
                      json.dumps({"image": str(shapes_dir / e["image"]), "caption": "  "}),
                      json.dumps({"caption": "no image"})]
    path = d / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rank_matches_score(model, shapes_dir):
    paths = sorted((shapes_dir / "test").glob("*.png"))[:6]
    pixels = pixels_of(model, paths)
    query = "a small red circle left of a large blue square"
    expected = model.reranker.score([query] * len(paths), pixel_values=pixels).numpy()
    ranked = model.reranker.rank(query, pixels)
    assert [r["corpus_id"] for r in ranked] == list(np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose([r["score"] for r in ranked], np.sort(expected)[::-1], atol=1e-5)
    tokens = model.embed_images(pixels)[1]
    assert model.reranker.rank(query, tokens, top_k=2) == ranked[:2]
    from_pil = model.reranker.rank(query, [Image.open(p) for p in paths], top_k=3)
    assert [r["corpus_id"] for r in from_pil] == [r["corpus_id"] for r in ranked[:3]]
    with pytest.raises(BadInput):
        model.reranker.rank(query, torch.zeros(2, 4, 7))


def test_score_file_equals_reranker_score(pairs_file, model, tmp_path):
    out = tmp_path / "scores.jsonl"
    result = run("score", pairs_file, "--model", model.path, "--out", out, "--workers", "0", "--chunk", "7",
                 "--batch-size", "4", "--no-progress")
    assert "skipped" in result.stderr
    records = read_jsonl(out)
    pairs = [p for p in read_pairs(pairs_file) if hasattr(p, "caption") and Path(p.path).is_file()
             and "broken" not in p.path]
    assert [(r["image"], r["caption"]) for r in records] == [(p.image, p.caption) for p in pairs]
    expected = model.reranker.score([p.caption for p in pairs], pixel_values=pixels_of(model, [p.path for p in pairs]))
    np.testing.assert_allclose([r["logit"] for r in records], expected.numpy(), atol=1e-5)
    np.testing.assert_allclose([r["prob"] for r in records], sigmoid(expected.numpy()), atol=1e-5)
    with torch.no_grad():
        vectors = model.embed_images(pixels_of(model, [p.path for p in pairs]))[0]
        text = model.embed_texts([p.caption for p in pairs])
    np.testing.assert_allclose([r["cosine"] for r in records], (vectors * text).sum(1).numpy(), atol=1e-5)
    skipped = read_jsonl(str(out) + ".skipped.jsonl")
    reasons = " | ".join(s["reason"] for s in skipped)
    assert len(skipped) == 5 and "invalid JSON" in reasons and "no 'image'" in reasons and "caption" in reasons
    assert {s["reason"] for s in skipped if "missing.png" in s["where"]} == {"image file missing"}
    assert any(s["where"] == "broken.png" for s in skipped)

    # the same pairs as a BLIP-style JSON list give the same records
    blip = tmp_path / "pairs.json"
    blip.write_text(json.dumps([json.loads(line) for line in pairs_file.read_text().splitlines()
                                if line.startswith("{\"image") and "missing" not in line and "broken" not in line
                                and "\"  \"" not in line]))
    report = json.loads(run("score", blip, "--model", model.path, "--out", tmp_path / "b.jsonl", "--workers", "0",
                            "--json", "--no-progress").stdout)
    assert report["scored"] == len(records) and report["skipped"] == 0 and report["finished"]
    assert_same_records(read_jsonl(tmp_path / "b.jsonl"), records)

    # filtering keeps exactly the pairs at or above the threshold
    cut = float(np.median([r["prob"] for r in records]))
    run("score", pairs_file, "--model", model.path, "--out", tmp_path / "kept.jsonl", "--workers", "0",
        "--chunk", "7", "--batch-size", "4", "--keep-min-prob", cut, "--no-progress")
    assert read_jsonl(tmp_path / "kept.jsonl") == [r for r in records if r["prob"] >= cut]


def _cli_subprocess(args, fault=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDJE_FAULT", None)
    if fault:
        env["EDJE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "edje_search_cli.main", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fault", ["score-before-state", "score-half-written"])
def test_killed_score_run_resumes_without_duplicates_or_gaps(pairs_file, model, tmp_path, fault):
    """Killed after a chunk's lines were written but before the state moved (or halfway through
    writing them), then re-run: the output equals an uninterrupted run's, line for line."""
    clean, out = tmp_path / "clean.jsonl", tmp_path / "out.jsonl"
    args = [pairs_file, "--model", model.path, "--workers", "0", "--chunk", "6", "--no-progress"]
    run("score", *args, "--out", clean)
    killed = _cli_subprocess(["score", *args, "--out", out], fault=fault)
    assert killed.returncode == 137, killed.stderr
    partial = json.loads(Path(str(out) + ".state.json").read_text())
    assert 0 < partial["report"]["done"] < 60 and out.stat().st_size > partial["bytes"]  # lines beyond the state
    resumed = _cli_subprocess(["score", *args, "--out", out, "--json"])
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["resumed_from"] == partial["report"]["done"] and report["finished"]
    assert out.read_bytes() == clean.read_bytes()
    assert Path(str(out) + ".skipped.jsonl").read_bytes() == Path(str(clean) + ".skipped.jsonl").read_bytes()


def test_interrupted_run_resumes_and_refuses_other_input(pairs_file, model, tmp_path):
    """An exception mid-run (in process) keeps what was committed; the same run carries on;
    other input or options for the same output are refused, and --overwrite starts again."""
    scorer = FileScorer(model, batch_size=4, num_workers=0)
    signature = {"input": str(pairs_file)}
    clean = tmp_path / "clean.jsonl"
    run_scoring(read_pairs(pairs_file), scorer, ResumableOutput(clean, signature), chunk_size=5, progress=False)

    calls = []

    class Failing:
        def score(self, pairs):
            calls.append(len(pairs))
            if len(calls) == 3:
                raise KeyboardInterrupt
            return scorer.score(pairs)

    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_scoring(read_pairs(pairs_file), Failing(), ResumableOutput(out, signature), chunk_size=5, progress=False)
    state = json.loads(Path(str(out) + ".state.json").read_text())
    assert state["report"]["done"] == 10  # two chunks of five items committed (6 pairs, 4 bad entries)
    assert read_jsonl(out) == read_jsonl(clean)[:6]
    report = run_scoring(read_pairs(pairs_file), scorer, ResumableOutput(out, signature), chunk_size=5,
                         progress=False)
    assert report.resumed_from == 10 and report.finished
    assert out.read_bytes() == clean.read_bytes()
    scorer.close()

    result = run("score", pairs_file, "--model", model.path, "--out", out, "--workers", "0", ok=False)
    assert result.exit_code == 2 and "other input or options" in result.output
    plain = tmp_path / "plain.jsonl"
    plain.write_text("{}\n")
    result = run("score", pairs_file, "--model", model.path, "--out", plain, "--workers", "0", ok=False)
    assert result.exit_code == 2 and "--overwrite" in result.output
    run("score", pairs_file, "--model", model.path, "--out", plain, "--workers", "0", "--overwrite", "--no-progress")
    assert len(read_jsonl(plain)) == len(read_jsonl(clean))


def test_index_scoring_matches_pixel_scoring(built_index, pairs_file, model, tmp_path):
    """--index scores the same pairs from stored fp16 tokens: equal to scoring the pixels within
    fp16 rounding; Engine.score agrees; unindexed images are skipped with a reason."""
    by_pixels, by_index = tmp_path / "pixels.jsonl", tmp_path / "index.jsonl"
    run("score", pairs_file, "--model", model.path, "--out", by_pixels, "--workers", "0", "--no-progress")
    run("score", pairs_file, "--index", built_index, "--out", by_index, "--no-progress")
    pixels, index = read_jsonl(by_pixels), read_jsonl(by_index)
    assert [(r["image"], r["caption"]) for r in index] == [(r["image"], r["caption"]) for r in pixels]
    logit_gap = np.abs(np.array([r["logit"] for r in index]) - [r["logit"] for r in pixels])
    assert logit_gap.max() < 1e-4, logit_gap.max()
    np.testing.assert_allclose([r["cosine"] for r in index], [r["cosine"] for r in pixels], atol=2e-3)
    skipped = read_jsonl(str(by_index) + ".skipped.jsonl")
    assert any(s["reason"] == "image is not in the index" for s in skipped)

    engine = Engine.from_pretrained(built_index)
    logits = engine.score([r["caption"] for r in index], [r["row"] for r in index])
    np.testing.assert_allclose(logits, [r["logit"] for r in index], atol=1e-5)
    with pytest.raises(BadInput, match="not in the index"):
        engine.score(["a red circle"], [10**6])
    with pytest.raises(BadInput, match="one row per text"):
        engine.score(["a", "b"], [0])


def test_index_rows_against_their_own_captions(tmp_path, model, shapes_dir):
    """Rows added with caption metadata are scored against those captions (no PAIRS file), or
    against --text; rows without a caption are reported."""
    entries = json.loads((shapes_dir / "test.json").read_text())[:6]
    paths = [str(shapes_dir / e["image"]) for e in entries]
    vectors, tokens = embed_pixels(model, pixels_of(model, paths))
    engine = Engine.create(tmp_path / "idx", model)
    meta = [{"caption": e["caption"][0]} for e in entries[:5]] + [{"source": "no caption"}]
    engine.add_embeddings(paths, vectors, tokens, metadata=meta)
    out = tmp_path / "own.jsonl"
    report = json.loads(run("score", "--index", tmp_path / "idx", "--out", out, "--json", "--no-progress").stdout)
    assert report["scored"] == 5 and report["skipped"] == 1
    records = read_jsonl(out)
    assert [r["caption"] for r in records] == [m["caption"] for m in meta[:5]]
    np.testing.assert_allclose([r["logit"] for r in records],
                               engine.score([m["caption"] for m in meta[:5]], [r["row"] for r in records]), atol=1e-5)
    bare = tmp_path / "bare.jsonl"
    run("score", "--index", tmp_path / "idx", "--out", bare, "--no-cosine", "--no-progress")
    assert all(r["cosine"] is None for r in read_jsonl(bare))
    assert [r["logit"] for r in read_jsonl(bare)] == [r["logit"] for r in records]
    texts = tmp_path / "texts.jsonl"
    run("score", "--index", tmp_path / "idx", "--out", texts, "--text", "a red circle", "--text", "two blue squares",
        "--no-progress")
    assert len(read_jsonl(texts)) == 12
    assert run("score", "--out", texts, ok=False).exit_code == 2


def test_classify_structure_and_consistency(built_index, shapes_dir, model):
    """Labels made of the scenes' own colours and shapes. With a random model accuracy means
    nothing; what must hold: the shortlist is the first stage's nearest labels, each logit is
    the joint encoder's score of the prompt with the image, probabilities follow the rules."""
    labels = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "triangle")]
    engine = Engine.from_pretrained(built_index)
    settings = ClassifySettings(template="there is {}", shortlist=4, top_k=4)
    results = list(classify_rows(engine.scorer(), labels, None, settings))
    assert len(results) == len(engine.store) == 40
    first = results[0]
    rows = [r["row"] for r in results[:5]]
    tokens = torch.from_numpy(engine.store.tokens.get(rows).astype(np.float32))
    for res, row, tok in zip(results[:5], rows, tokens):
        got = res["labels"]
        assert len(got) == 4 and abs(sum(x["prob"] for x in got) - 1) < 1e-4
        assert [x["logit"] for x in got] == sorted((x["logit"] for x in got), reverse=True)
        prompts = [f"there is {x['label']}" for x in got]
        expected = model.reranker.score(prompts, projected_tokens=tok[None].expand(4, -1, -1)).numpy()
        np.testing.assert_allclose([x["logit"] for x in got], expected, atol=1e-5)
        with torch.no_grad():
            cos = engine.store.vectors([row])[0] @ model.embed_texts([f"there is {x}" for x in labels]).numpy().T
        assert {x["label"] for x in got} == {labels[i] for i in np.argsort(-cos)[:4]}
        assert res["first_stage_label"] == labels[int(np.argmax(cos))]
    assert first["image"].endswith(".png")

    tags = classify(engine, labels, rows=rows, settings=ClassifySettings(shortlist=5, multi_label=True, min_prob=0.5))
    for res in tags:
        assert all(x["prob"] >= 0.5 and abs(x["prob"] - sigmoid(x["logit"])) < 1e-5 for x in res["labels"])

    # image files give the labels the index gives (fp16 tokens aside), through the CLI too
    files = [shapes_dir / "test" / f"{i:06d}.png" for i in range(3)]
    by_file = classify(model, labels, images=files, settings=settings)
    by_row = {r["image"]: r for r in results}
    for res in by_file:
        assert [x["label"] for x in res["labels"]] == [x["label"] for x in by_row[res["image"]]["labels"]]
    out = run("classify", *files, "--model", model.path, "--labels", ",".join(labels), "--template", "there is {}",
              "--shortlist", 4, "--top-k", 2, "--json", "--workers", "0", "--no-progress").stdout
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["labels"][:2] for x in by_file] == [x["labels"] for x in lines]
    label_file = shapes_dir.parent / "labels.txt"
    label_file.write_text("\n".join(labels) + "\n")
    text = run("classify", "--index", built_index, "--labels", label_file, "--no-progress").stdout
    assert text.count(".png: ") == 40
    assert run("classify", "--labels", "a,b", ok=False).exit_code == 2
    assert run("classify", "--index", built_index, "--labels", "a,a", ok=False).exit_code == 2
    assert run("classify", "--index", built_index, "--labels", "a", "--template", "no slot", ok=False).exit_code == 2


def test_classify_save_as_writes_labels_that_filters_find(built_index, model):
    labels = ["a red circle", "a blue square", "a green triangle"]
    engine = Engine.from_pretrained(built_index)
    want = {r["row"]: r["labels"][0] for r in classify_rows(engine.scorer(), labels, None,
                                                             ClassifySettings(template="there is {}", shortlist=3))}
    out = run("classify", "--index", built_index, "--labels", ",".join(labels), "--template", "there is {}",
              "--shortlist", 3, "--save-as", "kind", "--json", "--no-progress").stdout
    assert len(out.splitlines()) == 40
    again = Engine.from_pretrained(built_index)
    meta = {e.row: e.meta for e in again.store.entries}
    assert {r: (m["kind"], m["kind_prob"]) for r, m in meta.items()} == \
        {r: (x["label"], round(x["prob"], 4)) for r, x in want.items()}
    assert all("width" in m for m in meta.values())  # the fields collected at indexing stay
    top = max(set(x["label"] for x in want.values()), key=lambda lab: sum(x["label"] == lab for x in want.values()))
    hits = again.search("anything", k=40, rerank_k=0, where=f'kind = "{top}"')
    assert {h.row for h in hits} == {r for r, x in want.items() if x["label"] == top}
    tags = run("classify", "--index", built_index, "--labels", ",".join(labels), "--multi-label", "--min-prob", "0",
               "--save-as", "tags", "--no-progress")
    assert tags.exit_code == 0
    tagged = {e.row: e.meta["tags"] for e in Engine.from_pretrained(built_index).store.entries}
    assert all(set(t.split("; ")) <= set(labels) for t in tagged.values())
    assert run("classify", "--index", built_index, "--labels", "a,b", "--save-as", "2bad", ok=False).exit_code == 2
    assert run("classify", "x.png", "--model", model.path, "--labels", "a,b", "--save-as", "kind",
               ok=False).exit_code == 2


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_scored_and_filtered(shapes_dir, model, tmp_path):
    """Shards in, scores equal to the pixels' Reranker.score; --keep-shards writes valid shards
    holding exactly the kept samples, every member's bytes unchanged; bad samples reported."""
    import tarfile

    from edje_search.distributed.sources import iter_shard

    entries = json.loads((shapes_dir / "test.json").read_text())[:12]
    shards = tmp_path / "shards"
    shards.mkdir()
    originals = {}
    for s in range(2):
        samples = []
        for i, e in enumerate(entries[s * 6:(s + 1) * 6]):
            key = f"{s:02d}{i:04d}"
            members = {"png": (shapes_dir / e["image"]).read_bytes(), "txt": e["caption"][0].encode(),
                       "json": json.dumps({"id": key}).encode()}
            if s == 1 and i == 2:
                members.pop("txt")  # no caption
            if s == 1 and i == 4:
                members["png"] = b"\x89PNG broken"
            samples.append((key, members))
            originals[(f"{s:02d}.tar", key)] = members
        _write_shard(shards / f"{s:02d}.tar", samples)
    out, kept_dir = tmp_path / "scores.jsonl", tmp_path / "kept"
    all_scores = tmp_path / "all.jsonl"
    run("score", shards, "--model", model.path, "--out", all_scores, "--batch-size", 4, "--no-progress")
    records = read_jsonl(all_scores)
    assert len(records) == 10 and all("#" in r["image"] for r in records)
    skipped = read_jsonl(str(all_scores) + ".skipped.jsonl")
    assert len(skipped) == 2 and "no caption" in skipped[0]["reason"] and "not a readable image" in skipped[1]["reason"]
    by_key = {(Path(r["image"].split("#")[0]).name, r["image"].split("#")[1].split(".")[0]): r for r in records}
    keys = sorted(by_key)
    pixels = torch.stack([model.first_stage.preprocess(Image.open(__import__("io").BytesIO(
        originals[k]["png"])).convert("RGB")) for k in keys])
    expected = model.reranker.score([by_key[k]["caption"] for k in keys], pixel_values=pixels).numpy()
    np.testing.assert_allclose([by_key[k]["logit"] for k in keys], expected, atol=1e-5)

    cut = float(np.median([r["prob"] for r in records]))
    report = json.loads(run("score", shards, "--model", model.path, "--out", out, "--keep-min-prob", cut,
                            "--keep-shards", kept_dir, "--json", "--no-progress").stdout)
    kept = {k for k in keys if by_key[k]["prob"] >= cut}
    assert 0 < len(kept) < 10 and report["kept_shards"]["samples_kept"] == len(kept)
    found = set()
    for shard in sorted(kept_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                assert tar.extractfile(member).read() == originals[(shard.name, key)][ext]
                assert member.mtime == 1_700_000_000
                found.add((shard.name, key))
        assert all(not s.error for s in iter_shard(str(shard)))
    assert found == kept
    assert run("score", shards, "--model", model.path, "--out", tmp_path / "x.jsonl", "--keep-shards", kept_dir,
               ok=False).exit_code == 2


def test_hard_mismatches_change_only_binding_or_relation(shapes_dir):
    """The quality benchmark's hard negatives: the same words, with the relation reversed or the
    two objects' colours exchanged, and never the scene's own other caption."""
    import random

    from benchmarks.score_quality import PHRASE, hard_mismatch, mismatched_pairs

    entries = json.loads((shapes_dir / "test.json").read_text())
    rng = random.Random(0)
    changed = 0
    for e in entries:
        caption = e["caption"][0]
        swapped = hard_mismatch(caption, rng)
        if swapped is None:
            continue
        changed += 1
        assert swapped != caption and swapped not in e["caption"]
        before, after = caption.split(), swapped.split()
        assert len(before) == len(after)
        diff = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        if len(diff) == 1:  # a relation reversed
            assert {before[diff[0]], after[diff[0]]} in ({"left", "right"}, {"above", "below"})
        else:  # two colours exchanged
            assert len(diff) == 2 and before[diff[0]] == after[diff[1]] and before[diff[1]] == after[diff[0]]
        colours = [m.group(3) for m in PHRASE.finditer(caption)]
        assert sorted(m.group(3) for m in PHRASE.finditer(swapped)) == sorted(colours)
    assert changed > len(entries) // 2
    pairs, labels, kinds = mismatched_pairs(entries, shapes_dir, seed=0)
    assert len(pairs) == len(entries) and set(kinds) <= {"match", "hard", "random"}
    assert all(labels[i] == (kinds[i] == "match") for i in range(len(kinds)))
    assert all(p["caption"] == e["caption"][0] for p, e, k in zip(pairs, entries, kinds) if k == "match")


def test_quality_benchmark_runs_end_to_end(shapes_dir, tiny_model_dir, tmp_path):
    """The filtering and zero-shot benchmark on the generated splits (a random model: the figures
    mean nothing; their bookkeeping must add up)."""
    from benchmarks.score_quality import main

    res = main(["--model", str(tiny_model_dir), "--data", str(shapes_dir), "--out", str(tmp_path / "q.json"),
                "--shortlist", "4"])
    assert json.loads((tmp_path / "q.json").read_text()) == res
    for name in ("joint_prob", "first_stage_cosine"):
        f = res["filtering"][name]
        counts = f["test_counts"]
        assert sum(counts.values()) == f["all"]["pairs"] == 40
        assert f["matches_and_hard"]["pairs"] == counts["match"] + counts["hard"]
        assert 0 <= f["hard_mismatches_kept"] <= counts["hard"] and 0 <= f["all"]["precision"] <= 1
        assert 0 <= f["auroc_match_vs_hard"] <= 1 and 0 <= f["auroc_match_vs_random"] <= 1
    one, two = res["zero_shot"]["one_object"], res["zero_shot"]["two_objects"]
    assert one["images"] == 40 and one["labels"] == 32 and two["labels"] == 32 * 31 // 2
    assert 0 < two["images"] <= 40  # scenes of two distinct objects only
    for z in (one, two):
        assert 0 <= z["joint_top1_accuracy"] <= 1 and 0 <= z["first_stage_top1_accuracy"] <= 1


def test_docs_python_block_runs(docs_workspace, capsys):
    """docs/scoring.md's library example, as written, with the tiny model standing in for edje-demo."""
    import re

    block = re.findall(r"^```python\n(.*?)^```$", (ROOT / "docs" / "scoring.md").read_text(), flags=re.S | re.M)
    assert len(block) == 1
    docs_workspace(5)
    ns: dict = {}
    exec(block[0], ns)  # noqa: S102 - the page's own code
    ranked = ns["ranked"]
    assert len(ranked) == 3 and [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    assert capsys.readouterr().out.startswith("[{'corpus_id'")
    assert ns["logits"].shape == (2,)
    assert [r["row"] for r in ns["by_row"]] == [0, 1] and len(ns["by_file"]) == 2
    assert all(len(r["labels"]) == 2 for r in ns["by_row"] + ns["by_file"])
