"""Rules for what callers hand the library, shared by the Python API, the CLI and the server.

One place decides what a search query may hold and which path arguments a destructive command
accepts, so ``Engine.search``, ``edje-search query`` and ``GET /search`` refuse the same
things with the same words.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Iterable

from .errors import BadInput, BadQuery

MAX_QUERY_CHARS = 2000
# Rows are SQLite INTEGERs (signed 64-bit): anything outside is no row, and must never reach SQLite,
# which raises OverflowError for it.
MAX_ROW = 2**63 - 1
# Line breaks and tabs are ordinary in pasted text; every other control character (NUL, escape
# sequences, C1 controls) is refused: it is never meaningful to the text encoder and NUL breaks
# C tokenizers and log lines.
_ALLOWED_CONTROLS = frozenset("\t\n\r")


def check_query(text: object, max_chars: int = MAX_QUERY_CHARS) -> str:
    """``text`` if it is a usable search query, else :class:`BadQuery` saying why.

    Refused: anything that is not a str, empty or blank text, text that cannot be encoded as
    UTF-8 (lone surrogates), control characters other than tab and line breaks, and more than
    ``max_chars`` characters.
    """
    if not isinstance(text, str) or not text.strip():
        raise BadQuery("empty query: give some text to search for")
    if len(text) > max_chars:
        raise BadQuery(f"query too long ({len(text)} characters; the limit is {max_chars})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadQuery("query is not valid UTF-8 text") from e
    for i, ch in enumerate(text):
        if ch not in _ALLOWED_CONTROLS and unicodedata.category(ch) == "Cc":
            name = "a NUL character" if ch == "\x00" else f"a control character (U+{ord(ch):04X})"
            raise BadQuery(f"query contains {name} at position {i}")
    return text


def check_min_prob(min_prob: float | None, rerank_k: int, names: tuple[str, str] = ("min_prob", "rerank_k")) -> None:
    """A relevance cutoff must be a probability, and needs reranked hits to cut (BadQuery otherwise).
    ``names``: what the caller calls the two (the command line's flags, the library's arguments)."""
    if min_prob is None:
        return
    if isinstance(min_prob, bool) or not isinstance(min_prob, (int, float)) or not 0.0 <= min_prob <= 1.0:
        raise BadQuery(f"{names[0]} must be a number between 0 and 1 (got {min_prob!r})")
    if rerank_k <= 0:
        raise BadQuery(f"{names[0]} cuts on the joint encoder's probability, which only reranked hits have: "
                       f"{names[1]} must be at least 1")


def check_row(row: int) -> int:
    """``row`` if it can name a row at all (0 .. 2**63-1), else :class:`BadInput`."""
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row <= MAX_ROW:
        raise BadInput(f"row must be an integer between 0 and {MAX_ROW} (got {row!r})")
    return row


def removal_paths(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[str]:
    """The absolute paths a removal names, refusing empty or blank arguments with :class:`BadInput`.

    ``os.path.abspath("")`` is the current folder, so an unset shell variable (``remove "$F"``)
    would otherwise name everything under it. A single str or path is one argument, not a
    sequence of characters.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    out = []
    for p in paths:
        text = os.fsdecode(p) if isinstance(p, (bytes, os.PathLike)) else p
        if not isinstance(text, str) or not text.strip():
            raise BadInput(f"refusing an empty path argument ({text!r}): name the files or folders to remove")
        if "\x00" in text:
            raise BadInput("a path cannot contain a NUL character")
        out.append(os.path.abspath(text))
    if not out:
        raise BadInput("no paths given: name the files or folders to remove")
    return out


def check_removal_size(n_removing: int, n_live: int, allow_all: bool, paths: list[str]) -> None:
    """Refuse (:class:`BadInput`) a removal that would empty a non-empty index unless ``allow_all``."""
    if n_live and n_removing >= n_live and not allow_all:
        shown = ", ".join(str(Path(p)) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
        raise BadInput(f"{shown} holds every image in the index ({n_live}); pass --all (or --yes), "
                       f"allow_all=True in Python, to remove them all")
