"""train reranker --auto: early stopping, the pool switch, the kept checkpoint, resume, the curve files;
the glyphs generator draws what its captions say."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from edje_search.data.annotations import read_captions
from edje_search.models.bundle import EdjeModel
from edje_search.training import auto, validation
from edje_search.training.common import SizedCosine
from edje_search.training.configs import RerankerTrainConfig
from edje_search.training.reranker import train_reranker


def _cfg(**kw) -> RerankerTrainConfig:
    base = dict(n_queries=2, mlp_dim=64, batch_size=8, lr=1e-3, w_mlm=0, w_recovery=0, auto=True, val_every=1,
                max_epochs=20.0, patience=2, mining_pool=32)
    return RerankerTrainConfig(**(base | kw))


class ScriptedCurve:
    """Stands in for validation: returns the next score of ``scores`` (both directions) and keeps a
    copy of the weights it was shown, so a test can tell which step the saved model is."""

    def __init__(self, scores, interrupt_at: int | None = None):
        self.scores, self.interrupt_at, self.calls, self.weights = list(scores), interrupt_at, 0, []

    def __call__(self, first_stage, reranker, vs, **kw):
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        score = self.scores[min(self.calls, len(self.scores) - 1)]
        self.calls += 1
        self.weights.append({k: v.clone() for k, v in reranker.state_dict().items()})
        return {d: {"R@1": score, "R@5": score, "R@10": score} for d in ("t2i", "i2t")}


def _pool_sizes(monkeypatch) -> list[int]:
    import edje_search.training.reranker as training

    sizes: list[int] = []
    real = training._mining_pool

    def recording(global_caps, n_captions, size, seed):
        sizes.append(size)
        return real(global_caps, n_captions, size, seed)

    monkeypatch.setattr(training, "_mining_pool", recording)
    return sizes


def test_auto_stops_on_a_plateau_keeps_the_best_weights_and_switches_the_pool_at_the_plateau(
        tmp_path, monkeypatch, shapes_dir, tiny_lm_dir, tiny_first_stage_dir):
    # step:      0   1   2   3 (flat: pool on)  4 (best)  5   6 (2 without gain: stop)
    curve = ScriptedCurve([10, 20, 30, 30.2, 35, 34, 34.8])
    monkeypatch.setattr(validation, "validate", curve)
    sizes = _pool_sizes(monkeypatch)
    data = read_captions(shapes_dir / "train.json")
    train_reranker(tiny_first_stage_dir, data, tmp_path / "run", _cfg(), lm_dir=tiny_lm_dir, progress=False)
    saved = json.loads((tmp_path / "run" / "val_curve.json").read_text())
    assert [p["step"] for p in saved["points"]] == [0, 1, 2, 3, 4, 5, 6]
    assert saved["stopped"] == "plateau" and saved["best"]["step"] == 4 and saved["pool_from"] == 3
    assert sizes == [0, 0, 0, 32, 32, 32]  # the batch alone until the plateau at step 3, the pool after
    assert [p["pool"] for p in saved["points"]] == [0, 0, 0, 0, 32, 32, 32]  # the pool of the step before
    assert (tmp_path / "run" / "val_curve.png").stat().st_size > 0
    model = EdjeModel.from_pretrained(tmp_path / "run" / "model")
    kept = model.reranker.state_dict()
    for key, value in curve.weights[4].items():  # the weights validated at step 4, not the last ones
        torch.testing.assert_close(kept[key], value, rtol=0, atol=0)
    assert any(not torch.equal(kept[k], v) for k, v in curve.weights[6].items())


def test_auto_resume_keeps_the_curve(tmp_path, monkeypatch, shapes_dir, tiny_lm_dir, tiny_first_stage_dir):
    data = read_captions(shapes_dir / "train.json")
    first = ScriptedCurve([10, 20, 30, 40], interrupt_at=3)  # killed while validating step 3
    monkeypatch.setattr(validation, "validate", first)
    with pytest.raises(KeyboardInterrupt):
        train_reranker(tiny_first_stage_dir, data, tmp_path / "run", _cfg(), lm_dir=tiny_lm_dir, progress=False)
    before = json.loads((tmp_path / "run" / "val_curve.json").read_text())["points"]
    assert [p["step"] for p in before] == [0, 1, 2]
    rest = ScriptedCurve([40, 39, 39, 39, 39])  # step 3 again, then flat: pool on at 4, stop at 6
    monkeypatch.setattr(validation, "validate", rest)
    train_reranker(tiny_first_stage_dir, data, tmp_path / "run", _cfg(), lm_dir=tiny_lm_dir, progress=False)
    saved = json.loads((tmp_path / "run" / "val_curve.json").read_text())
    assert saved["points"][:3] == before  # the first run's points, as they were
    assert [p["step"] for p in saved["points"]] == [0, 1, 2, 3, 4, 5, 6]
    assert [p["score"] for p in saved["points"]] == [10, 20, 30, 40, 39, 39, 39]
    assert saved["best"]["step"] == 3 and saved["pool_from"] == 4 and saved["stopped"] == "plateau"
    log = [json.loads(x)["step"] for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]


def test_auto_validation_measures_what_eval_measures(tmp_path, shapes_dir, tiny_lm_dir, tiny_first_stage_dir,
                                                     caplog):
    """A real auto run on a given validation split: its last point is the saved model's eval row."""
    from edje_search.evaluation import evaluate

    data = read_captions(shapes_dir / "train.json")
    val = read_captions(shapes_dir / "test.json")
    cfg = _cfg(val_every=2, max_epochs=1.0, val_rerank_k=10, patience=5, n_queries=4)
    with caplog.at_level("INFO", logger="edje_search.training"):
        model = train_reranker(tiny_first_stage_dir, data, tmp_path / "run", cfg, lm_dir=tiny_lm_dir,
                               progress=False, val_data=val)
    saved = json.loads((tmp_path / "run" / "val_curve.json").read_text())
    assert saved["n_val_images"] == 40 and saved["n_queries"] == {"t2i": 80, "i2t": 40}
    assert any("auto: stopped at step" in r.getMessage() for r in caplog.records)
    assert any("over the first stage" in r.getMessage() for r in caplog.records)
    assert any("images for 4 stored tokens" in r.getMessage() for r in caplog.records)  # 48 images: too few
    best = saved["best"]
    results = evaluate([model.eval()], val, rerank_k=10, progress=False)
    first, logit = results["rows"][0], results["rows"][1]
    assert saved["first_stage"]["t2i"]["R@1"] == first["t2i"]["R@1"]
    assert saved["first_stage"]["i2t"]["R@1"] == first["i2t"]["R@1"]
    assert best["t2i"]["R@1"] == pytest.approx(logit["t2i"]["R@1"], abs=2.5)  # one caption of 80: float16 tokens
    assert best["i2t"]["R@1"] == pytest.approx(logit["i2t"]["R@1"], abs=2.5)


def test_auto_warns_when_the_gain_still_rises_at_the_end(tmp_path, monkeypatch, shapes_dir, tiny_lm_dir,
                                                          tiny_first_stage_dir, caplog):
    monkeypatch.setattr(validation, "validate", ScriptedCurve([10 * i for i in range(40)]))
    data = read_captions(shapes_dir / "train.json")
    with caplog.at_level("INFO", logger="edje_search.training"):
        train_reranker(tiny_first_stage_dir, data, tmp_path / "run", _cfg(max_epochs=0.5), lm_dir=tiny_lm_dir,
                       progress=False)
    saved = json.loads((tmp_path / "run" / "val_curve.json").read_text())
    assert saved["stopped"] == "max epochs" and saved["points"][-1]["step"] == saved["max_steps"]
    assert saved["pool_from"] == saved["max_steps"] // 2  # never flat: the pool from half the run
    assert any("still rising" in r.getMessage() for r in caplog.records)


def test_auto_refuses_a_fixed_pool_step(tmp_path, shapes_dir, tiny_lm_dir, tiny_first_stage_dir):
    from edje_search.errors import BadInput

    data = read_captions(shapes_dir / "train.json")
    with pytest.raises(BadInput, match="mining-pool-from"):
        train_reranker(tiny_first_stage_dir, data, tmp_path / "run", _cfg(mining_pool_from=3), lm_dir=tiny_lm_dir,
                       progress=False)


def test_plan_length_fits_the_budget_and_the_schedule_follows():
    # no budget: the epochs decide; 3-12 validations
    total, every = auto.plan_length(1500, 10, step_s=0.8, val_s=30.0, left_s=None)
    assert total == 1500 and 1500 / 12 <= every <= 1500 / 3 + 1
    # 10 minutes left: training and validations fit in them
    total, every = auto.plan_length(1500, 10, step_s=0.8, val_s=30.0, left_s=600.0)
    n_evals = -(-total // every)
    assert total < 1500 and (total - 10) * 0.8 + (n_evals + 1) * 30.0 <= 600.0 + 30.0
    schedule = SizedCosine(10, 100)
    assert schedule(0) == 0 and schedule(10) == pytest.approx(1.0) and schedule(100) == pytest.approx(0.0)
    schedule.total = 50
    assert schedule(50) == pytest.approx(0.0)


def test_validation_on_a_subset_of_queries_scores_each_query_s_own_pairs(shapes_dir, monkeypatch):
    """With fewer query images than the gallery, each query row is scored with its own caption or
    image: a scorer that knows the right pairs puts every query's target first."""
    data = read_captions(shapes_dir / "test.json")
    n, c = len(data.images), len(data.captions)
    feats = validation.TrainFeatures(torch.nn.functional.normalize(torch.randn(n, 8), dim=-1),
                                     torch.zeros(n, 2, 4, dtype=torch.float16),
                                     torch.nn.functional.normalize(torch.randn(c, 8), dim=-1))
    vs = validation.make_validation_set(data, feats, rerank_k=c, n_queries=7, seed=0)  # every candidate
    assert vs.n_queries == {"t2i": 14, "i2t": 7}
    truth = np.asarray(data.caption_image)
    monkeypatch.setattr(validation, "EdjeModel", lambda *a, **kw: None)
    monkeypatch.setattr(validation, "pair_scorer", lambda *a, **kw: lambda caps, imgs: (truth[caps] == imgs) * 1.0)
    reranker = torch.nn.Linear(4, 4)
    reranker.project = lambda x: x
    got = validation.validate(None, reranker, vs)
    assert got["t2i"]["R@1"] == 100.0 and got["i2t"]["R@1"] == 100.0


def test_carved_validation_keeps_images_whole_and_apart_from_training(shapes_dir):
    data = read_captions(shapes_dir / "train.json")
    train_idx, val_idx = validation.carve(data, 6, seed=0)
    assert len(val_idx) == 6 and not set(train_idx) & set(val_idx)
    assert len(train_idx) + len(val_idx) == len(data.images)
    val = validation.subset(data, val_idx)
    assert len(val.captions) == sum(len(data.image_captions[i]) for i in val_idx)
    assert all(data.images[val_idx[i]] == val.images[i] for i in range(6))
    assert validation.validation_size(10_000, 1000) == 1000 and validation.validation_size(48, 1000) == 4


# --------------------------------------------------------------------------- the glyphs generator
def _centroid(img: np.ndarray, rgb) -> tuple[float, float, int]:
    ys, xs = np.nonzero((img == np.asarray(rgb, dtype=img.dtype)).all(axis=-1))
    return (float(xs.mean()) if len(xs) else -1.0, float(ys.mean()) if len(ys) else -1.0, len(xs))


def _check_fill(img, fill, color, shape):
    from edje_search.data.glyphs import GLYPH_COLORS

    ys, xs = np.nonzero((img == np.asarray(GLYPH_COLORS[color])).all(axis=-1))
    assert len(xs), (color, shape)
    if shape in ("kite", "bar", "drop"):  # convex enough that the middle of the box is inside
        cx, cy = (xs.min() + xs.max()) // 2, (ys.min() + ys.max()) // 2
        middle = (img[cy - 1:cy + 2, cx - 1:cx + 2] == np.asarray(GLYPH_COLORS[color])).all(axis=-1)
        assert middle.all() if fill == "solid" else not middle.any(), (fill, color, shape)


def test_glyph_images_show_what_their_captions_say(tmp_path):
    from edje_search.data.glyphs import GLYPH_COLORS
    from edje_search.data.synthetic import COLORS, HELDOUT_COLORS, HELDOUT_SHAPES, SHAPES, make_dataset

    files = make_dataset(tmp_path / "g", n_train=0, n_val=0, n_test=60, image_size=96, seed=2, progress=False,
                         style="glyphs")
    again = make_dataset(tmp_path / "h", n_train=0, n_val=0, n_test=60, image_size=96, seed=2, progress=False,
                         style="glyphs")
    assert files["test"].read_text() == again["test"].read_text()
    entries = json.loads(files["test"].read_text())
    thing = r"an? (solid|hollow) (\w+) (moon|kite|bar|drop)"
    seen = set()
    for e in entries:
        img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "g" / e["image"]).convert("RGB"))
        cap = e["caption"][0]
        if m := re.fullmatch(f"from left to right: {thing}, {thing}, {thing}", cap):
            parts = [m.groups()[i:i + 3] for i in (0, 3, 6)]
            xs = [_centroid(img, GLYPH_COLORS[c])[0] for _, c, _ in parts]
            assert xs[0] < xs[1] < xs[2], cap
            for part in parts:
                _check_fill(img, *part)
            seen.add("row")
        elif m := re.fullmatch(f"an? (\\w+) arrow points at {thing} from (the left|the right|above|below)", cap):
            arrow, fill, color, shape, side = m.groups()
            ax, ay, _ = _centroid(img, GLYPH_COLORS[arrow])
            tx, ty, _ = _centroid(img, GLYPH_COLORS[color])
            dx, dy = ax - tx, ay - ty
            want = {"the left": dx < -10, "the right": dx > 10, "above": dy < -10, "below": dy > 10}[side]
            assert want and (abs(dx) > abs(dy)) == (side in ("the left", "the right")), cap
            _check_fill(img, fill, color, shape)
            seen.add("pointing")
        elif m := re.fullmatch(f"{thing} inside an? (\\w+) frame, {thing} outside", cap):
            f1, c1, s1, frame, f2, c2, s2 = m.groups()
            ys, xs = np.nonzero((img == np.asarray(GLYPH_COLORS[frame])).all(axis=-1))
            box = (xs.min(), xs.max(), ys.min(), ys.max())
            inside = _centroid(img, GLYPH_COLORS[c1])
            outside = _centroid(img, GLYPH_COLORS[c2])
            assert box[0] < inside[0] < box[1] and box[2] < inside[1] < box[3], cap
            assert not (box[0] < outside[0] < box[1]), cap
            _check_fill(img, f1, c1, s1)
            _check_fill(img, f2, c2, s2)
            seen.add("frame")
        else:
            raise AssertionError(f"caption outside the glyphs grammar: {cap}")
    assert seen == {"row", "pointing", "frame"}
    words = {w.strip(",;:") for e in entries for c in e["caption"] for w in c.split()}
    others = set(COLORS) | set(SHAPES) | set(HELDOUT_COLORS) | set(HELDOUT_SHAPES)
    assert words & set(GLYPH_COLORS) and not words & others


def test_a_slower_machine_shortens_the_rest_of_the_run_and_its_schedule(tmp_path):
    cfg = _cfg(max_minutes=10.0, val_every=0, max_epochs=2.0)
    run = auto.AutoRun(cfg, tmp_path, n_captions=20_000, n_images=10_000, validate=None,
                       first_stage_recall={}, n_queries={}, n_val_images=1000, state=None, start=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                              SizedCosine(40, 800))
    run.total, run.every, run.planned, run.val_s = 800, 200, True, 20.0
    run.elapsed = lambda: 300.0  # 300 s of the 600 spent at step 200
    # a validation of 20 s every 200 steps adds 0.1 s a step; the last one is paid first
    run._replan(200, sched, step_s=2.0)  # (300 - 20) / 2.1 = 133 more steps
    assert run.total == 333 and sched.lr_lambdas[0].total == 333
    run._replan(200, sched, step_s=0.5)  # faster again: (300 - 20) / 0.6 = 466 more
    assert run.total == 666 and sched.lr_lambdas[0].total == 666
    run._replan(200, sched, step_s=0.51)  # within 5%: left as planned
    assert run.total == 666
