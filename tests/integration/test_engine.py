"""Two-stage search against oracles, incremental maintenance and model checks."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch

from edje_search import Engine, ModelMismatch, load_model
from edje_search.models.registry import build_tiny_model
from edje_search.ranking import score_rows

QUERIES = ["a small red circle left of a large blue square", "two small green triangles and a small white diamond"]


def test_rerank_everything_equals_brute_force(built_index):
    # exact equality is an fp32 property: on a GPU the engine scores under bf16 autocast (the
    # other engine tests run there as they are: benchmarks/results/gpu_pytest.txt)
    engine = Engine.from_pretrained(built_index, device="cpu")
    n = len(engine.store)
    for q in QUERIES:
        hits = engine.search(q, k=n, rerank_k=n)
        rows = [e.row for e in engine.store.entries]
        with torch.inference_mode():  # every live row scored through the engine's pool scorer
            brute = score_rows(engine.model.reranker, engine.store.tokens.read, [q], np.array([rows]), 64)[0]
        # reference: score every image independently, one pair at a time
        with torch.no_grad():
            tok = torch.from_numpy(engine.store.tokens.get(rows).astype(np.float32))
            ref = np.array([engine.model.reranker.score([q], projected_tokens=tok[i:i + 1]).item()
                            for i in range(len(rows))])
        np.testing.assert_allclose(brute, ref, rtol=1e-4, atol=1e-5)
        expected = [rows[i] for i in np.argsort(-ref, kind="stable")]
        got = [h.row for h in hits]
        assert sorted(got) == sorted(rows)
        np.testing.assert_allclose([h.rerank_score for h in hits], np.sort(ref)[::-1], rtol=1e-4, atol=1e-5)
        # same order up to numerically tied scores
        assert [ref[rows.index(r)] for r in got] == pytest.approx([ref[rows.index(r)] for r in expected], abs=1e-5)


def test_no_rerank_equals_first_stage_exact_knn(built_index):
    engine = Engine.from_pretrained(built_index, device="cpu")  # fp32 query embedding, as the reference
    hits = engine.search(QUERIES[0], k=10, rerank_k=0)
    q = engine.model.embed_texts([QUERIES[0]]).cpu().numpy()[0]
    rows = [e.row for e in engine.store.entries]
    sims = engine.store.vectors(rows) @ q
    expected = [rows[i] for i in np.argsort(-sims)[:10]]
    assert [h.row for h in hits] == expected
    assert all(h.rerank_score is None for h in hits)
    assert [h.rank for h in hits] == list(range(1, 11))


def test_reranked_head_then_first_stage_tail(built_index):
    engine = Engine.from_pretrained(built_index)
    plain = engine.search(QUERIES[1], k=12, rerank_k=0)
    hits = engine.search(QUERIES[1], k=12, rerank_k=5)
    assert {h.row for h in hits[:5]} == {h.row for h in plain[:5]}
    assert [h.row for h in hits[5:]] == [h.row for h in plain[5:]]
    scores = [h.rerank_score for h in hits[:5]]
    assert scores == sorted(scores, reverse=True)


def test_search_reports_stage_timings(built_index):
    engine = Engine.from_pretrained(built_index)
    engine.search(QUERIES[0], k=5, rerank_k=10)
    t = engine.last_timings
    assert list(t) == ["text_embed", "faiss", "gather", "rerank", "merge", "total"]
    assert all(v >= 0 for v in t.values()) and t["total"] == pytest.approx(sum(v for s, v in t.items() if s != "total"))
    engine.search(QUERIES[0], k=5, rerank_k=0)
    assert "rerank" not in engine.last_timings


def test_batch_search_equals_single_queries(built_index):
    engine = Engine.from_pretrained(built_index)
    batch = engine.search_batch(QUERIES, k=8, rerank_k=15, batch_size=7)
    for q, hits in zip(QUERIES, batch):
        single = engine.search(q, k=8, rerank_k=15)
        assert [h.row for h in hits] == [h.row for h in single]
        np.testing.assert_allclose([h.rerank_score for h in hits], [h.rerank_score for h in single], atol=1e-5)


def test_batch_search_groups_pairs_of_similar_caption_length(built_index, monkeypatch):
    engine = Engine.from_pretrained(built_index)
    reranker = engine.model.reranker
    long_q, short_q = QUERIES[0], "a cat"
    batches = []
    inner = reranker._score_encoded
    monkeypatch.setattr(reranker, "_score_encoded", lambda batch, tokens: batches.append(batch["input_ids"])
                        or inner(batch, tokens))
    engine.search_batch([long_q, short_q, QUERIES[1]], k=5, rerank_k=10, batch_size=8)
    # in query order batches would be [8 long], [2 long + 6 short], ...; sorted by length the
    # short query's pairs come first and fill a batch of their own, cut to the short caption's length
    short_ids = reranker.encode_text([short_q], reranker.config.tokens_per_image)["input_ids"][0]
    assert batches[0].shape == (8, len(short_ids))
    assert (batches[0] == short_ids).all()
    assert sum(len(b) for b in batches) == 30


def test_fusion_weight_adds_first_stage_similarity_to_the_ranking_score(built_index):
    engine = Engine.from_pretrained(built_index)
    alone = engine.search(QUERIES[0], k=10, rerank_k=10)
    assert all(h.score == h.rerank_score for h in alone)
    assert engine.info()["fusion_weight"] == 0.0
    engine.model.fusion_weight = 1e6  # first-stage similarity dominates: back to first-stage order
    assert engine.info()["fusion_weight"] == 1e6
    fused = engine.search(QUERIES[0], k=10, rerank_k=10)
    plain = engine.search(QUERIES[0], k=10, rerank_k=0)
    assert [h.row for h in fused] == [h.row for h in plain]
    for h in fused:
        assert h.score == pytest.approx(h.rerank_score + 1e6 * h.first_stage_score)


def test_bad_queries_raise(built_index):
    engine = Engine.from_pretrained(built_index)
    with pytest.raises(ValueError, match="empty"):
        engine.search("   ")
    with pytest.raises(ValueError, match="too long"):
        engine.search("x" * 5000)
    with pytest.raises(ValueError, match="k must be"):
        engine.search("a cat", k=0)


def test_other_model_is_rejected(built_index, tmp_path):
    other = build_tiny_model(seed=9)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ModelMismatch):
        Engine.from_pretrained(built_index, model=load_model(tmp_path / "other"))


def test_sync_adds_new_and_drops_deleted(built_index, shapes_dir, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(shapes_dir / "val", folder)
    engine = Engine.from_pretrained(built_index, writable=True)
    before = len(engine.store)
    report = engine.sync(folder, num_workers=0, progress=False)
    assert report.added == 8 and len(engine.store) == before + 8
    (folder / "000003.png").unlink()
    report = engine.sync(folder, num_workers=0, progress=False)
    assert (report.added, report.removed, report.unchanged) == (0, 1, 7)
    reopened = Engine.from_pretrained(built_index)
    assert len(reopened.store) == before + 7
    assert str(folder / "000003.png") not in {e.path for e in reopened.store.entries}
    assert reopened.verify() == []
    _, rows = reopened.store.search(reopened.store.vectors([0]), before + 8)
    assert (rows[0] >= 0).sum() == before + 7  # FAISS answers with live rows only


def test_unreadable_files_are_skipped_with_reason(built_index, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    engine = Engine.from_pretrained(built_index, writable=True)
    report = engine.sync(folder, num_workers=0, progress=False)
    reasons = dict(report.skipped)
    assert report.added == 0 and set(reasons) == {str(folder / "empty.png"), str(folder / "text.jpg")}
    assert "empty" in reasons[str(folder / "empty.png")]


def test_sync_re_embeds_changed_files(built_index, shapes_dir, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(shapes_dir / "val", folder)
    engine = Engine.from_pretrained(built_index, writable=True)
    engine.sync(folder, num_workers=0, progress=False)
    target = folder / "000001.png"
    old = {e.path: e for e in engine.store.entries}[str(target)]
    shutil.copyfile(shapes_dir / "test" / "000005.png", target)  # new content under the same name
    report = engine.sync(folder, num_workers=0, progress=False)
    assert (report.added, report.removed, report.unchanged) == (1, 0, 7)
    new = {e.path: e for e in engine.store.entries}[str(target)]
    assert new.sha256 != old.sha256 and new.row != old.row
    assert engine.store.verify() == []


def test_reader_during_writes_sees_whole_generations(built_index, shapes_dir, tmp_path):
    import threading

    folder = tmp_path / "more"
    shutil.copytree(shapes_dir / "train", folder)
    reader = Engine.from_pretrained(built_index)
    writer = Engine.from_pretrained(built_index, writable=True)
    sizes_seen, errors = set(), []
    stop = threading.Event()

    def read_loop():
        while not stop.is_set():
            try:
                reader.refresh()
                store = reader.store
                live = {e.path for e in store.entries}
                hits = reader.search("a small red circle", k=5, rerank_k=5)
                assert {h.path for h in hits} <= live
                assert len(store) == len(live)
                sizes_seen.add(len(live))
            except Exception as e:  # noqa: BLE001 - collected and re-raised in the test thread
                errors.append(e)
                return

    t = threading.Thread(target=read_loop)
    t.start()
    files = sorted(str(p) for p in folder.glob("*.png"))
    deadline = time.monotonic() + 30
    while 40 not in sizes_seen and not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(0, len(files), 8):  # one commit per call; wait until the reader has seen it
        writer.add(files[i:i + 8], num_workers=0, progress=False, commit_every=8, batch_size=8, optimize=False)
        deadline = time.monotonic() + 30
        while 40 + i + 8 not in sizes_seen and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
    stop.set()
    t.join()
    assert not errors, errors[0]
    reader.refresh()
    assert len(reader.store) == 40 + 48
    assert sizes_seen == {40 + 8 * i for i in range(7)}  # every generation seen, each one whole


def test_non_utf8_query_is_rejected(built_index):
    engine = Engine.from_pretrained(built_index)
    with pytest.raises(ValueError, match="UTF-8"):
        engine.search("caf\udce9")


def test_duplicate_content_is_not_embedded_again(built_index, shapes_dir, tmp_path):
    folder = tmp_path / "copies"
    folder.mkdir()
    for name in ("000000.png", "000001.png"):
        shutil.copyfile(shapes_dir / "test" / name, folder / f"copy-{name}")
    engine = Engine.from_pretrained(built_index, writable=True)
    report = engine.add(sorted(str(p) for p in folder.iterdir()), num_workers=0, progress=False)
    assert (report.added, report.duplicates) == (2, 2)
    by_path = {e.path: e.row for e in engine.store.entries}
    src, dup = by_path[str(shapes_dir / "test" / "000001.png")], by_path[str(folder / "copy-000001.png")]
    assert np.array_equal(engine.store.tokens.get([src]), engine.store.tokens.get([dup]))
    assert engine.store.verify() == []


def test_sync_streams_in_chunks(built_index, shapes_dir, tmp_path):
    folder = tmp_path / "stream"
    shutil.copytree(shapes_dir / "val", folder)
    engine = Engine.from_pretrained(built_index, writable=True)
    report = engine.sync(folder, chunk_files=3, num_workers=0, progress=False)
    assert report.added == 8
    (folder / "000000.png").unlink()
    report = engine.sync(folder, chunk_files=3, num_workers=0, progress=False)
    assert (report.added, report.removed, report.unchanged) == (0, 1, 7)
    assert engine.store.verify() == []


def test_int8_token_index_reranks_like_the_float16_index(built_index, shapes_dir, tmp_path):
    fp16 = Engine.from_pretrained(built_index)
    int8 = Engine.create(tmp_path / "int8", fp16.model, token_dtype="int8")
    int8.sync(shapes_dir / "test", num_workers=0, progress=False, batch_size=16)
    assert int8.info()["bytes_per_image"] == fp16.model.reranker.config.tokens_per_image * (
        fp16.model.reranker.token_width + 2)
    reopened = Engine.from_pretrained(tmp_path / "int8")
    assert reopened.store.verify() == []
    for q in QUERIES:
        a = {h.path: h.rerank_score for h in fp16.search(q, k=10, rerank_k=10)}
        b = {h.path: h.rerank_score for h in reopened.search(q, k=10, rerank_k=10)}
        assert a.keys() == b.keys()  # same first-stage candidates (vectors are stored in float32)
        np.testing.assert_allclose([b[p] for p in a], list(a.values()), atol=0.05)
