"""The command line end to end: build-index -> query -> info, JSON output and exit codes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import click
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
    assert info["images"] == 40 and info["factory"] == "auto" and info["recipe"] == "Flat"
    assert info["tokens_per_image"] == 4 and info["model_name"] and info["fusion_weight"] == 0.0
    assert json.loads(run("verify", "--index", index, "--json").stdout)["ok"] is True
    again = json.loads(run("build-index", shapes_dir / "test", "--index", index, "--no-progress",
                           "--workers", "0", "--json").stdout)
    assert again["added"] == 0 and again["unchanged"] == 40


@pytest.mark.parametrize("args,needle", [
    (["query", "x", "--index", "{missing}"], "no index"),
    (["query", "", "--index", "{index}"], "empty query"),
    (["query", "cat", "--index", "{index}", "-k", "0"], "at least 1"),
    (["query", "cat", "--index", "{index}", "--rerank-k", "-1"], "0 or more"),
    (["query", "cat", "--index", "{index}", "-k", "ten"], "not a valid integer"),
    (["query", "cat", "--index", "{index}", "--rerank-k", "0", "--min-prob", "0.5"], "--rerank-k must be at least 1"),
    (["query", "--index", "{index}"], "Missing argument"),
    (["frobnicate"], "No such command"),
    (["add", "{tmp}/notes.txt", "--index", "{index}"], "not an image file name"),
    (["remove", "{tmp}/elsewhere", "--index", "{index}"], "nothing in the index"),
    (["repair", "--index", "{missing}"], "no index"),
    (["info", "--index", "{tmp}"], "not an edje-search index"),
    (["build-index", "{tmp}", "--index", "{tmp}/new", "--model", "no-such-model"], "neither a model directory"),
])
def test_errors_are_one_line_with_nonzero_exit(built_index, tmp_path, args, needle):
    (tmp_path / "notes.txt").write_text("not a picture")
    args = [a.format(missing=tmp_path / "missing", index=built_index, tmp=tmp_path) for a in args]
    result = run(*args, ok=False)
    assert result.exit_code != 0
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_reader_closing_the_pipe_ends_a_command_quietly():
    """`edje-search query ... | head -1`: the rest of the output has nowhere to go; no error line."""
    script = "\n".join([
        "import click",
        "from edje_search_cli.common import FriendlyGroup",
        "@click.group(cls=FriendlyGroup)",
        "def group(): pass",
        "@group.command()",
        "def flood():",
        "    for _ in range(100000): click.echo('x' * 100)",
        "group(['flood'])"])
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(10) == b"x" * 10
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141 and err == b"", err
    # a pipe other than the output breaking is an error like any other
    other = script.replace("    for _ in range(100000): click.echo('x' * 100)",
                           "    raise BrokenPipeError(32, 'Broken pipe (a socket)')")
    p = subprocess.run([sys.executable, "-c", other], capture_output=True, timeout=60)
    assert p.returncode == 1 and p.stderr.decode().startswith("error: ") and "socket" in p.stderr.decode()


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


def test_k_larger_than_the_index_returns_every_image_with_a_note(built_index):
    result = run("query", "a red circle", "--index", built_index, "-k", "1000", "--rerank-k", "5", "--json")
    hits = json.loads(result.stdout)[0]["hits"]
    assert [h["rank"] for h in hits] == list(range(1, 41))
    assert len({h["path"] for h in hits}) == 40
    assert "holds only 40 images" in result.stderr


def test_json_is_valid_utf8_for_file_names_that_are_not(tmp_path, tiny_model_dir, shapes_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    raw = os.fsencode(str(photos)) + b"/caf\xe9-\xff.png"  # Latin-1 bytes: not valid UTF-8
    shutil.copy(shapes_dir / "test" / "000000.png", raw)
    shutil.copy(shapes_dir / "test" / "000001.png", photos / "写真.png")
    index = tmp_path / "idx"
    build = run("build-index", photos, "--index", index, "--model", tiny_model_dir, "--workers", "0",
                "--no-progress", "--json")
    assert json.loads(build.stdout_bytes.decode("utf-8"))["added"] == 2
    out = run("query", "a red circle", "--index", index, "-k", "2", "--json").stdout_bytes
    paths = {h["path"] for h in json.loads(out.decode("utf-8"))[0]["hits"]}  # strict UTF-8: must not raise
    assert {os.fsencode(p) for p in paths} == {raw, os.fsencode(str(photos / "写真.png"))}
    assert "写真" in out.decode("utf-8") and b"\\udcff" in out  # readable Unicode kept; bad bytes escaped
    human = run("query", "a red circle", "--index", index, "-k", "2").stdout_bytes
    assert raw in human  # plain output gives the file name's own bytes back


def test_remove_a_folder_removes_everything_under_it(built_index, shapes_dir):
    refused = run("remove", shapes_dir / "test", "--index", built_index, ok=False)
    assert refused.exit_code == 2 and "--all" in refused.output
    out = json.loads(run("remove", shapes_dir / "test", "--index", built_index, "--all", "--json").stdout)
    assert out == {"removed": 40, "images": 0}
    again = run("remove", shapes_dir / "test", "--index", built_index, ok=False)
    assert again.exit_code == 1 and "nothing in the index" in again.output


def test_add_takes_only_image_names(built_index, tmp_path, shapes_dir):
    import io

    from PIL import Image

    folder = tmp_path / "new"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(folder / "red.avif")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 0, 200)).save(buf, "JPEG")
    (folder / "blue.jpg.txt").write_bytes(buf.getvalue())  # a JPEG by content, not by name
    refused = run("add", folder / "blue.jpg.txt", "--index", built_index, ok=False)
    assert refused.exit_code == 2 and "not an image file name" in refused.output
    added = json.loads(run("add", folder, "--index", built_index, "--workers", "0", "--no-progress", "--json").stdout)
    assert added["added"] == 1 and added["images"] == 41
    # the next build of the same folder agrees: nothing to add, nothing to drop
    again = json.loads(run("build-index", folder, "--index", built_index, "--workers", "0", "--no-progress",
                           "--json").stdout)
    assert (again["added"], again["unchanged"], again["removed"]) == (0, 1, 0)


def test_help_lists_the_image_extensions():
    from edje_search.images import IMAGE_EXTENSIONS

    for command in ("build-index", "add"):
        text = " ".join(run(command, "--help").stdout.split())
        assert all(ext in text for ext in IMAGE_EXTENSIONS) and ".avif" in text
    assert "surrogate escapes" in " ".join(run("query", "--help").stdout.split())


def test_commands_that_need_no_model_do_not_import_torch(built_index):
    """`info`, `verify`, `repair`, `models` and `--help` start without torch or open_clip."""
    code = (
        "import sys\n"
        "from edje_search_cli.main import cli, register_commands\n"
        "register_commands()\n"
        "for args in sys.argv[1:]:\n"
        "    try:\n"
        "        cli.main(args.split('|'), standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    commands = [f"info|--index|{built_index}", f"verify|--index|{built_index}", f"repair|--index|{built_index}",
                "models", "--help", "build-index|--help", "query|--help"]
    proc = subprocess.run([sys.executable, "-c", code, *commands], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "ok: 40 images" in proc.stdout and "tiny-random" in proc.stdout


def test_a_second_writer_gets_one_line_naming_the_holder_and_exit_75(built_index, shapes_dir):
    from edje_search.storage.lock import WriterLock

    with WriterLock(built_index):  # this process writes; another one tries to
        proc = subprocess.run([sys.executable, "-m", "edje_search_cli", "remove", str(shapes_dir / "test"),
                               "--index", str(built_index), "--wait", "0.5"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0] and "waiting 0.5 s" in lines[0], lines
    assert json.loads(run("info", "--index", built_index, "--json").stdout)["images"] == 40


def test_train_first_stage_then_reranker_then_eval(tmp_path, shapes_dir):
    """The training path a user runs: `train first-stage` (real MiniLM-L6 text tower) writes the
    training set's features; `train reranker --features` reuses them instead of encoding the set
    again; `eval` ranks with the result. The features are the saved first stage's own."""
    import torch

    from edje_search.data.annotations import read_captions
    from edje_search.models.bundle import EdjeModel
    from edje_search.models.first_stage import FirstStage
    from edje_search.training.features import compute_features, features_key, load_cached_features

    first, rr, data_file = tmp_path / "first", tmp_path / "rr", shapes_dir / "train.json"
    out = run("train", "first-stage", "--data", data_file, "--out", first, "--steps", 2, "--batch-size", 16,
              "--image-size", 32, "--width", 32, "--layers", 1).output
    assert "features saved to" in out
    fs, data = FirstStage.from_pretrained(first / "first_stage"), read_captions(data_file)
    key = features_key(fs, data)
    saved = load_cached_features(first / "features.pt", key)  # the key holds the saved weights' hash
    assert saved is not None
    fresh = compute_features(fs, data, num_workers=0, progress=False)
    torch.testing.assert_close(saved.text_emb, fresh.text_emb, rtol=0, atol=2e-6)  # eval mode, cut padding
    assert torch.equal(saved.vision_tokens, fresh.vision_tokens) and torch.equal(saved.image_emb, fresh.image_emb)
    run("train", "reranker", "--data", data_file, "--first-stage", first / "first_stage", "--out", rr,
        "--features", first / "features.pt", "--n-queries", 4, "--mlp-dim", 64, "--lm-layers", 1,
        "--score-head", "mean", "--adapter-warmup", 2, "--w-mlm", 0, "--w-recovery", 0, "--dropout", 0,
        "--batch-size", 8, "--steps", 2)
    assert not (rr / "features.pt").exists()  # reused in place: neither recomputed nor copied
    assert EdjeModel.from_pretrained(rr / "model").reranker.language_model.config.hidden_dropout_prob == 0.0
    res = json.loads(run("eval", "--data", shapes_dir / "test.json", "--model", rr / "model", "--rerank-k", 5,
                         "--json").stdout)
    assert [r["name"] for r in res["rows"]] == ["first stage", "edje"]
    # features of another first stage (one weight changed) are not used
    with torch.no_grad():
        fs.clip.logit_scale.add_(1.0)
    assert load_cached_features(first / "features.pt", features_key(fs, data)) is None


def test_train_flags_come_from_the_config_and_a_saved_config_is_overridden_by_typed_flags(tmp_path):
    """`train` flags are generated from the config dataclasses: same names and defaults as the
    library, and `--config FILE` starts from a saved run's config that typed flags override."""
    import dataclasses as dc

    from click.testing import CliRunner
    from edje_search.training.configs import RerankerTrainConfig
    from edje_search_cli.config_flags import config_flags, config_from_flags

    @click.command()
    @config_flags(RerankerTrainConfig)
    def show(config_file, **flags):
        click.echo(json.dumps(dc.asdict(config_from_flags(RerankerTrainConfig, flags, config_file))))

    runner = CliRunner()
    plain = json.loads(runner.invoke(show, []).output)
    assert plain == dc.asdict(RerankerTrainConfig())
    saved = tmp_path / "train_config.json"
    saved.write_text(json.dumps(dc.asdict(RerankerTrainConfig(steps=77, lr=5e-5, mlp_dim=64))))
    got = json.loads(runner.invoke(show, ["--config", str(saved), "--steps", "12"]).output)
    assert (got["steps"], got["lr"], got["mlp_dim"]) == (12, 5e-5, 64)
    saved.write_text(json.dumps({"steps": 3, "no_such_field": 1}))
    res = runner.invoke(show, ["--config", str(saved)])
    assert res.exit_code == 2 and "no_such_field" in res.output
    res = runner.invoke(show, ["--variant", "nonsense"])
    assert res.exit_code == 2
