"""Training the EDJE reranker (adapter + joint encoder) behind a frozen first stage.

Each step: a batch of (caption, image) pairs, one hard negative image and one hard negative
caption per pair mined by first-stage similarity over the global batch, then
ITM + MLM + text-embedding recovery (+ distillation from a trained teacher).
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, PreTrainedTokenizerBase

from ..data.annotations import CaptionSet
from ..devices import pick_device, precision_autocast
from ..errors import BadInput, CheckpointError
from ..models.bundle import EdjeModel
from ..models.first_stage import FirstStage
from ..models.registry import build_reranker, bundled_minilm_dir
from ..models.reranker import Reranker
from . import auto as auto_mode
from .configs import RerankerTrainConfig
from .common import (TrainLog, all_gather_cat, data_parallel, gradient_sync, init_distributed,
                     is_main_process, load_checkpoint, make_optimizer, save_checkpoint, seed_everything)
from .batches import PairBatches, first_stage_neighbours
from .features import FEATURES_NAME, TrainFeatures, compute_features
from .caption_swaps import WordClasses
from .losses import distillation_loss, itm_loss, mask_caption_tokens, match_loss, mlm_loss, recovery_loss, swap_loss
from .mining import match_groups, mine_hard_negatives
from .warmup import warm_up_adapter

logger = logging.getLogger(__name__)


def new_reranker(first_stage: FirstStage, cfg: RerankerTrainConfig, lm_dir: Path | None = None) -> Reranker:
    """A reranker whose joint encoder starts from the BERT weights in ``lm_dir`` (default: bundled MiniLM-L6)."""
    lm_dir = Path(lm_dir) if lm_dir else bundled_minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    bert_config = BertConfig.from_pretrained(str(lm_dir))
    if cfg.lm_layers:
        bert_config.num_hidden_layers = cfg.lm_layers
    if cfg.dropout is not None:
        bert_config.hidden_dropout_prob = bert_config.attention_probs_dropout_prob = cfg.dropout
    reranker = build_reranker(first_stage, bert_config, tokenizer, variant=cfg.variant, n_queries=cfg.n_queries,
                              mlp_dim=cfg.mlp_dim, max_text_len=cfg.max_text_len)
    if cfg.score_head != reranker.config.score_head:
        reranker = Reranker(dataclasses.replace(reranker.config, score_head=cfg.score_head), bert_config, tokenizer)
    load_bert_weights(reranker.language_model, lm_dir)
    return reranker


def _read_weights(lm_dir: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = lm_dir / name
        if path.is_file():
            return load_file(str(path)) if name.endswith(".safetensors") else torch.load(
                path, map_location="cpu", weights_only=True)
    raise CheckpointError(f"{lm_dir}: no model.safetensors or pytorch_model.bin")


_VOCAB_SIZED = ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias", "cls.predictions.decoder.bias")


def load_bert_weights(language_model: BertForMaskedLM, lm_dir: Path) -> None:
    """Copy a BERT checkpoint (a sentence model's ``BertModel`` or a ``BertForMaskedLM``) into ``language_model``.

    Done by hand instead of ``from_pretrained`` so that the expected differences are one log
    line, not transformers' load report: a sentence model has no masked-LM head (it starts
    fresh, its decoder tied to the word embeddings), its BERT pooler is unused (the score head
    has its own), layers beyond ``num_hidden_layers`` are dropped, and the ``<image>`` row of
    the word embeddings starts at the mean of the others.
    """
    weights = {k.removeprefix("bert."): v for k, v in _read_weights(lm_dir).items()}
    target = language_model.state_dict()
    loaded, dropped = {}, []
    for key, value in weights.items():
        name = key if key.startswith("cls.") else "bert." + key
        if key.endswith("position_ids"):  # a buffer older checkpoints saved; rebuilt by the model
            continue
        if name not in target:
            dropped.append(key)
            continue
        if name in _VOCAB_SIZED and value.shape[0] < target[name].shape[0]:  # rows for the added <image>
            extra = target[name].shape[0] - value.shape[0]
            fill = value.mean(dim=0, keepdim=True) if value.ndim == 2 else torch.zeros(1, dtype=value.dtype)
            value = torch.cat([value, fill.expand(extra, *value.shape[1:])])
        if value.shape != target[name].shape:
            raise CheckpointError(f"{lm_dir}: {key} has shape {tuple(value.shape)}, the joint encoder "
                                  f"needs {tuple(target[name].shape)}")
        loaded[name] = value
    missing = [k for k in target if k not in loaded and k not in ("cls.predictions.decoder.weight",
                                                                   "cls.predictions.decoder.bias")]
    if any(k.startswith("bert.") for k in missing):
        raise CheckpointError(f"{lm_dir}: no weights for {[k for k in missing if k.startswith('bert.')][:5]}")
    language_model.load_state_dict(loaded, strict=False)
    language_model.tie_weights()
    logger.info("joint encoder from %s: %d tensors loaded; starting fresh: %s; unused: %s", lm_dir, len(loaded),
                sorted({".".join(k.split(".")[:2]) for k in missing}) or "nothing",
                sorted({".".join(k.split(".")[:3]) if k.startswith("encoder.layer.") else k.split(".")[0]
                        for k in dropped}) or "nothing")


def set_dropout(language_model: BertForMaskedLM, p: float) -> None:
    """Set every dropout of a built BERT (``--init-from``) to ``p``, and its config (what a saved model says).

    A fresh joint encoder gets ``p`` in its config before it is built (:func:`new_reranker`). The
    attention modules of transformers 4.x keep their own float copy (``dropout_prob``), set too.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    language_model.config.hidden_dropout_prob = p
    language_model.config.attention_probs_dropout_prob = p
    for module in language_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "dropout_prob", None), float):
            module.dropout_prob = p


def _special_mask(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    return torch.isin(ids, torch.tensor(tokenizer.all_special_ids, device=ids.device))


def train_reranker(first_stage_dir: str | Path, data: CaptionSet, out_dir: str | Path, cfg: RerankerTrainConfig,
                   *, teacher_dir: str | Path | None = None, init_from: str | Path | None = None,
                   lm_dir: str | Path | None = None, features_path: str | Path | None = None, name: str = "edje",
                   device: str | None = None, progress: bool = True, val_data: CaptionSet | None = None) -> EdjeModel:
    """Train and save an EDJE model directory at ``out_dir/model``; resumes from ``out_dir/train_state.pt``.

    ``features_path``: a feature file of this first stage on ``data`` (``train first-stage`` writes one),
    used instead of encoding the training set again when it matches. ``cfg.auto``: the run sizes
    itself on a validation curve (:mod:`.auto`), on ``val_data`` or images carved from ``data``.
    """
    start = time.monotonic()
    out_dir = Path(out_dir)
    _check_config(cfg)
    rank, world = init_distributed()
    if cfg.auto and world > 1:
        raise BadInput("--auto runs in one process (its validation decides for the run); drop torchrun or --auto")
    seed_everything(cfg.seed)
    dev = pick_device(device)
    first_stage = FirstStage.from_pretrained(first_stage_dir).to(dev).eval()
    for p in first_stage.parameters():
        p.requires_grad = False
    cache = out_dir / FEATURES_NAME
    if is_main_process():
        feats = compute_features(first_stage, data, cache=cache, reuse=features_path, progress=progress)
    if world > 1:
        dist.barrier()
    if not is_main_process():
        feats = compute_features(first_stage, data, cache=cache, reuse=features_path, progress=False)

    state_path = out_dir / "train_state.pt"
    state = load_checkpoint(state_path)
    auto = None
    if cfg.auto:
        data, feats, auto = auto_mode.prepare(first_stage, data, feats, cfg, out_dir, val_data=val_data,
                                              state=(state or {}).get("auto"), start=start, progress=progress)
    reranker = (EdjeModel.from_pretrained(init_from).reranker if init_from else new_reranker(first_stage, cfg, lm_dir))
    if cfg.dropout is not None and init_from:
        set_dropout(reranker.language_model, cfg.dropout)
    reranker.to(dev).train()
    if cfg.adapter_warmup and init_from is None and state is None:
        warm_up_adapter(reranker, feats.vision_tokens, data.captions, np.asarray(data.caption_image),
                        steps=cfg.adapter_warmup, lr=cfg.adapter_warmup_lr, seed=cfg.seed)
    seed_everything(cfg.seed + rank)  # identical replicas, different dropout and MLM masks
    teacher = None
    if teacher_dir is not None and cfg.w_distill > 0:
        teacher = EdjeModel.from_pretrained(teacher_dir).reranker.to(dev).eval()
        for p in teacher.parameters():
            p.requires_grad = False
    fresh = [p for n, p in reranker.named_parameters() if not n.startswith("language_model.")]
    total = auto.total if auto else cfg.steps
    opt, sched = make_optimizer(reranker.parameters(), cfg.lr, cfg.weight_decay,
                                int(cfg.warmup_fraction * total), total,
                                fast_params=[] if init_from else fresh, fast_lr_scale=cfg.new_module_lr_scale,
                                sized=auto is not None)
    step = 0
    neighbours = (first_stage_neighbours(feats.text_emb, feats.image_emb, 4 * cfg.neighbour_group)
                  if cfg.neighbour_group > 1 else None)
    batches = PairBatches(np.asarray(data.caption_image), cfg.batch_size * world, cfg.seed,
                          neighbours=neighbours, group=cfg.neighbour_group)
    if state is not None:
        reranker.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        batches.rng.bit_generator.state = state["batch_rng"]
        batches.queue = state["batch_queue"]
    groups = torch.from_numpy(match_groups(data.image_ids, data.caption_image, data.captions))
    caption_image = torch.tensor(data.caption_image)
    swaps = None
    if cfg.w_swap:
        classes = WordClasses.fit(data.captions)
        rng = random.Random(cfg.seed)
        swaps = [classes.swap(c, rng) for c in data.captions]
        logger.info("swapped-caption negatives for %d of %d captions; word classes: %s",
                    sum(s is not None for s in swaps), len(swaps), "; ".join(" ".join(c) for c in classes.classes[:8]))
    tok = reranker.tokenizer
    log = TrainLog(out_dir / "train_log.jsonl", step) if is_main_process() else None
    bar = tqdm(total=total, initial=step, desc=f"reranker ({cfg.variant})", dynamic_ncols=True,
               disable=not (progress and is_main_process()))
    # torch DDP under torchrun: replicas start from rank 0's parameters, gradients averaged in backward
    train_step = data_parallel(reranker, step_losses)
    if auto is not None:
        auto.begin(step, reranker, sched)
    while step < (auto.total if auto else cfg.steps) and not (auto and auto.should_stop()):
        opt.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            global_caps = torch.from_numpy(batches.next())
            local = global_caps[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            # every process contributes its pairs to the gathered global batch used for mining
            global_caps = all_gather_cat(local)
            pool_size = auto.pool_size(step) if auto else cfg.mining_pool if step >= cfg.mining_pool_from else 0
            if micro == 0 and not auto and step == cfg.mining_pool_from > 0:  # checked above: a pool is set
                logger.info("step %d: mining negatives among %d pairs from now on", step, pool_size)
            pool_caps = _mining_pool(global_caps, len(data.captions), pool_size, (cfg.seed, step, micro))
            with gradient_sync(train_step, last_micro_batch=micro == cfg.grad_accum - 1):
                losses = train_step(teacher, feats, data.captions, global_caps, pool_caps,
                                    rank * cfg.batch_size, cfg.batch_size, caption_image, groups, tok, cfg, dev, swaps)
                total = sum(losses.values())
                (total / cfg.grad_accum).backward()
            for k, v in losses.items():
                logs[k] = logs.get(k, 0.0) + v.item() / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(reranker.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()})
        if log is not None:
            log.write(step, **logs)
        validated = auto.after_step(step, reranker, sched) if auto else False
        bar.total = auto.total if auto else bar.total
        out_of_time = auto is None and cfg.max_minutes is not None and time.monotonic() - start > 60 * cfg.max_minutes
        last = step == (auto.total if auto else cfg.steps) or out_of_time or (auto and auto.should_stop())
        if is_main_process() and (step % cfg.checkpoint_every == 0 or last or validated):
            save_checkpoint(state_path, model=reranker.state_dict(), optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), step=step, batch_rng=batches.rng.bit_generator.state,
                            batch_queue=batches.queue, auto=auto.state_dict() if auto else None)
        if out_of_time:
            logger.info("step %d: --max-minutes %g spent, stopping", step, cfg.max_minutes)
            break
    bar.close()
    if auto is not None:
        auto.finish(reranker)
    reranker.eval()
    model = EdjeModel(first_stage.cpu(), reranker.cpu(), name=name)
    if is_main_process():
        model.save_pretrained(out_dir / "model")
    if world > 1:
        dist.barrier()
    return model


def _check_config(cfg: RerankerTrainConfig) -> None:
    if cfg.auto:
        if cfg.mining_pool_from:
            raise BadInput("--auto switches the hard-negative pool on from its validation curve: drop "
                           "--mining-pool-from")
        if cfg.val_images < 2 or cfg.val_queries < 1 or cfg.patience < 1 or cfg.max_epochs <= 0:
            raise BadInput("--auto needs --val-images >= 2, --val-queries >= 1, --patience >= 1 and --max-epochs > 0")
    elif cfg.mining_pool_from and not (cfg.mining_pool and 0 < cfg.mining_pool_from < cfg.steps):
        raise BadInput(f"--mining-pool-from {cfg.mining_pool_from} needs --mining-pool and a step in "
                       f"(0, {cfg.steps}): it would never switch the pool on")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise BadInput("--max-minutes must be > 0")


def _mining_pool(global_caps: torch.Tensor, n_captions: int, size: int, seed: tuple[int, ...]) -> torch.Tensor:
    """Caption indices to mine negatives from: the global batch, then random captions up to ``size``.

    Seeded by (seed, step, micro-batch), so every process draws the same pool and a resumed run
    the same pools as an uninterrupted one.
    """
    extra = size - len(global_caps)
    if extra <= 0:
        return global_caps
    rng = np.random.default_rng(list(seed))
    return torch.cat([global_caps, torch.from_numpy(rng.integers(0, n_captions, extra))])


def step_losses(reranker: Reranker, teacher: Reranker | None, feats: TrainFeatures, captions: list[str],
                global_caps: torch.Tensor, pool_caps: torch.Tensor, offset: int, size: int,
                caption_image: torch.Tensor, groups: torch.Tensor, tok: PreTrainedTokenizerBase,
                cfg: RerankerTrainConfig, dev: torch.device,
                swaps: list[str | None] | None = None) -> dict[str, torch.Tensor]:
    """The weighted losses of one micro-batch, keyed ``itm``/``match``/``swap``/``mlm``/``recovery``/
    ``distill`` (those with a non-zero weight; ``distill`` only with a teacher, ``swap`` only with
    ``swaps``).

    The micro-batch is captions ``global_caps[offset:offset + size]`` (caption indices; ``global_caps``
    (G,) is the gathered global batch) with their images, and one hard negative image and caption
    each mined among the pairs of ``pool_caps`` (P,) by first-stage similarity. ``swaps[i]``, when
    given, is caption i with two of its words swapped (caption_swaps.py): a negative for image i.
    """
    caps = global_caps[offset:offset + size]
    imgs = caption_image[caps]
    p_img = caption_image[pool_caps]
    neg_img, neg_cap = mine_hard_negatives(
        feats.text_emb[caps], feats.image_emb[imgs], groups[imgs],
        pool=(feats.text_emb[pool_caps], feats.image_emb[p_img], groups[p_img]))
    neg_imgs = p_img[neg_img]
    neg_caps = pool_caps[neg_cap]
    b = len(caps)
    pair_caps = [captions[i] for i in torch.cat([caps, caps, neg_caps]).tolist()]
    pair_imgs = torch.cat([imgs, neg_imgs, imgs])
    swapped = [i for i, c in enumerate(caps.tolist()) if swaps is not None and swaps[c] is not None]
    if swapped:  # a fourth group of pairs: (swapped caption i, image i)
        pair_caps += [swaps[caps[i]] for i in swapped]
        pair_imgs = torch.cat([pair_imgs, imgs[swapped]])
    vision = feats.vision_tokens[pair_imgs].to(dev).float()  # (3B + S, n, D_v)
    losses: dict[str, torch.Tensor] = {}
    with precision_autocast(dev, cfg.precision):
        projected = reranker.project(vision)  # (3B, m, H)
        hidden, pair_batch = reranker.pair_hidden(pair_caps, projected)
        logits = reranker.joint.score_hidden(hidden, pair_batch["attention_mask"]).float()  # (3B,)
        pos, n_img, n_cap = logits[:b], logits[b:2 * b], logits[2 * b:3 * b]
        if cfg.w_itm:
            losses["itm"] = cfg.w_itm * itm_loss(pos, n_img, n_cap)
        if cfg.w_match:
            losses["match"] = cfg.w_match * match_loss(pos, n_img, n_cap)
        if swapped:
            losses["swap"] = cfg.w_swap * swap_loss(pos[swapped], logits[3 * b:])
        if cfg.w_mlm:
            batch = reranker.encode_text(pair_caps[:b], projected.shape[1]).to(dev)
            ids, labels = mask_caption_tokens(batch["input_ids"], batch["token_type_ids"],
                                              _special_mask(tok, batch["input_ids"]), tok.mask_token_id,
                                              cfg.mlm_probability)
            h = reranker.joint(ids, batch["attention_mask"], batch["token_type_ids"], projected[:b])
            picked = labels != -100
            losses["mlm"] = cfg.w_mlm * mlm_loss(reranker.joint.mlm_logits(h[picked]), labels[picked])
        if cfg.w_recovery and reranker.text_projection is not None:
            enc = tok(pair_caps[:b], truncation=True, max_length=cfg.max_text_len + 2, padding=True,
                      return_tensors="pt").to(dev)
            pred = reranker.joint.recover_text_embedding(enc["input_ids"], enc["attention_mask"])
            losses["recovery"] = cfg.w_recovery * recovery_loss(pred, feats.text_emb[caps].to(dev))
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher.score(pair_caps, vision_tokens=vision)
            losses["distill"] = cfg.w_distill * distillation_loss(logits, t_logits)
    return losses
