"""The joint encoder: a BERT that reads a caption and an image's stored tokens together.

Input layout (docs/architecture.md): the tokenizer's pair encoding of (caption, <image> x m), i.e.
``[CLS] caption [SEP] <image> ... <image> [SEP]`` with token types 0/1, and the word
embeddings at the ``<image>`` positions replaced by the m image tokens, in order.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import BatchEncoding, BertConfig, BertForMaskedLM, PreTrainedTokenizerBase
from transformers.models.bert.modeling_bert import BertPooler


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    captions: list[str],
    n_image_tokens: int,
    image_token: str,
    max_text_len: int,
) -> BatchEncoding:
    """Pair-encode captions with ``n_image_tokens`` image placeholders.

    Only the caption is truncated; the total length is capped at ``max_text_len + n_image_tokens``.
    Returns input_ids, token_type_ids and attention_mask, each (B, L), padded on the right.
    """
    # <image> is a registered special token, so the tokenizer never splits it: the second
    # segment is exactly n_image_tokens tokens long.
    placeholders = image_token * n_image_tokens
    return tokenizer(
        [str(c) for c in captions],
        [placeholders] * len(captions),
        truncation="only_first",
        max_length=max_text_len + n_image_tokens,
        padding=True,
        padding_side="right",  # score_pairs cuts batches to their longest caption from the right
        return_tensors="pt",
    )


def check_image_slots(input_ids: torch.Tensor, image_token_id: int, n_image_tokens: int) -> None:
    """Every sequence must hold exactly ``n_image_tokens`` <image> placeholders."""
    counts = (input_ids == image_token_id).sum(dim=1)
    if not bool((counts == n_image_tokens).all()):
        raise ValueError(f"each sequence needs {n_image_tokens} <image> positions, got {counts.tolist()}")


SCORE_HEADS = ("pooler", "mean")


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, H) over the positions where ``attention_mask`` (B, L) is 1 -> (B, H)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class JointEncoder(nn.Module):
    """BERT masked-LM body + pooler/linear score head + text-embedding recovery head.

    ``score_head`` picks what the head reads: ``"pooler"`` (the paper, and every converted
    checkpoint) is the BERT pooler on the first position; ``"mean"`` feeds the same dense +
    tanh + linear the mean over every unmasked position. A sentence model trained with mean
    pooling (all-MiniLM-L6) carries its meaning in the mean from the first step, while its
    first-position state is nearly constant and must be retrained before matching can learn.
    """

    def __init__(self, bert_config: BertConfig, image_token_id: int, text_embed_dim: int = 0,
                 score_head: str = "pooler"):
        super().__init__()
        if score_head not in SCORE_HEADS:
            raise ValueError(f"score_head must be one of {SCORE_HEADS}, got {score_head!r}")
        self.score_head = score_head
        self.image_token_id = image_token_id
        self.language_model = BertForMaskedLM(bert_config)
        hidden = bert_config.hidden_size
        # classification_head.0 = BERT pooler (dense + tanh on position 0), .1 = score linear
        self.classification_head = nn.Sequential(BertPooler(bert_config), nn.Linear(hidden, 1))
        self.text_projection = nn.Linear(hidden, text_embed_dim) if text_embed_dim else None

    @property
    def hidden_size(self) -> int:
        return self.language_model.config.hidden_size

    def embed_inputs(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """Word embeddings (B, L, H) with the <image> positions replaced by ``image_tokens`` (B, m, H).

        Written with gather/where (no data-dependent indexing) so the graph exports to ONNX;
        :func:`check_image_slots` validates the placeholder count beforehand.
        """
        embeds = self.language_model.bert.embeddings.word_embeddings(input_ids)  # (B, L, H)
        if image_tokens is None:
            return embeds
        is_image = input_ids == self.image_token_id  # (B, L)
        slot = (is_image.long().cumsum(dim=1) - 1).clamp(min=0)  # i-th <image> position reads image token i
        picked = torch.gather(image_tokens.to(embeds.dtype), 1,
                              slot.unsqueeze(-1).expand(-1, -1, image_tokens.shape[-1]))
        return torch.where(is_image.unsqueeze(-1), picked, embeds)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        image_tokens: torch.Tensor | None,
    ) -> torch.Tensor:
        """Last hidden state (B, L, H) of the pair sequence."""
        if image_tokens is not None and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            check_image_slots(input_ids, self.image_token_id, image_tokens.shape[1])
        embeds = self.embed_inputs(input_ids, image_tokens)
        out = self.language_model.bert(
            inputs_embeds=embeds, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        return out.last_hidden_state

    def score_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One logit per pair: (B, L, H) -> (B,); the mean head needs the pairs' ``attention_mask`` (B, L)."""
        if self.score_head == "pooler":
            return self.classification_head(hidden).squeeze(-1)
        pooler, linear = self.classification_head
        if attention_mask is None:
            raise ValueError("the mean score head needs the attention mask of the pairs")
        pooled = pooler.activation(pooler.dense(masked_mean(hidden, attention_mask)))  # (B, H)
        return linear(pooled).squeeze(-1)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Masked-LM vocabulary logits (B, L, V)."""
        return self.language_model.cls(hidden)

    def recover_text_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Caption alone -> predicted first-stage text embedding (B, D_text)."""
        if self.text_projection is None:
            raise RuntimeError("this joint encoder has no text-embedding recovery head")
        out = self.language_model.bert(input_ids=input_ids, attention_mask=attention_mask)
        return self.text_projection(out.last_hidden_state[:, 0])
