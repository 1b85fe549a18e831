"""One writer at a time, nothing lost: concurrent writers of every kind, moved and copied
indexes, fingerprints that survive a re-save.

Writers run in real processes (spawned: fork after torch started its threads can hang): the lock is
an inter-process lock and only real processes can test it.
"""
from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest

from edje_search import EdjeError, Engine, IndexExists, IndexLocked, ModelMismatch
from edje_search.models.registry import build_tiny_model, load_model

# fork after torch has run its thread pool can hang; a fork server that imported the engine once
# (and ran nothing) forks clean writers in milliseconds
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["edje_search.engine", "edje_search.models.registry", "edje_search.pipeline"])


def _run(target, *args) -> CTX.Process:
    p = CTX.Process(target=target, args=args)
    p.start()
    return p


def _sync(index, folder, model_dir, wait):
    Engine.create_or_open(index, model=model_dir, lock_wait=wait).sync(folder, num_workers=0, progress=False,
                                                                       batch_size=8, commit_every=8)


def _add(index, files, wait):
    Engine.from_pretrained(index, writable=True, lock_wait=wait).add(files, num_workers=0, progress=False,
                                                                     batch_size=4, commit_every=4)


def _remove(index, files, wait):
    Engine.from_pretrained(index, writable=True, lock_wait=wait).remove(files)


def _join(*procs) -> None:
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, f"writer exited with {p.exitcode}"


@pytest.fixture
def two_folders(shapes_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    files = sorted((shapes_dir / "test").glob("*.png"))
    for folder, part in ((a, files[:20]), (b, files[20:])):
        folder.mkdir()
        for f in part:
            shutil.copy(f, folder / f.name)
    return a, b


def _paths(index) -> set[str]:
    engine = Engine.from_pretrained(index)
    assert engine.verify() == []
    return {e.path for e in engine.store.entries}


def test_two_builds_into_one_new_index_lose_nothing(tmp_path, tiny_model_dir, two_folders):
    """create+create and build+build: both succeed, one model/, every image of both folders."""
    a, b = two_folders
    index = tmp_path / "idx"
    _join(_run(_sync, index, a, tiny_model_dir, 60), _run(_sync, index, b, tiny_model_dir, 60))
    assert _paths(index) == {str(p) for p in [*a.glob("*.png"), *b.glob("*.png")]}


def test_build_and_add_together(tmp_path, tiny_model_dir, two_folders, built_index):
    a, b = two_folders
    extra = sorted(str(p) for p in b.glob("*.png"))[:4]
    _join(_run(_sync, built_index, a, tiny_model_dir, 60), _run(_add, built_index, extra, 60))
    got = _paths(built_index)
    assert set(extra) <= got and {str(p) for p in a.glob("*.png")} <= got
    engine = Engine.from_pretrained(built_index)  # each row holds its own file's vector
    rows = {e.path: e.row for e in engine.store.entries}
    alone = Engine.create(tmp_path / "alone", load_model(tiny_model_dir))
    alone.add(extra, num_workers=0, progress=False)
    ref = {e.path: e.row for e in alone.store.entries}
    np.testing.assert_allclose(engine.store.vectors([rows[p] for p in extra]),
                               alone.store.vectors([ref[p] for p in extra]), atol=1e-5)


def test_add_and_remove_together(tmp_path, tiny_model_dir, two_folders, built_index):
    a, b = two_folders
    before = _paths(built_index)
    gone = sorted(before)[:5]
    new = sorted(str(p) for p in a.glob("*.png"))
    _join(_run(_add, built_index, new, 60), _run(_remove, built_index, gone, 60))
    assert _paths(built_index) == (before - set(gone)) | set(new)


def test_a_second_writer_fails_at_once_naming_the_holder(built_index):
    holder = Engine.from_pretrained(built_index, writable=True)
    other = Engine.from_pretrained(built_index, writable=True)
    with holder.store.writing():
        with pytest.raises(IndexLocked, match=r"pid \d+.*--wait"):
            other.remove(["/nothing"])
    assert other.remove(["/nothing"]) == 0  # free again once the holder is done


def test_moved_and_copied_indexes_answer_the_same(built_index, tmp_path):
    before = Engine.from_pretrained(built_index).search("a red circle", k=5, rerank_k=10)
    copied = tmp_path / "copy"
    shutil.copytree(built_index, copied)
    moved = tmp_path / "moved" / "here"
    moved.parent.mkdir()
    built_index.rename(moved)
    for index in (copied, moved):
        engine = Engine.from_pretrained(index)
        assert engine.verify() == []
        hits = engine.search("a red circle", k=5, rerank_k=10)
        assert [(h.row, Path(h.path).name, round(h.score, 5)) for h in hits] == \
            [(h.row, Path(h.path).name, round(h.score, 5)) for h in before]


def test_resaving_a_model_keeps_its_fingerprint(tiny_model_dir, tmp_path):
    """The fingerprint hashes tensor names, dtypes, shapes and bytes: not file metadata, not the
    order tensors were written in (safetensors metadata order varied with PYTHONHASHSEED)."""
    from safetensors.torch import load_file, save_file

    model = load_model(tiny_model_dir)
    first = model.fingerprint()
    model.save_pretrained(tmp_path / "again")
    assert load_model(tmp_path / "again").fingerprint() == first
    for path in (tmp_path / "again").rglob("*.safetensors"):  # same tensors, other order and metadata
        tensors = load_file(path)
        save_file(dict(reversed(list(tensors.items()))), path, metadata={"written_by": "someone else"})
    from edje_search.models.info import tensor_fingerprint
    assert tensor_fingerprint(tmp_path / "again") == first
    some = next((tmp_path / "again").rglob("*.safetensors"))
    tensors = load_file(some)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1  # different weights: a different fingerprint
    save_file(tensors, some)
    assert tensor_fingerprint(tmp_path / "again") != first


def test_a_moved_model_is_found_again_with_model_and_remembered(tmp_path, tiny_model_dir, shapes_dir):
    model_dir = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    index = tmp_path / "idx"
    Engine.create(index, load_model(model_dir)).add(sorted(shapes_dir.glob("test/*.png"))[:4], num_workers=0,
                                                   progress=False)
    moved = tmp_path / "elsewhere"
    model_dir.rename(moved)
    with pytest.raises(EdjeError, match="gone"):
        Engine.from_pretrained(index)
    Engine.from_pretrained(index, model=moved, writable=True)  # a writer given the model records where it is
    assert Engine.from_pretrained(index).verify() == []
    # a model built in memory (a registered name) is accepted when it is the index's own model
    assert Engine.create_or_open(index, build_tiny_model(seed=0)).model.path == moved.resolve()
    with pytest.raises(ModelMismatch, match="another model"):
        Engine.create_or_open(index, build_tiny_model(seed=1))
    with pytest.raises(IndexExists):
        Engine.create(index, load_model(moved))
