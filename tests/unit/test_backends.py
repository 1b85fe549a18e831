"""Reranker backends: each runs the same scoring pass and agrees with eager fp32."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import BertTokenizerFast

from edje_search import BACKENDS, Engine
from edje_search.models.builders import build_reranker, build_tiny_model, tiny_bert_config

CAPTIONS = ["a red circle", "", "two blue squares left of a big green triangle " * 20, "three small stars"]

# (max |logit - eager|) per backend on the tiny random model; onnx is the same fp32 graph
TOLERANCE = {"eager": 0.0, "onnx": 1e-4, "bf16": 0.05, "dynamic-int8": 0.05, "onnx-int8": 0.1}


def test_package_and_cli_import_without_torch():
    """`import edje_search` and the CLI's option lists stay torch-free (fast `--help`, `info`, `verify`)."""
    code = ("import sys, edje_search, edje_search_cli.main as m; from edje_search import EdjeError, BACKENDS; "
            "assert m.BACKENDS == BACKENDS; print(sorted(x for x in ('torch', 'open_clip', 'transformers') "
            "if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_onnx_export_takes_special_tokens_from_the_tokenizer(tmp_path):
    """A tokenizer whose whole vocabulary is smaller than BERT's [CLS] id (101) still exports."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "an", "example", "short",
             "caption", "to", "trace", "blue", "square"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    first_stage = build_tiny_model(seed=0).first_stage
    reranker = build_reranker(first_stage, tiny_bert_config(), tok, variant="compressed", n_queries=4, mlp_dim=64)
    assert reranker.language_model.config.vocab_size == len(words) + 1 < 101
    tokens = torch.randn(3, 4, 32)
    caps = ["a red circle", "blue", "a blue square a red circle"]
    ref = reranker.score(caps, projected_tokens=tokens)
    got = reranker.use_backend("onnx", cache_dir=tmp_path / "onnx").score(caps, projected_tokens=tokens)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_exports_log_and_leave_the_root_logger_alone(tmp_path, caplog):
    root = logging.getLogger()
    before = (root.level, list(root.handlers), list(root.filters))
    with caplog.at_level(logging.INFO, logger="edje_search.models.backends"):
        build_tiny_model(seed=0).reranker.use_backend("onnx-int8", cache_dir=tmp_path)
    assert (root.level, list(root.handlers), list(root.filters)) == before
    said = [r.getMessage() for r in caplog.records if r.name == "edje_search.models.backends"]
    assert any("ONNX" in m for m in said) and any("int8" in m for m in said)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_eager(backend, tmp_path):
    reranker = build_tiny_model(seed=0).reranker.eval()
    torch.manual_seed(1)
    tokens = torch.randn(len(CAPTIONS), reranker.config.tokens_per_image, reranker.token_width)
    with torch.inference_mode():
        ref = reranker.score(CAPTIONS, projected_tokens=tokens)
        reranker.use_backend(backend, cache_dir=tmp_path)
        assert reranker.backend == backend
        got = reranker.score(CAPTIONS, projected_tokens=tokens)
        # a batch of another size and length goes through the same graph
        one = reranker.score(CAPTIONS[:1], projected_tokens=tokens[:1])
        # score_pairs (each caption encoded once, batches cut to their longest caption) agrees
        # with scoring each pair alone, on mixed lengths and batches that split them
        cap_idx, tok_idx = np.array([0, 2, 1, 3, 2, 0, 3]), np.array([1, 0, 3, 2, 2, 3, 0])
        pairs = reranker.score_pairs(CAPTIONS, tokens, cap_idx, tok_idx, batch_size=3)
        each = [reranker.score([CAPTIONS[c]], projected_tokens=tokens[t:t + 1]).item()
                for c, t in zip(cap_idx, tok_idx)]
    assert got.shape == (len(CAPTIONS),) and got.dtype == torch.float32
    assert np.abs(pairs - np.array(each)).max() <= max(TOLERANCE[backend], 1e-4)
    assert (got - ref).abs().max().item() <= TOLERANCE[backend]
    assert abs(one.item() - got[0].item()) <= max(TOLERANCE[backend], 1e-4)


def test_onnx_export_is_cached_per_weights(tmp_path):
    model = build_tiny_model(seed=0)
    model.reranker.use_backend("onnx-int8", cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.rglob("*.onnx"))
    assert files == ["scorer-int8-pc.onnx", "scorer.onnx"]
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.onnx")}
    build_tiny_model(seed=0).reranker.use_backend("onnx-int8", cache_dir=tmp_path)  # same weights: reused
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.onnx")} == stamp
    build_tiny_model(seed=1).reranker.use_backend("onnx", cache_dir=tmp_path)  # other weights: new folder
    assert len(list(tmp_path.iterdir())) == 2


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        build_tiny_model(seed=0).reranker.use_backend("tensorrt")


def test_engine_search_with_onnx_int8_keeps_the_candidates(built_index, monkeypatch, tmp_path):
    monkeypatch.setenv("EDJE_HOME", str(tmp_path))
    eager = Engine.from_pretrained(built_index)
    fast = Engine.from_pretrained(built_index, backend="onnx-int8")
    q = "a small red circle left of a large blue square"
    a = {h.path: h.rerank_score for h in eager.search(q, k=10, rerank_k=10)}
    b = {h.path: h.rerank_score for h in fast.search(q, k=10, rerank_k=10)}
    assert a.keys() == b.keys()
    np.testing.assert_allclose([b[p] for p in a], list(a.values()), atol=0.1)


def test_query_cli_backend_option(built_index, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from edje_search_cli.main import cli, register_commands

    register_commands()
    monkeypatch.setenv("EDJE_HOME", str(tmp_path))
    out = CliRunner().invoke(cli, ["query", "two blue squares", "--index", str(built_index), "-k", "3",
                                   "--backend", "onnx", "--json"])
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.stdout)[0]["hits"]) == 3
