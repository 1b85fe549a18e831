"""Finding 7 of the security review: no empty argument wipes an index.

`remove ''` (an unset shell variable) used to become the current folder and remove every image
under it. Empty and blank arguments are refused with exit 2 and the index untouched, and a
removal that would empty the index needs --all (or --yes); the library (Engine.remove) has the
same rules. Also: the folders recorded at indexing, which the server's file check reads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from edje_search import Engine
from edje_search.errors import BadInput
from edje_search.storage.roots import ROOTS_FILE, IndexedFolders, record_folders
from edje_search_cli.main import cli, register_commands

register_commands()


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def live_paths(index) -> set[str]:
    return {e.path for e in Engine.from_pretrained(index).store.entries}


@pytest.mark.parametrize("arg", ["", " ", "\t", "  \n"])
def test_remove_of_an_empty_or_blank_argument_exits_2_and_removes_nothing(built_index, shapes_dir, monkeypatch,
                                                                          arg):
    before = live_paths(built_index)
    generation = Engine.from_pretrained(built_index).generation
    # run from the collection's parent, where '' used to mean "everything under here"
    monkeypatch.chdir(shapes_dir)
    for argv in (["remove", arg], ["remove", str(shapes_dir / "test" / "nothing.png"), arg],
                 ["remove", arg, "--all"]):
        result = run(*argv, "--index", built_index)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: refusing an empty path argument") and result.output.count("\n") == 1
    after = Engine.from_pretrained(built_index)
    assert live_paths(built_index) == before and after.generation == generation


def test_removing_every_image_needs_all_or_yes(built_index, shapes_dir, monkeypatch):
    monkeypatch.chdir(shapes_dir / "test")
    refused = run("remove", ".", "--index", built_index)
    assert refused.exit_code == 2 and "every image in the index (40)" in refused.output and "--all" in refused.output
    assert len(live_paths(built_index)) == 40
    files = sorted(live_paths(built_index))
    part = json.loads(run("remove", *files[:3], "--index", built_index, "--json").stdout)  # part: no flag needed
    assert part == {"removed": 3, "images": 37}
    assert run("remove", *files[3:], "--index", built_index).exit_code == 2  # the rest, named one by one
    done = run("remove", ".", "--yes", "--index", built_index, "--json")
    assert done.exit_code == 0 and json.loads(done.stdout) == {"removed": 37, "images": 0}


def test_engine_remove_has_the_same_rules(built_index, shapes_dir):
    engine = Engine.from_pretrained(built_index, writable=True)
    for bad in ("", [""], [" "], ["\t"], [], [str(shapes_dir), "\x00"]):
        with pytest.raises(BadInput):
            engine.remove(bad)
    with pytest.raises(BadInput, match="every image"):
        engine.remove(shapes_dir / "test")
    assert len(engine.store) == 40
    one = sorted(e.path for e in engine.store.entries)[0]
    assert engine.remove(one) == 1  # a single path is one argument, not a string of characters
    assert engine.remove([str(shapes_dir / "test")], allow_all=True) == 39 and len(engine.store) == 0


def test_indexing_records_each_folder_where_it_really_is(tmp_path, built_index, shapes_dir):
    recorded = IndexedFolders(built_index)
    some = sorted(live_paths(built_index))[0]
    assert recorded.recorded_real_folder(some) == os.path.realpath(shapes_dir / "test")
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    os.symlink(real, link)
    assert record_folders(built_index, [str(link / "a.png"), str(link / "b.png")]) == 1
    assert recorded.recorded_real_folder(str(link / "c.png")) == str(real)  # re-read after the change
    assert record_folders(built_index, [str(link / "a.png")]) == 0  # nothing new: file left as it is
    assert IndexedFolders(tmp_path).recorded_real_folder(some) is None  # no record: the server's fallback
    (Path(built_index) / ROOTS_FILE).write_text("{not json")
    assert IndexedFolders(built_index).recorded_real_folder(some) is None
    # an index without the record (built before it existed) gets it from a build that changes nothing
    (Path(built_index) / ROOTS_FILE).unlink()
    report = Engine.from_pretrained(built_index, writable=True).sync(shapes_dir / "test", num_workers=0,
                                                                     progress=False)
    assert report.added == 0 and report.unchanged == 40
    assert IndexedFolders(built_index).recorded_real_folder(some) == os.path.realpath(shapes_dir / "test")
