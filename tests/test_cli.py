"""The command line end to end: build-index -> query -> info, JSON output and exit codes."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from edje_search_cli.main import cli, register_commands

register_commands()


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_build_query_info(tmp_path, tiny_model_dir, shapes_dir):
    index = tmp_path / "idx"
    out = run("build-index", shapes_dir / "test", "--index", index, "--model", tiny_model_dir,
              "--workers", "0", "--no-progress", "--json")
    report = json.loads(out.stdout)
    assert report["added"] == 40 and report["images"] == 40
    out = run("query", "a small red circle left of a large blue square", "--index", index, "-k", "5",
              "--rerank-k", "10", "--json")
    hits = json.loads(out.stdout)[0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(h["rerank_score"] is not None and h["path"].endswith(".png") for h in hits)
    scores = [h["rerank_score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    human = run("query", "two blue squares", "--index", index, "-k", "3").stdout
    assert "rerank" in human and human.count(".png") == 3
    info = json.loads(run("info", "--index", index, "--json").stdout)
    assert info["images"] == 40 and info["factory"] == "Flat" and info["tokens_per_image"] == 4
    assert json.loads(run("verify", "--index", index, "--json").stdout)["ok"] is True
    again = json.loads(run("build-index", shapes_dir / "test", "--index", index, "--no-progress",
                           "--workers", "0", "--json").stdout)
    assert again["added"] == 0 and again["unchanged"] == 40


@pytest.mark.parametrize("args,needle", [
    (["query", "x", "--index", "{missing}"], "no index"),
    (["query", "", "--index", "{index}"], "empty query"),
    (["query", "cat", "--index", "{index}", "-k", "0"], "at least 1"),
    (["query", "cat", "--index", "{index}", "-k", "1000"], "holds only"),
    (["info", "--index", "{tmp}"], "not an edje-search index"),
    (["build-index", "{tmp}", "--index", "{tmp}/new", "--model", "no-such-model"], "neither a model directory"),
])
def test_errors_are_one_line_with_nonzero_exit(built_index, tmp_path, args, needle):
    args = [a.format(missing=tmp_path / "missing", index=built_index, tmp=tmp_path) for a in args]
    result = run(*args, ok=False)
    assert result.exit_code != 0
    assert needle in result.output
    assert "Traceback" not in result.output


def test_build_index_with_int8_tokens(tmp_path, tiny_model_dir, shapes_dir):
    index = tmp_path / "idx"
    run("build-index", shapes_dir / "test", "--index", index, "--model", tiny_model_dir, "--workers", "0",
        "--no-progress", "--token-precision", "int8")
    info = json.loads(run("info", "--index", index, "--json").stdout)
    assert info["token_dtype"] == "int8" and info["bytes_per_image"] == info["tokens_per_image"] * (
        info["token_width"] + 2)
    hits = json.loads(run("query", "two blue squares", "--index", index, "-k", "3", "--json").stdout)[0]["hits"]
    assert len(hits) == 3 and all(h["rerank_score"] is not None for h in hits)


def test_query_on_an_empty_index_says_so(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    run("build-index", tmp_path / "empty", "--index", tmp_path / "idx", "--model", tiny_model_dir, "--no-progress")
    result = run("query", "a cat", "--index", tmp_path / "idx", ok=False)
    assert result.exit_code != 0 and "is empty" in result.output and "Traceback" not in result.output


def test_models_lists_recipes():
    out = json.loads(run("models", "--json").stdout)
    assert {"tiny-random", "edje-demo"} <= {m["name"] for m in out}


def test_eval_end_to_end(tiny_model_dir, shapes_dir, tmp_path):
    out = tmp_path / "res.json"
    res = json.loads(run("eval", "--data", shapes_dir / "test.json", "--model", tiny_model_dir, "--rerank-k", "10",
                         "--out", out, "--json").stdout)
    assert json.loads(out.read_text())["rows"] == res["rows"]
    assert (res["n_images"], res["n_captions"]) == (40, 80)
    first, reranked = res["rows"]
    assert first["name"] == "first stage" and reranked["variant"] == "compressed"
    for direction in ("t2i", "i2t"):
        # reordering inside the top 10 cannot change whether the target is in the top 10
        assert reranked[direction]["R@10"] == first[direction]["R@10"]
        assert all(0 <= v <= 100 for v in reranked[direction].values())


def test_calibrate_writes_the_best_fusion_weight_and_eval_reports_it(tiny_model_dir, shapes_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = shapes_dir / "test.json"
    dry = json.loads(run("calibrate", "--data", data, "--model", model, "--weights", "0,1e6", "--dry-run",
                         "--json").stdout)
    assert [r["fusion_weight"] for r in dry["rows"]] == [0.0, 1e6] and not dry["written"]
    assert json.loads((model / "edje.json").read_text())["fusion_weight"] == 0.0
    # a single huge weight: the fused order is the first stage's order
    res = json.loads(run("calibrate", "--data", data, "--model", model, "--weights", "1e6", "--json").stdout)
    assert res["best"] == 1e6 and json.loads((model / "edje.json").read_text())["fusion_weight"] == 1e6
    rows = json.loads(run("eval", "--data", data, "--model", model, "--json").stdout)["rows"]
    first, alone, fused = rows
    assert alone["fusion_weight"] == 0.0 and fused["fusion_weight"] == 1e6 and "first stage" in fused["name"]
    assert fused["t2i"] == first["t2i"] and fused["i2t"] == first["i2t"]
    bad = run("calibrate", "--data", data, "--model", model, "--weights", "1,x", ok=False)
    assert bad.exit_code != 0 and "comma-separated" in bad.output
