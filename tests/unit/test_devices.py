"""Device and precision handling of the indexing path, checked on the CPU: the device argument is
honoured (and refused when absent), autocast dtypes, embeddings under bf16 autocast, decode
workers kept across passes, and the writer thread's ordering and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edje_search import Engine, load_model
from edje_search.devices import autocast_dtype, pick_device
from edje_search.errors import BadInput
from edje_search.pipeline import BackgroundCommits, ImageEmbedder, embed_files, embed_pixels


def test_pick_device_honours_the_argument_and_refuses_a_missing_gpu():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == pick_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="no CUDA"):
            pick_device("cuda:0")


def test_autocast_dtype_by_device_and_precision():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None  # fp32 on the CPU by default
    assert autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert autocast_dtype(cpu, "fp16") is torch.float16
    with pytest.raises(BadInput):
        autocast_dtype(cpu, "int4")


def test_search_eval_and_calibrate_score_pairs_under_one_precision_rule(built_index, shapes_dir, monkeypatch):
    """Search, evaluation and calibration ask devices.precision_autocast for the same precision
    ("auto" unless told), so on a GPU they score pairs in one dtype (bf16 where the GPU has it)."""
    from edje_search import devices, engine as engine_module, evaluation
    from edje_search.data.annotations import read_captions

    asked: dict[str, list[str]] = {"search": [], "eval": []}

    def recorder(where):
        def record(device, precision="auto"):
            asked[where].append(precision)
            return devices.precision_autocast(device, precision)
        return record

    monkeypatch.setattr(engine_module, "precision_autocast", recorder("search"))
    monkeypatch.setattr(evaluation, "precision_autocast", recorder("eval"))
    eng = Engine.from_pretrained(built_index, device="cpu")
    eng.search("a red circle", k=3, rerank_k=5)
    data = read_captions(shapes_dir / "test.json")
    evaluation.evaluate([eng.model], data, rerank_k=5, progress=False)
    evaluation.calibrate_fusion(eng.model, data, rerank_k=5, weights=(0.0, 1.0), progress=False)
    assert set(asked["search"]) == set(asked["eval"]) == {"auto"}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.float16


def test_engine_create_puts_the_model_on_the_device_asked_for(tiny_model_dir, tmp_path):
    engine = Engine.create(tmp_path / "a", load_model(tiny_model_dir), device="cpu")
    assert engine.model.device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BadInput):
            Engine.create(tmp_path / "b", load_model(tiny_model_dir), device="cuda")
        assert not (tmp_path / "b").exists()  # refused before anything was written


def test_embed_pixels_under_bf16_autocast_stays_close_to_fp32(tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    size = model.first_stage.config.image_size
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    v32, t32 = embed_pixels(model, pixels, precision="fp32", token_dtype="float32")
    v16, t16 = embed_pixels(model, pixels, precision="bf16", token_dtype="float16")
    assert v16.dtype == np.float32 and t16.dtype == np.float16 and t32.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v16, axis=1), 1.0, atol=1e-5)  # re-normalised in fp32
    assert not np.array_equal(v16, v32)  # the bf16 path really ran in lower precision
    np.testing.assert_allclose(v16, v32, atol=5e-2)
    np.testing.assert_allclose(t16.astype(np.float32), t32, atol=0.1 * np.abs(t32).max())


def test_image_embedder_keeps_its_workers_across_passes(tiny_model_dir, shapes_dir):
    model = load_model(tiny_model_dir).eval()
    paths = sorted(str(p) for p in (shapes_dir / "test").glob("*.png"))[:12]
    with ImageEmbedder(model, batch_size=4, num_workers=1) as embedder:
        first = list(embedder.embed(paths[:6], progress=False))
        workers = list(embedder._loader._iterator._workers)
        second = list(embedder.embed(paths[6:], progress=False))
        assert [w.pid for w in embedder._loader._iterator._workers] == [w.pid for w in workers]
        assert all(w.is_alive() for w in workers)
    assert not any(w.is_alive() for w in workers)  # closed with the embedder
    once = list(embed_files(model, paths, batch_size=4, num_workers=0, progress=False))
    got = [p for b in first + second for p in b.paths]
    assert got == [p for b in once for p in b.paths] == paths
    np.testing.assert_allclose(np.concatenate([b.vectors for b in first + second]),
                               np.concatenate([b.vectors for b in once]), atol=1e-6)


def test_background_commits_run_in_order_and_report_failures():
    done = []
    with BackgroundCommits(depth=1) as commits:
        for i in range(5):
            commits.submit(done.append, i)
    assert done == [0, 1, 2, 3, 4]

    def fail(x):
        raise OSError(f"disk full at {x}")

    commits = BackgroundCommits()
    commits.submit(fail, 1)
    try:
        commits.submit(done.append, 99)  # after a failure nothing else is committed ...
    except OSError:
        pass  # ... and submit says so at once when the failure came first
    with pytest.raises(OSError, match="disk full at 1"):
        commits.wait()
    assert 99 not in done
