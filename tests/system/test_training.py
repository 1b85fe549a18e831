"""Losses, negative mining, reranker training end to end (one and two processes)."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertForMaskedLM

from edje_search.data.annotations import read_captions
from edje_search.errors import BadInput
from edje_search.models.bundle import EdjeModel
from edje_search.models.registry import build_tiny_model, bundled_minilm_dir
from edje_search.training.batches import PairBatches, first_stage_neighbours
from edje_search.training.caption_swaps import WordClasses
from edje_search.training.losses import (distillation_loss, itm_loss, mask_caption_tokens, match_loss, mlm_loss,
                                         recovery_loss, swap_loss)
from edje_search.training.mining import match_groups, mine_hard_negatives
from edje_search.training.common import TrainLog, set_threads
from edje_search.training.first_stage import FirstStageTrainConfig, planned_steps, warn_if_at_chance
from edje_search.training.reranker import RerankerTrainConfig, _mining_pool, load_bert_weights, train_reranker
from edje_search.training.warmup import caption_word_targets, warm_up_adapter


# ------------------------------------------------------------------------------------ mining
def test_mining_never_picks_the_positive_or_same_image_id():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    neg_img, neg_cap = mine_hard_negatives(emb, emb, ids)  # identical embeddings: positive is the max
    assert (ids[neg_img] != ids).all() and (ids[neg_cap] != ids).all()


def test_mining_picks_the_most_similar_other_image():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    neg_img, neg_cap = mine_hard_negatives(text, image, torch.arange(3))
    assert neg_img.tolist() == [2, 2, 1]  # caption 2 is closer to image 1 (0.8) than to image 0 (0.6)
    assert neg_cap.tolist() == [2, 2, 1]


def test_match_groups_join_images_sharing_an_id_or_a_caption():
    # image 0 and 2 share a sentence (up to case and spacing) through different caption slots,
    # 3 and 4 share an id; 1 stands alone
    image_ids = ["a", "b", "c", "d", "d"]
    caption_image = [0, 0, 1, 2, 2, 3, 4]
    captions = ["red left of blue", "blue right of red", "green", "x", "Blue  right of RED", "y", "z"]
    groups = match_groups(image_ids, caption_image, captions)
    assert groups[0] == groups[2] and groups[3] == groups[4]
    assert len({groups[0], groups[1], groups[3]}) == 3


def test_mining_never_picks_an_image_of_the_same_group():
    emb = torch.eye(3)
    neg_img, neg_cap = mine_hard_negatives(emb, emb, torch.tensor([0, 0, 1]))
    assert neg_img.tolist() == [2, 2, 0] and neg_cap.tolist() == [2, 2, 0]


def test_mining_from_a_pool_larger_than_the_batch():
    # batch: 2 pairs on the axes; the pool adds a near copy of pair 0 (another group) and a far pair
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pool_text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.99, 0.14], [-1.0, 0.0]])
    pool_groups = torch.tensor([0, 1, 2, 3])
    neg_img, neg_cap = mine_hard_negatives(text, text, torch.tensor([0, 1]), pool=(pool_text, pool_text, pool_groups))
    assert neg_img.tolist() == [2, 2] and neg_cap.tolist() == [2, 2]  # 0.14 > 0 for pair 1 too
    # the same pool entry in the same group as the query is never picked
    neg_img, _ = mine_hard_negatives(text, text, torch.tensor([0, 1]),
                                     pool=(pool_text, pool_text, torch.tensor([0, 1, 0, 3])))
    assert neg_img.tolist() == [1, 2]  # pair 0 skips the near copy now in its group; pair 1 still takes it


def test_mining_pool_starts_with_the_batch_and_repeats_per_step():
    batch = torch.tensor([5, 9, 2])
    pool = _mining_pool(batch, 100, 10, (0, 7, 0))
    assert len(pool) == 10 and pool[:3].tolist() == [5, 9, 2] and int(pool.max()) < 100
    assert torch.equal(pool, _mining_pool(batch, 100, 10, (0, 7, 0)))  # same step: same pool (all ranks, resume)
    assert not torch.equal(pool, _mining_pool(batch, 100, 10, (0, 8, 0)))
    assert _mining_pool(batch, 100, 0, (0, 7, 0)) is batch  # 0 = the batch only


def test_mining_needs_two_images():
    with pytest.raises(ValueError):
        mine_hard_negatives(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([1, 1]))


# ------------------------------------------------------------------------------------ batches
def test_random_batches_hold_one_caption_per_image_and_reach_every_caption():
    caption_image = np.repeat(np.arange(10), 2)  # 10 images, 2 captions each
    batches = PairBatches(caption_image, size=5, seed=0)
    drawn = [batches.next() for _ in range(40)]
    for b in drawn:
        assert len(set(caption_image[b])) == 5
    assert set(np.concatenate(drawn).tolist()) == set(range(20))


def test_neighbour_batches_group_first_stage_neighbours():
    # 12 images on a line; caption c describes image c (one caption each); neighbours = nearest images
    pos = torch.arange(12, dtype=torch.float32)
    image_emb = torch.stack([torch.cos(pos / 4), torch.sin(pos / 4)], dim=1)
    neighbours = first_stage_neighbours(image_emb, image_emb, k=4)
    assert (neighbours[:, 0] == np.arange(12)).all()  # the closest image to caption c is its own
    batches = PairBatches(np.arange(12), size=6, seed=1, neighbours=neighbours, group=3)
    for _ in range(10):
        b = batches.next()
        assert len(b) == 6 and len(set(b.tolist())) == 6
        for seed in b[::3]:  # each group = a seed then two of its first-stage neighbours
            group = b[list(b).index(seed):list(b).index(seed) + 3]
            assert all(g in neighbours[seed] for g in group[1:])


def test_neighbour_batches_need_neighbours():
    with pytest.raises(ValueError):
        PairBatches(np.arange(4), size=2, seed=0, group=2)


# ------------------------------------------------------------------------------------ losses
def test_itm_loss_values():
    zero = torch.zeros(4)
    assert itm_loss(zero, zero, zero).item() == pytest.approx(np.log(2))
    assert itm_loss(torch.full((4,), 10.0), zero, zero).item() < 1e-3


def test_mask_caption_tokens_never_masks_special_or_image_tokens():
    model = build_tiny_model()
    r = model.reranker
    batch = r.encode_text(["a small red circle left of a large blue square", "two cats"])
    special = torch.isin(batch["input_ids"], torch.tensor(r.tokenizer.all_special_ids))
    ids, labels = mask_caption_tokens(batch["input_ids"], batch["token_type_ids"], special,
                                      r.tokenizer.mask_token_id, probability=1.0)
    masked = labels != -100
    assert masked.any()
    assert not (masked & special).any() and not (masked & (batch["token_type_ids"] == 1)).any()
    assert (ids[masked] == r.tokenizer.mask_token_id).all()
    assert torch.equal(labels[masked], batch["input_ids"][masked])
    _, none = mask_caption_tokens(batch["input_ids"], batch["token_type_ids"], special, 0, probability=0.0)
    assert (none == -100).all()


def test_recovery_and_distillation_losses():
    x = torch.randn(5, 8)
    assert recovery_loss(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert recovery_loss(x, -x).item() == pytest.approx(2.0, abs=1e-6)
    t = torch.randn(6)
    better = distillation_loss(t, t)
    assert better.item() < distillation_loss(-t, t).item()
    assert mlm_loss(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)).item() == 0.0


def test_each_loss_decreases_on_a_toy_batch():
    """A few optimizer steps on a fixed batch lower every objective."""
    from edje_search.training.features import TrainFeatures
    from edje_search.training.reranker import step_losses

    torch.manual_seed(0)
    teacher = build_tiny_model(seed=2, variant="local").reranker.eval()
    caps = ["a small red circle left of a large blue square", "two small green triangles and a cat",
            "a large white diamond above a small cyan circle", "three small yellow squares and a dog"]
    feats = TrainFeatures(torch.nn.functional.normalize(torch.randn(4, 32), dim=-1), torch.randn(4, 16, 32).half(),
                          torch.nn.functional.normalize(torch.randn(4, 32), dim=-1))
    cfg = RerankerTrainConfig(n_queries=4, mlp_dim=64, mlm_probability=0.5)
    swaps = ["a small blue circle left of a large red square", None,
             "a large cyan diamond above a small white circle", "three small yellow dogs and a squares"]
    for name in ("itm", "match", "swap", "mlm", "recovery", "distill"):
        r = build_tiny_model(seed=1).reranker.train()
        opt = torch.optim.AdamW(r.parameters(), lr=3e-3)
        args = (feats, caps, torch.arange(4), torch.arange(4), 0, 4, torch.arange(4), torch.arange(4), r.tokenizer,
                dataclasses.replace(cfg, w_swap=1.0, w_match=float(name == "match")), torch.device("cpu"),
                swaps if name == "swap" else None)
        history = []
        for _ in range(10):
            torch.manual_seed(0)  # same MLM mask every step
            losses = step_losses(r, teacher, *args)
            assert set(losses) == ({"itm", "mlm", "recovery", "distill"} | ({"swap"} if name == "swap" else set())
                                   | ({"match"} if name == "match" else set()))
            history.append(losses[name].item())
            opt.zero_grad()
            losses[name].backward()
            opt.step()
        assert all(np.isfinite(history)) and history[-1] < history[0], (name, history)


def test_word_classes_join_words_seen_between_the_same_neighbours():
    caps = [f"a {size} {colour} {shape} {rel} a {size2} {colour2} {shape2}"
            for size, size2 in (("small", "large"), ("large", "small"))
            for colour, colour2 in (("red", "blue"), ("green", "red"), ("blue", "green"))
            for shape, shape2 in (("circle", "square"), ("square", "triangle"), ("triangle", "circle"))
            for rel in ("left of", "right of", "above", "below")]
    classes = WordClasses.fit(caps, min_count=3)
    assert sorted(map(tuple, classes.classes)) == [("above", "below"), ("blue", "green", "red"),
                                                   ("circle", "square", "triangle"), ("large", "small"),
                                                   ("left", "right")]
    rng = random.Random(0)
    seen = {classes.swap("A small red circle left of a large blue square", rng) for _ in range(50)}
    # two different words of one class trade places; nothing else changes
    assert seen == {"A large red circle left of a small blue square", "A small blue circle left of a large red square",
                    "A small red square left of a large blue circle"}
    # no pair to swap: one word becomes another of its class
    assert classes.swap("Red circle", rng) in {"Blue circle", "Green circle", "Red square", "Red triangle"}
    assert classes.swap("a dog on a sofa", rng) is None


def test_match_loss_pins_the_level_of_the_logits():
    """The matching loss cannot tell logits shifted together; the match loss can."""
    pos, neg = torch.tensor([3.0, 1.0]), torch.tensor([-3.0, -1.0])
    assert itm_loss(pos + 5, neg + 5, neg + 5).item() == pytest.approx(itm_loss(pos, neg, neg).item())
    assert match_loss(pos + 5, neg + 5, neg + 5).item() > match_loss(pos, neg, neg).item() + 1.0
    # perfect separation costs nothing; chance (all zeros) costs log 2 whatever the weighting
    assert match_loss(torch.full((2,), 20.0), torch.full((2,), -20.0), torch.full((2,), -20.0)).item() < 1e-6
    assert match_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2)).item() == pytest.approx(np.log(2))


def test_swap_loss_prefers_the_matching_caption():
    assert swap_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(np.log(2))
    assert swap_loss(torch.full((3,), 10.0), torch.zeros(3)).item() < 1e-3


# --------------------------------------------------------------------------- training runs
def test_train_reranker_saves_a_usable_model_and_resumes(tmp_path, shapes_dir, tiny_lm_dir, tiny_first_stage_dir):
    data = read_captions(shapes_dir / "train.json")
    cfg = RerankerTrainConfig(n_queries=4, mlp_dim=64, steps=4, batch_size=8, checkpoint_every=2, lr=1e-3)
    model = train_reranker(tiny_first_stage_dir, data, tmp_path / "run", cfg, lm_dir=tiny_lm_dir, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    assert all(np.isfinite(x["itm"]) and np.isfinite(x["mlm"]) for x in log)
    loaded = EdjeModel.from_pretrained(tmp_path / "run" / "model")
    assert loaded.reranker.config.n_queries == 4
    # continuing to more steps resumes from the saved state instead of starting over
    cfg6 = RerankerTrainConfig(n_queries=4, mlp_dim=64, steps=6, batch_size=8, checkpoint_every=2, lr=1e-3)
    train_reranker(tiny_first_stage_dir, data, tmp_path / "run", cfg6, lm_dir=tiny_lm_dir, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3, 4, 5, 6]
    # a student distilled from the teacher trains too
    cfg_s = RerankerTrainConfig(n_queries=2, mlp_dim=64, steps=2, batch_size=8, lr=1e-3, mining_pool=32)
    train_reranker(tiny_first_stage_dir, data, tmp_path / "student", cfg_s, lm_dir=tiny_lm_dir,
                   teacher_dir=tmp_path / "run" / "model", progress=False)
    log = [json.loads(x) for x in (tmp_path / "student" / "train_log.jsonl").read_text().splitlines()]
    assert "distill" in log[0] and model is not None


def test_mining_pool_is_used_from_its_start_step_also_after_a_resume(tmp_path, monkeypatch, shapes_dir,
                                                                    tiny_lm_dir, tiny_first_stage_dir):
    """--mining-pool-from: the batch alone before that optimizer step, the pool from it on."""
    import edje_search.training.reranker as training

    sizes = []
    real = training._mining_pool

    def recording(global_caps, n_captions, size, seed):
        sizes.append(size)
        return real(global_caps, n_captions, size, seed)

    monkeypatch.setattr(training, "_mining_pool", recording)
    data = read_captions(shapes_dir / "train.json")
    common = dict(n_queries=2, mlp_dim=64, batch_size=8, lr=1e-3, mining_pool=32, mining_pool_from=2,
                  checkpoint_every=1, w_mlm=0, w_recovery=0)
    train_reranker(tiny_first_stage_dir, data, tmp_path / "run", RerankerTrainConfig(steps=3, **common),
                   lm_dir=tiny_lm_dir, progress=False)
    assert sizes == [0, 0, 32]
    # a longer run resumed from step 3 keeps the pool on
    train_reranker(tiny_first_stage_dir, data, tmp_path / "run", RerankerTrainConfig(steps=4, **common),
                   lm_dir=tiny_lm_dir, progress=False)
    assert sizes == [0, 0, 32, 32]
    with pytest.raises(BadInput, match="never switch the pool on"):
        train_reranker(tiny_first_stage_dir, data, tmp_path / "other",
                       RerankerTrainConfig(steps=3, **(common | {"mining_pool": 0})), lm_dir=tiny_lm_dir,
                       progress=False)


def test_two_process_training_with_gloo(tmp_path, shapes_dir, tiny_lm_dir, tiny_first_stage_dir):
    script = tmp_path / "job.py"
    script.write_text(f"""
import torch.distributed as dist
from edje_search.data.annotations import read_captions
from edje_search.training.reranker import RerankerTrainConfig, train_reranker
data = read_captions({str(shapes_dir / 'train.json')!r})
cfg = RerankerTrainConfig(n_queries=4, mlp_dim=64, steps=3, batch_size=4, lr=1e-3)
model = train_reranker({str(tiny_first_stage_dir)!r}, data, {str(tmp_path / 'run')!r}, cfg,
                       lm_dir={str(tiny_lm_dir)!r}, progress=False)
# parameters stay identical across processes: gradients were averaged
import torch
flat = torch.cat([p.detach().flatten() for p in model.reranker.parameters()])
parts = [torch.empty_like(flat) for _ in range(2)]
dist.all_gather(parts, flat)
assert torch.equal(parts[0], parts[1]), "replicas diverged"
import os
os.write(1, f"RANK_OK {{dist.get_rank()}} {{dist.get_world_size()}}\\n".encode())  # one write: ranks share stdout
dist.destroy_process_group()
""")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a rendezvous on a free local port, so parallel runs never collide on a fixed one
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RANK_OK 0 2" in out.stdout and "RANK_OK 1 2" in out.stdout
    assert (tmp_path / "run" / "model" / "edje.json").is_file()


# ------------------------------------------------------------------ score head, loading, warm-up
def _tiny_reranker(score_head: str = "pooler"):
    import dataclasses

    from edje_search.models.reranker import Reranker

    base = build_tiny_model(seed=0).reranker
    cfg = dataclasses.replace(base.config, score_head=score_head)
    torch.manual_seed(0)
    return Reranker(cfg, base.language_model.config, base.tokenizer).eval()


def test_mean_score_head_ignores_padding_and_keeps_the_state_dict_layout():
    pooler, mean = _tiny_reranker("pooler"), _tiny_reranker("mean")
    assert pooler.state_dict().keys() == mean.state_dict().keys()  # same files, same converter keys
    mean.load_state_dict(pooler.state_dict())
    tokens = torch.randn(2, 4, mean.token_width)
    caps = ["a red circle", "a small blue square left of a large green triangle"]
    together = mean.score(caps, projected_tokens=tokens)  # the first pair is padded in this batch
    alone = torch.cat([mean.score([c], projected_tokens=t[None]) for c, t in zip(caps, tokens)])
    assert torch.allclose(together, alone, atol=1e-5)
    # the head reads the masked mean, not the first position
    hidden, batch = mean.pair_hidden(caps, tokens)
    dense, linear = mean.classification_head[0], mean.classification_head[1]
    m = batch["attention_mask"].float().unsqueeze(-1)
    expected = linear(torch.tanh(dense.dense((hidden * m).sum(1) / m.sum(1)))).squeeze(-1)
    assert torch.allclose(together, expected, atol=1e-5)
    assert not torch.allclose(pooler.score(caps, projected_tokens=tokens), together, atol=1e-3)


def test_load_bert_weights_copies_the_body_and_starts_the_image_row_at_the_mean(tiny_lm_dir, caplog):
    reranker = _tiny_reranker()
    source = BertForMaskedLM.from_pretrained(str(tiny_lm_dir))
    with caplog.at_level("INFO", logger="edje_search.training"):
        load_bert_weights(reranker.language_model, tiny_lm_dir)
    got, want = reranker.language_model.state_dict(), source.state_dict()
    for key in ("bert.encoder.layer.1.output.dense.weight", "cls.predictions.transform.dense.weight"):
        assert torch.equal(got[key], want[key]), key
    emb, old = got["bert.embeddings.word_embeddings.weight"], want["bert.embeddings.word_embeddings.weight"]
    assert emb.shape[0] == old.shape[0] + 1 and torch.equal(emb[:-1], old)
    assert torch.allclose(emb[-1], old.mean(dim=0))
    lm = reranker.language_model  # the decoder stays tied to the word embeddings
    assert lm.cls.predictions.decoder.weight.data_ptr() == lm.bert.embeddings.word_embeddings.weight.data_ptr()
    assert len([r for r in caplog.records if "tensors loaded" in r.getMessage()]) == 1


def test_caption_word_targets_count_each_caption_s_word_pieces():
    tok = AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))
    vocab, targets = caption_word_targets(tok, ["a red circle", "a blue circle", "a red square"], max_vocab=3)
    words = tok.convert_ids_to_tokens(vocab.tolist())
    assert words[:2] == ["a", "circle"] or set(words[:3]) >= {"a", "circle", "red"}
    assert targets.shape == (3, 3) and targets[0].sum() == 3  # "a red circle": all three kept words


def test_adapter_warm_up_lowers_its_loss_and_changes_only_the_adapter():
    reranker = _tiny_reranker().train()
    before = {k: v.clone() for k, v in reranker.state_dict().items()}
    n = 16
    vision = torch.randn(n, reranker.config.n_vision_tokens, reranker.config.vision_width)
    colors = ["red", "blue", "green", "yellow"]
    captions = [f"a {colors[i % 4]} circle" for i in range(n)]
    vision[:, :, 0] += torch.arange(n).remainder(4).float()[:, None] * 3  # colour readable from the tokens
    losses = warm_up_adapter(reranker, vision, captions, np.arange(n), steps=60, lr=3e-3, batch_size=16)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    after = reranker.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vision_projection.") for k in changed)


def test_train_reranker_with_mean_head_and_warm_up(tmp_path, shapes_dir, tiny_lm_dir, tiny_first_stage_dir):
    data = read_captions(shapes_dir / "train.json")
    cfg = RerankerTrainConfig(n_queries=4, mlp_dim=64, steps=2, batch_size=8, lr=1e-3, score_head="mean",
                              adapter_warmup=3, w_mlm=0, w_recovery=0)
    train_reranker(tiny_first_stage_dir, data, tmp_path / "run", cfg, lm_dir=tiny_lm_dir, progress=False)
    loaded = EdjeModel.from_pretrained(tmp_path / "run" / "model")
    assert loaded.reranker.config.score_head == "mean"
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2] and set(log[0]) == {"step", "time", "itm"}


def test_train_reranker_with_swapped_caption_negatives(tmp_path, shapes_dir, tiny_lm_dir, tiny_first_stage_dir):
    data = read_captions(shapes_dir / "train.json")
    cfg = RerankerTrainConfig(n_queries=4, mlp_dim=64, steps=2, batch_size=8, lr=1e-3, w_swap=0.5, w_mlm=0,
                              w_recovery=0)
    train_reranker(tiny_first_stage_dir, data, tmp_path / "run", cfg, lm_dir=tiny_lm_dir, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert set(log[0]) == {"step", "time", "itm", "swap"} and all(np.isfinite(x["swap"]) for x in log)


# ------------------------------------------------------------------------- usability plumbing
def test_train_log_resume_drops_redone_steps_and_keeps_the_clock(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "time": 10.0 * s, "itm": 0.5}) + "\n" for s in range(1, 8))
                    + '{"step": 8, "ti')  # the interrupted run died mid-line
    log = TrainLog(path, resume_step=4)
    log.write(5, itm=0.4)
    entries = [json.loads(x) for x in path.read_text().splitlines()]
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5]
    assert 40.0 <= entries[-1]["time"] < 45.0
    fresh = TrainLog(tmp_path / "new.jsonl")
    fresh.write(1, itm=0.7)
    assert json.loads((tmp_path / "new.jsonl").read_text())["time"] < 5.0


def test_first_stage_schedule_in_steps_or_epochs_and_the_chance_warning(caplog):
    assert planned_steps(FirstStageTrainConfig(steps=123), 10_000) == 123
    assert planned_steps(FirstStageTrainConfig(steps=None, epochs=2.0, batch_size=100), 1_000) == 20
    with pytest.raises(ValueError):
        planned_steps(FirstStageTrainConfig(steps=10, epochs=1.0), 1_000)
    with caplog.at_level("WARNING", logger="edje_search.training.first_stage"):
        warn_if_at_chance([5.5, 5.5], batch_size=256, steps=69)
        assert "near chance" in caplog.text
        caplog.clear()
        warn_if_at_chance([1.2, 1.1], batch_size=256, steps=400)
        assert caplog.text == ""


def test_set_threads():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_calibrate_prints_the_first_stage_beside_each_weight(tiny_model_dir, shapes_dir):
    from click.testing import CliRunner

    from edje_search_cli.main import cli, register_commands

    register_commands()
    args = ["calibrate", "--data", str(shapes_dir / "test.json"), "--model", str(tiny_model_dir), "--weights",
            "0,1e6", "--dry-run", "--threads", "1"]
    as_json = json.loads(CliRunner().invoke(cli, args + ["--json"]).stdout)
    human = CliRunner().invoke(cli, args).stdout
    first = as_json["first_stage"]
    # a huge weight ranks as the first stage alone
    assert as_json["rows"][1]["t2i"]["R@1"] == first["t2i"]["R@1"]
    line = next(x for x in human.splitlines() if x.strip().startswith("first stage"))
    assert f"{first['t2i']['R@1']:.1f}" in line and f"{first['i2t']['R@1']:.1f}" in line
    assert "+0.0   +0.0" in next(x for x in human.splitlines() if x.strip().startswith("1e+06"))


def test_heldout_generator_shares_no_words_for_objects_with_the_shapes_generator(tmp_path):
    from edje_search.data import synthetic

    files = synthetic.make_dataset(tmp_path / "a", n_train=8, n_val=0, n_test=4, image_size=32, seed=1,
                                   progress=False, style="heldout")
    again = synthetic.make_dataset(tmp_path / "b", n_train=8, n_val=0, n_test=4, image_size=32, seed=1,
                                   progress=False, style="heldout")
    assert files["train"].read_text() == again["train"].read_text()  # deterministic by seed
    words = {w for e in json.loads(files["train"].read_text()) for w in e["caption"].split()}
    old = set(synthetic.COLORS) | set(synthetic.SHAPES) | set(synthetic.SIZES) | {"above", "below"}
    assert words and not words & old
    with pytest.raises(ValueError):
        synthetic.make_dataset(tmp_path / "c", n_train=1, n_val=0, n_test=0, style="nope", progress=False)


def test_dropout_zero_makes_training_mode_deterministic(tiny_lm_dir, tiny_first_stage_dir):
    from edje_search.models.first_stage import FirstStage
    from edje_search.training.reranker import new_reranker, set_dropout

    fs = FirstStage.from_pretrained(tiny_first_stage_dir)
    rr = new_reranker(fs, RerankerTrainConfig(n_queries=4, mlp_dim=64, dropout=0.0), tiny_lm_dir).train()
    assert rr.language_model.config.hidden_dropout_prob == rr.language_model.config.attention_probs_dropout_prob == 0
    tokens = torch.randn(2, 4, rr.token_width)
    logits = [rr.pair_logits(["a red circle", "two blue squares"], tokens) for _ in range(2)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    set_dropout(rr.language_model, 0.5)  # a built model (--init-from): modules and config
    assert not torch.equal(rr.pair_logits(["a red circle", "two blue squares"], tokens), logits[0])
    assert all(m.p == 0.5 for m in rr.language_model.modules() if isinstance(m, torch.nn.Dropout))


def test_features_of_another_first_stage_are_recomputed_and_cached(tmp_path, shapes_dir, tiny_first_stage_dir):
    from edje_search.models.first_stage import FirstStage
    from edje_search.training.features import compute_features, load_cached_features, features_key

    data = read_captions(shapes_dir / "train.json")
    fs = FirstStage.from_pretrained(tiny_first_stage_dir).eval()
    first = compute_features(fs, data, cache=tmp_path / "a.pt", num_workers=0, progress=False)
    other = FirstStage.from_pretrained(tiny_first_stage_dir).eval()
    with torch.no_grad():
        next(other.clip.visual.parameters()).mul_(2.0)
    again = compute_features(other, data, cache=tmp_path / "b.pt", reuse=tmp_path / "a.pt", num_workers=0,
                             progress=False)
    assert not torch.equal(first.image_emb, again.image_emb)  # computed by the other model, not reused
    assert load_cached_features(tmp_path / "b.pt", features_key(other, data)) is not None
    reused = compute_features(fs, data, reuse=tmp_path / "a.pt", progress=False)
    assert torch.equal(reused.vision_tokens, first.vision_tokens)
