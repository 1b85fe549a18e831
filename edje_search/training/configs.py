"""What a training run is told: frozen dataclasses, saved as ``train_config.json`` beside each run.

They import nothing heavy, so the command line builds its ``train`` flags from them (each field
with a ``help`` is a flag, named after the field, with the field's default): one place defines an
option's name, default and meaning. ``edje-search train ... --config FILE`` reads a saved config
and flags given on the command line override it.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def flag(default: Any, help: str, **click: Any) -> Any:
    """A config field that is also a command-line flag (``click`` holds extra click.option settings)."""
    return dataclasses.field(default=default, metadata={"help": help, "click": click})


@dataclasses.dataclass(frozen=True)
class FirstStageTrainConfig:
    image_size: int = flag(48, "Input resolution of the image tower.")
    patch_size: int = 8
    width: int = flag(128, "Width of the ViT image tower.")
    layers: int = flag(4, "Depth of the ViT image tower.")
    head_width: int = 32
    embed_dim: int = 128
    context_length: int = 16
    steps: int | None = flag(400, "Optimizer steps (each --batch-size captions). The loss should end well below "
                                  "chance, ln(batch size); a warning says when it did not.")
    epochs: float | None = flag(None, "Passes over the captions instead of --steps (small data sets need many).",
                                type=float)
    batch_size: int = flag(256, "Captions per optimizer step.")
    lr: float = flag(1e-3, "Peak learning rate (linear warm-up, then cosine decay).")
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    precision: str = flag("fp32", "bf16 autocast pays on GPUs; on CPUs it is often slower for training.",
                          type=("choice", ("fp32", "bf16")))
    seed: int = flag(0, "Random seed.")


@dataclasses.dataclass(frozen=True)
class RerankerTrainConfig:
    variant: str = flag("compressed", "compressed: attention adapter to --n-queries tokens; local: keep every "
                                      "vision token.", type=("choice", ("compressed", "local")))
    n_queries: int = flag(16, "Stored tokens per image (compressed variant).")
    mlp_dim: int = flag(8192, "Hidden width of the adapter MLP.")
    lm_layers: int | None = flag(None, "Keep only the first N language-model layers (default: all).", type=int)
    score_head: str = flag("pooler", "What the score head reads: pooler = the paper's BERT pooler on the first "
                                     "position; mean = the mean of every position, which a mean-pooled sentence "
                                     "model (the bundled MiniLM) can match with from the first steps.",
                           type=("choice", ("pooler", "mean")))
    dropout: float | None = flag(None, "Dropout of the joint encoder while training (default: its checkpoint's, "
                                       "0.1 for MiniLM). 0 makes a CPU step about 7% cheaper and suits short runs "
                                       "that see most captions once at most.", type=("float_range", 0.0, 1.0))
    adapter_warmup: int = flag(0, "Steps of caption-word warm-up of a fresh adapter before the joint encoder "
                                  "trains: its tokens learn to resemble the word embeddings of their image's "
                                  "caption, so matching starts learning at once instead of after 100+ steps at "
                                  "chance. Cheap (no joint-encoder pass).")
    adapter_warmup_lr: float = 1e-3
    max_text_len: int = 64
    steps: int = flag(1000, "Optimizer steps.")
    batch_size: int = flag(32, "Pairs per process per micro-batch.")
    grad_accum: int = flag(1, "Micro-batches per optimizer step.")
    lr: float = flag(1e-4, "Peak learning rate (linear warm-up, then cosine decay).")
    weight_decay: float = flag(0.05, "AdamW weight decay (not applied to biases and norms).")
    warmup_fraction: float = 0.05
    new_module_lr_scale: float = 1.0  # >1 trains the fresh adapter and heads faster (unstable above ~3)
    neighbour_group: int = flag(1, "Build batches from groups of N images the first stage finds close to one "
                                   "caption, so in-batch negatives are as hard as the top-k reranked at query "
                                   "time (1 = random batches).")
    mining_pool: int = flag(0, "Mine each pair's negatives among this many pairs: the global batch plus random "
                               "others (first-stage features are cached, so a large pool costs no encoder passes; "
                               "the paper mines over 8 x 32 = 256). 0 = the global batch only.")
    mining_pool_from: int = flag(0, "Optimizer steps of in-batch negatives before --mining-pool is used (0 = the "
                                    "pool from the first step). A fresh joint encoder learns the coarse "
                                    "distinctions first, then the finer ones the pool offers.",
                                 type=("int_range", 0, None))
    w_itm: float = flag(1.0, "Weight of the matching loss.")
    w_match: float = flag(0.0, "Weight of a pointwise match loss: each positive pair and each hard negative "
                               "scored on its own (binary cross-entropy), so the logit's level means the same "
                               "for every caption. The matching loss only ranks a pair against its negative; "
                               "this one is what a relevance cutoff (--min-prob) needs. 0 = off (the paper's "
                               "recipe).", type=("float_range", 0.0, None))
    w_swap: float = flag(0.0, "Weight of swapped-caption negatives: each caption against a copy with two of "
                              "its words of one class swapped (\"red\" <-> \"blue\", classes learned from the "
                              "training captions), on the caption's own image. Teaches attribute binding and "
                              "word order; costs a quarter more per step. 0 = off.",
                          type=("float_range", 0.0, None))
    w_mlm: float = flag(1.0, "Weight of masked-LM (0 for fine-tuning).")
    w_recovery: float = flag(1.0, "Weight of text-embedding recovery.")
    w_distill: float = flag(1.0, "Weight of distillation (used only with --teacher).")
    mlm_probability: float = 0.5
    precision: str = flag("fp32", "bf16 autocast pays on GPUs; on CPUs it is often slower for training.",
                          type=("choice", ("fp32", "bf16")))
    checkpoint_every: int = 100
    seed: int = flag(0, "Random seed.")
    # auto mode (edje_search/training/auto.py)
    auto: bool = flag(False, "Size the run from the data instead of --steps and --mining-pool-from: at most "
                             "--max-epochs passes, cut to --max-minutes; validation recall on a split carved "
                             "from the training images (or --val-data) switches the hard-negative pool on when "
                             "the in-batch curve plateaus and stops the run after --patience validations "
                             "without gain; the best validated weights are saved. Writes OUT/val_curve.json "
                             "and OUT/val_curve.png.", is_flag=True)
    max_minutes: float | None = flag(None, "Time budget of the run in minutes, from start to saved model (auto "
                                           "mode plans its length to fit; a fixed run stops when it is spent).",
                                     type=float)
    max_epochs: float = flag(2.0, "Auto mode: the most passes over the training captions.")
    val_images: int = flag(1000, "Auto mode: validation images carved from the training images when --val-data "
                                 "is not given (at most a tenth of them). A small gallery overstates the gain.")
    val_queries: int = flag(300, "Auto mode: validation images whose captions (t2i) and themselves (i2t) are "
                                 "queried, each against the whole validation gallery.")
    val_rerank_k: int = flag(10, "Auto mode: first-stage candidates reranked when validating.")
    val_every: int = flag(0, "Auto mode: steps between validations (0: chosen, 3-12 per run).")
    patience: int = flag(3, "Auto mode: validations without a gain of --min-delta, hard-negative pool on, "
                            "before the run stops.")
    min_delta: float = flag(0.5, "Auto mode: the gain in mean R@1 (points, both directions) that counts as "
                                 "improving.")
