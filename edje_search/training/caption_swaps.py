"""Swapped-caption negatives: the same words in another binding or order.

A joint encoder trained only on other images' captions as negatives learns which objects a
caption names, not how its words bind: "a red circle left of a blue square" and "a blue circle
left of a red square" name the same things. Training it to rank each caption above a copy with
two of its words swapped (NegCLIP's idea, ARO benchmark, Yuksekgonul et al. 2023) teaches the
binding that a first-stage cosine cannot see.

Which words may be swapped is learned from the training captions themselves, so the rule holds
for any caption language a data set uses, not a fixed vocabulary: two words are of one class
when they are seen between the same neighbours (colours sit between a size and a shape, shapes
before a relation, relations between two objects). A caption's negative swaps two different
words of one class ("red" <-> "blue", "circle" <-> "square") or, when it holds no such pair,
replaces one word by another of its class ("left" -> "right").

Why not a part-of-speech tagger (spaCy, NLTK): those bring models to download and still class
"red" and "small" alike (both adjectives), while swapping a size for a colour makes an easy,
ungrammatical negative. Context classes need nothing but the captions.
"""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from typing import Sequence

WORD = re.compile(r"[A-Za-z]+")
_EDGE = "<s>", "</s>"


class WordClasses:
    """Classes of interchangeable words, fitted on a caption corpus."""

    def __init__(self, classes: Sequence[Sequence[str]]):
        self.classes = [sorted(set(c)) for c in classes if len(set(c)) >= 2]
        self.class_of = {w: i for i, c in enumerate(self.classes) for w in c}

    @classmethod
    def fit(cls, captions: Sequence[str], *, min_count: int = 5, min_overlap: float = 0.5,
            max_captions: int = 50_000) -> "WordClasses":
        """Words seen ``min_count`` times or more, joined when the share of their (left, right)
        neighbour contexts they have in common (weighted Jaccard) reaches ``min_overlap``."""
        contexts: dict[str, Counter] = defaultdict(Counter)
        for caption in captions[:max_captions]:
            words = [_EDGE[0], *(w.lower() for w in WORD.findall(caption)), _EDGE[1]]
            for i in range(1, len(words) - 1):
                contexts[words[i]][(words[i - 1], words[i + 1])] += 1
        words = sorted(w for w, c in contexts.items() if sum(c.values()) >= min_count)
        parent = {w: w for w in words}

        def root(w: str) -> str:
            while parent[w] != w:
                parent[w] = parent[parent[w]]
                w = parent[w]
            return w

        totals = {w: sum(contexts[w].values()) for w in words}
        # overlap of every pair of words seen in a common context (no other pair has any), found
        # through the words of each context rather than by comparing all pairs of the vocabulary
        overlap: Counter = Counter()
        by_context: dict[tuple[str, str], list[str]] = defaultdict(list)
        for w in words:
            for k in contexts[w]:
                by_context[k].append(w)
        for k, ws in by_context.items():
            for i, a in enumerate(ws):
                for b in ws[i + 1:]:
                    overlap[a, b] += min(contexts[a][k] / totals[a], contexts[b][k] / totals[b])
        for (a, b), shared in overlap.items():
            if shared >= min_overlap:
                parent[root(a)] = root(b)
        groups: dict[str, list[str]] = defaultdict(list)
        for w in words:
            groups[root(w)].append(w)
        return cls(list(groups.values()))

    def swap(self, caption: str, rng: random.Random) -> str | None:
        """A caption with two different words of one class swapped, else one word replaced by
        another of its class; None when the caption has no word of any class."""
        found = [(m, self.class_of.get(m.group(0).lower())) for m in WORD.finditer(caption)]
        found = [(m, c) for m, c in found if c is not None]
        if not found:
            return None
        pairs = [(a, b) for i, (a, ca) in enumerate(found) for b, cb in found[i + 1:]
                 if ca == cb and a.group(0).lower() != b.group(0).lower()]
        if pairs:
            a, b = rng.choice(pairs)
            return (caption[:a.start()] + _cased(b.group(0), a.group(0)) + caption[a.end():b.start()]
                    + _cased(a.group(0), b.group(0)) + caption[b.end():])
        m, c = rng.choice(found)
        word = m.group(0).lower()
        other = rng.choice([w for w in self.classes[c] if w != word])
        return caption[:m.start()] + _cased(other, m.group(0)) + caption[m.end():]


def _cased(word: str, like: str) -> str:
    """``word`` written with the capitalisation of the word it replaces."""
    return word.capitalize() if like[:1].isupper() else word.lower()
