"""The reranker: adapter (vision tokens -> stored tokens) + joint encoder + tokenizer.

    reranker = Reranker.from_pretrained(MODEL_DIR)             # or MODEL_DIR/reranker
    reranker.score(captions, projected_tokens=stored)          # (B, m, D_lm) -> (B,) logits
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_model
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from ..config import RerankerConfig, load_config
from ..errors import BadInput, ModelMissing
from ..fsutil import atomic_write_text
from .adapter import TokenCompressor, local_projector
from .backends import PairScorer, make_scorer
from .first_stage import FirstStage
from .info import is_model_dir
from .joint_encoder import JointEncoder, check_image_slots, encode_pairs
from .loading import save_component, skip_init

CONFIG_NAME = "reranker.json"
BERT_CONFIG_NAME = "bert_config.json"
WEIGHTS_NAME = "reranker.safetensors"
TOKENIZER_DIR = "tokenizer"
# score_pairs copies the stored tokens to the accelerator in one piece up to this size
TOKENS_ON_DEVICE_BYTES = 1 << 30


def add_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str) -> int:
    """Register ``image_token`` as a special token (idempotent); return its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    return int(tokenizer.convert_tokens_to_ids(image_token))


def build_adapter(config: RerankerConfig, d_lm: int) -> nn.Module:
    if config.variant == "compressed":
        return TokenCompressor(config.vision_width, d_lm, config.n_queries, config.vision_heads,
                               config.mlp_dim, config.layer_norm_eps)
    return local_projector(config.vision_width, d_lm, config.mlp_dim)


class Reranker(nn.Module):
    """Scores (caption, image) pairs from vision tokens, stored tokens or pixels.

    Attribute names (``vision_projection``, ``language_model``, ``classification_head``,
    ``text_projection``) match the official EDJE checkpoint.
    """

    def __init__(self, config: RerankerConfig, bert_config: BertConfig, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        image_token_id = add_image_token(tokenizer, config.image_token)
        if bert_config.vocab_size != len(tokenizer):
            raise ValueError(f"BERT vocab {bert_config.vocab_size} != tokenizer size {len(tokenizer)} "
                             f"(the <image> token must be in both)")
        self.vision_projection = build_adapter(config, bert_config.hidden_size)
        encoder = JointEncoder(bert_config, image_token_id, config.text_embed_dim, config.score_head)
        # Registered flat so the state dict reads language_model.*, classification_head.*, ...
        self.language_model = encoder.language_model
        self.classification_head = encoder.classification_head
        self.text_projection = encoder.text_projection
        self._encoder = [encoder]  # not a submodule: its parameters are the three above
        # The first stage whose vision tower turns pixel_values into vision tokens, when attached;
        # held outside the module tree, so this reranker's state dict stays the reranker's own.
        self._vision: list[nn.Module] = []
        self._scorer: PairScorer | None = None  # None: eager, straight through the modules

    # ---------------------------------------------------------------------------- vision tower
    def attach_vision_encoder(self, first_stage: nn.Module) -> "Reranker":
        """Let ``score(pixel_values=...)`` run ``first_stage.encode_image``; returns self."""
        self._vision = [first_stage]
        return self

    @property
    def vision_encoder(self) -> nn.Module | None:
        """The attached first stage (see :meth:`attach_vision_encoder`), or None."""
        return self._vision[0] if self._vision else None

    def to(self, *args, **kwargs) -> "Reranker":
        """``nn.Module.to``, applied to the attached vision tower as well."""
        super().to(*args, **kwargs)
        for first_stage in self._vision:
            first_stage.to(*args, **kwargs)
        return self

    # ------------------------------------------------------------------------------- backends
    @property
    def backend(self) -> str:
        return "eager" if self._scorer is None else self._scorer.name

    def use_backend(self, backend: str, *, cache_dir: str | Path | None = None) -> "Reranker":
        """Run scoring through ``backend`` (see :mod:`edje_search.models.backends`); returns self."""
        example = self.encode_text(["an example caption to trace", "short"])  # the second is padded
        self._scorer = None if backend == "eager" else make_scorer(
            self.joint, backend, example, cache_dir=Path(cache_dir) if cache_dir else None)
        return self

    @property
    def joint(self) -> JointEncoder:
        return self._encoder[0]

    @property
    def token_width(self) -> int:
        return self.language_model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -------------------------------------------------------------------------------- forward
    def project(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Vision encoder tokens (B, n, D_v) -> stored tokens (B, m, D_lm)."""
        return self.vision_projection(vision_tokens)

    def encode_text(self, captions: list[str], n_image_tokens: int | None = None):
        n = self.config.tokens_per_image if n_image_tokens is None else n_image_tokens
        return encode_pairs(self.tokenizer, captions, n, self.config.image_token, self.config.max_text_len)

    def pair_hidden(self, captions: list[str], projected_tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Last hidden state (B, L, H) of each (caption, image) pair and the encoded batch."""
        batch = self.encode_text(captions, projected_tokens.shape[1]).to(projected_tokens.device)
        hidden = self.joint(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                            projected_tokens)
        return hidden, batch

    def pair_logits(self, captions: list[str], projected_tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B,) float32 of (caption, stored tokens (B, m, D_lm)) pairs through the modules, with
        autograd as the caller has it: the eager pass of :meth:`score`, and what training optimises."""
        hidden, batch = self.pair_hidden(captions, projected_tokens)
        return self.joint.score_hidden(hidden, batch["attention_mask"]).float()

    def score(
        self,
        captions: list[str],
        *,
        vision_tokens: torch.Tensor | None = None,
        projected_tokens: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One logit per (caption, image) pair, as a 1-D float tensor of length B (no grad).

        Give exactly one of ``vision_tokens`` (B, n, D_v), ``projected_tokens`` (B, m, D_lm)
        or ``pixel_values`` (B, 3, H, W; needs the vision tower, attached when loaded from a
        model directory). Runs in eval mode (no dropout, even on a module left in training mode)
        under ``torch.inference_mode()``; the result is an ordinary tensor, so ``.numpy()`` and
        later autograd code can use it.
        """
        given = [x is not None for x in (vision_tokens, projected_tokens, pixel_values)]
        if sum(given) != 1:
            raise BadInput("give exactly one of vision_tokens, projected_tokens, pixel_values")
        if len(captions) == 0:
            return torch.empty(0)
        with self._inference():
            logits = self._score(list(captions), vision_tokens, projected_tokens, pixel_values).float()
        return logits if torch.is_inference_mode_enabled() else logits.clone()  # clone: a normal tensor

    @contextlib.contextmanager
    def _inference(self):
        """Eval mode (no dropout) under ``torch.inference_mode()``; a module in training mode is put back."""
        was_training = self.training
        try:
            if was_training:
                self.eval()
            with torch.inference_mode():
                yield
        finally:
            if was_training:
                self.train()

    def _score(self, captions: list[str], vision_tokens: torch.Tensor | None, projected_tokens: torch.Tensor | None,
               pixel_values: torch.Tensor | None) -> torch.Tensor:
        if pixel_values is not None:
            if self.vision_encoder is None:
                raise ModelMissing("this reranker has no vision tower attached: load it with "
                                   "Reranker.from_pretrained(MODEL_DIR) or load_model(MODEL_DIR)")
            first_stage = self.vision_encoder
            vision_tokens = first_stage.encode_image(pixel_values.to(next(first_stage.parameters()).device))[1]
        if vision_tokens is not None:
            projected_tokens = self.project(vision_tokens.to(self.device))
        if projected_tokens.shape[0] != len(captions):
            raise BadInput(f"{len(captions)} captions but {projected_tokens.shape[0]} images")
        return self._score_encoded(self.encode_text(list(captions), projected_tokens.shape[1]), projected_tokens)

    def _score_encoded(self, batch, projected_tokens: torch.Tensor) -> torch.Tensor:
        """Logits of pair-encoded captions (``encode_text``'s fields) against stored tokens (B, m, D_lm)."""
        projected_tokens = projected_tokens.to(self.device, next(self.parameters()).dtype, non_blocking=True)
        ids, mask, types = (batch[k].to(self.device, non_blocking=True)
                            for k in ("input_ids", "attention_mask", "token_type_ids"))
        if self._scorer is None:
            hidden = self.joint(ids, mask, types, projected_tokens)
            return self.joint.score_hidden(hidden, mask).float()
        check_image_slots(ids, self.joint.image_token_id, projected_tokens.shape[1])
        return self._scorer(ids, mask, types, projected_tokens)

    def score_pairs(self, captions: Sequence[str], tokens: torch.Tensor, caption_idx: np.ndarray,
                    token_idx: np.ndarray, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Logits of the pairs (``captions[caption_idx[i]]``, ``tokens[token_idx[i]]``) -> (P,) float32.

        ``tokens`` (U, m, D_lm) are stored tokens. The one pair-scoring path of search and
        evaluation. Each caption is pair-encoded once, not once per pair, and the stored tokens
        go to the device in one copy when they fit in :data:`TOKENS_ON_DEVICE_BYTES`; pairs then
        run in batches sorted by caption length, each cut to its longest caption, so a batch pads
        to little: a GPU then runs at the joint encoder's own rate instead of waiting on the host.
        """
        caption_idx = np.asarray(caption_idx, dtype=np.int64).reshape(-1)
        token_idx = np.asarray(token_idx, dtype=np.int64).reshape(-1)
        if caption_idx.shape != token_idx.shape:
            raise BadInput(f"{caption_idx.size} caption indices but {token_idx.size} token indices")
        out = np.empty(len(caption_idx), dtype=np.float32)
        if len(out) == 0:
            return out
        used, caption_row = np.unique(caption_idx, return_inverse=True)
        encoded = self.encode_text([str(captions[i]) for i in used], tokens.shape[1])
        encoded = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        lengths = encoded["attention_mask"].sum(dim=1).numpy()[caption_row]  # padded on the right
        order = np.argsort(lengths, kind="stable")
        if self.device.type != "cpu" and tokens.numel() * tokens.element_size() <= TOKENS_ON_DEVICE_BYTES:
            tokens = tokens.to(self.device, non_blocking=tokens.is_pinned())
        with self._inference():
            for s in tqdm(range(0, len(order), batch_size), desc="reranking", disable=not progress, leave=False):
                sl = order[s:s + batch_size]
                rows = torch.from_numpy(caption_row[sl])
                width = int(lengths[sl].max())
                batch = {k: v[rows, :width] for k, v in encoded.items()}
                images = tokens[torch.from_numpy(token_idx[sl]).to(tokens.device)]
                out[sl] = self._score_encoded(batch, images).float().cpu().numpy()
        return out

    def rank(self, query: str, images_or_tokens, top_k: int | None = None, *,
             batch_size: int = 64) -> list[dict]:
        """``query`` against many images, best first: ``[{"corpus_id": i, "score": logit}, ...]``,
        in the shape of sentence-transformers' ``CrossEncoder.rank`` (ties keep input order).

        ``images_or_tokens``: stored tokens (N, m, D_lm) as a tensor or array, preprocessed pixels
        (N, 3, H, W), or a list of PIL images (the attached vision tower's preprocessing is applied).
        ``top_k`` keeps that many (None: all).
        """
        tokens = self._stored_tokens(images_or_tokens, batch_size)
        n = tokens.shape[0]
        logits = self.score_pairs([query], tokens, np.zeros(n, np.int64), np.arange(n), batch_size=batch_size)
        order = np.argsort(-logits, kind="stable")
        return [{"corpus_id": int(i), "score": float(logits[i])} for i in order[:top_k]]

    def _stored_tokens(self, items, batch_size: int) -> torch.Tensor:
        """Stored tokens (N, m, D_lm) on the CPU from stored tokens, pixels or PIL images."""
        if isinstance(items, np.ndarray):
            items = torch.from_numpy(items)
        if not isinstance(items, torch.Tensor):
            first_stage = self.vision_encoder
            if first_stage is None:
                raise ModelMissing("ranking images needs the vision tower: load with "
                                   "Reranker.from_pretrained(MODEL_DIR)")
            items = torch.stack([first_stage.preprocess(im.convert("RGB")) for im in items])
        if items.dim() == 3:
            if items.shape[2] != self.token_width:
                raise BadInput(f"stored tokens must be (N, m, {self.token_width}), got {tuple(items.shape)}")
            return items.float()
        if items.dim() != 4:
            raise BadInput(f"expected stored tokens (N, m, D) or pixels (N, 3, H, W), got {tuple(items.shape)}")
        if self.vision_encoder is None:
            raise ModelMissing("this reranker has no vision tower attached: load it with Reranker.from_pretrained")
        first_stage = self.vision_encoder
        out = []
        with self._inference():
            for s in range(0, items.shape[0], batch_size):
                pixels = items[s:s + batch_size].to(next(first_stage.parameters()).device)
                out.append(self.project(first_stage.encode_image(pixels)[1].to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.config.tokens_per_image, self.token_width)

    # ---------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Write a reranker directory (config, BERT config, tokenizer, weights); not the vision tower."""
        directory = save_component(directory, self.config, CONFIG_NAME, self, WEIGHTS_NAME)
        atomic_write_text(directory / BERT_CONFIG_NAME, self.language_model.config.to_json_string())
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Reranker":
        """Load from a model directory (``edje.json``, ``first_stage/``, ``reranker/``) or from its
        ``reranker/`` sub-directory. The first stage's vision tower is attached whenever the
        model directory has one, so all three inputs of :meth:`score` work."""
        directory = Path(directory)
        if is_model_dir(directory):
            reranker_dir, model_dir = directory / "reranker", directory
        elif (directory / CONFIG_NAME).is_file():
            reranker_dir, model_dir = directory, directory.parent
        else:
            raise ModelMissing(f"{directory} is neither a model directory (no edje.json) nor a reranker "
                               f"directory (no {CONFIG_NAME})")
        reranker = cls.from_reranker_dir(reranker_dir)
        if is_model_dir(model_dir) and (model_dir / "first_stage").is_dir():
            reranker.attach_vision_encoder(FirstStage.from_pretrained(model_dir / "first_stage").eval())
        return reranker

    @classmethod
    def from_reranker_dir(cls, directory: str | Path) -> "Reranker":
        """Load a reranker directory alone (no vision tower: ``score(pixel_values=...)`` is refused)."""
        directory = Path(directory)
        config = load_config(RerankerConfig, directory / CONFIG_NAME)
        bert_config = BertConfig.from_json_file(str(directory / BERT_CONFIG_NAME))
        tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZER_DIR))
        with skip_init():  # every weight comes from the file below
            model = cls(config, bert_config, tokenizer)
        model.language_model.tie_weights()  # the masked-LM decoder shares the word embeddings (skipped init)
        load_model(model, str(directory / WEIGHTS_NAME), strict=True)
        return model.eval()
