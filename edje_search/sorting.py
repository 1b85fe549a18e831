"""Ordering search hits by a metadata field (``query --sort``, ``search(sort=...)``).

Relevance chooses the hits (the top k, or those passing ``min_prob``); the sort then orders
those hits by one field. ``FIELD`` or ``+FIELD`` is ascending (oldest, smallest, A to Z first),
``-FIELD`` descending (newest, largest first). Hits without the field come last either way, and
hits with equal values keep their relevance order. Any field a filter can name is accepted
(docs/filters.md), plus ``date``: the EXIF date taken, or the file's modification time (UTC)
when the image has none. Numbers sort before text; other values (lists) as their JSON text.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, TypeVar

from .errors import BadQuery
from .storage import filtered_search
from .storage.filters import builtin_fields
from .storage.manifest import ManifestEntry

if TYPE_CHECKING:
    from .storage.index_store import IndexStore

DATE = "date"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SortKey:
    field: str
    descending: bool = False


def parse_sort(spec: str, has_user_field: Callable[[str], bool], describe_fields: Callable[[], str]) -> SortKey:
    """``"taken"``, ``"+size"``, ``"-date"`` -> SortKey; BadQuery naming the fields otherwise."""
    text = str(spec).strip()
    descending = text.startswith("-")
    name = text[1:].strip() if text[:1] in "+-" and text else text
    if not _NAME.fullmatch(name):
        raise BadQuery(f"cannot sort by {spec!r}: give a field name, '-' before it for descending; "
                       f"fields: {DATE}, {describe_fields()}")
    if name != DATE and name not in builtin_fields() and not has_user_field(name):
        raise BadQuery(f"cannot sort by {name!r}: no image has that field; fields: {DATE}, {describe_fields()}")
    return SortKey(name, descending)


def _utc_iso(ns: int) -> str:
    """A modification time as ISO text down to the microsecond: files copied within one second
    still sort by time (EXIF dates, to the second, sort before a file time in the same second)."""
    seconds, rest = divmod(int(ns), 10**9)
    when = dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(microsecond=rest // 1000)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f")


def field_value(entry: ManifestEntry | None, field: str):
    """The value ``field`` sorts by for one manifest entry, or None when it lacks it."""
    if entry is None:
        return None
    meta = entry.meta or {}
    if field == "path":
        return entry.path
    if field in ("size", "mtime"):
        got = entry.size if field == "size" else entry.mtime_ns
        return got if got is not None and got >= 0 else None
    if field == DATE:
        if meta.get("taken") is not None:
            return meta["taken"]
        return _utc_iso(entry.mtime_ns) if entry.mtime_ns is not None and entry.mtime_ns >= 0 else None
    return meta.get(field)


def _key(value) -> tuple:
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return (0, float(value), "")
    if isinstance(value, str):
        return (1, 0.0, value)
    return (2, 0.0, json.dumps(value, sort_keys=True))


def sort_by_field(items: Sequence[T], key: SortKey, row_of: Callable[[T], int],
                  entries: Mapping[int, ManifestEntry]) -> list[T]:
    """``items`` ordered by ``key``'s field of their rows' ``entries``; missing values last, ties
    in the given (relevance) order."""
    values = [field_value(entries.get(row_of(item)), key.field) for item in items]
    present = [(v, item) for v, item in zip(values, items) if v is not None]
    present.sort(key=lambda pair: _key(pair[0]), reverse=key.descending)  # stable either way
    return [item for _, item in present] + [item for v, item in zip(values, items) if v is None]


def sort_key(store: "IndexStore", spec: str) -> SortKey:
    """:func:`parse_sort` against the fields of an index's rows."""
    manifest = store.manifest
    return parse_sort(spec, filtered_search.has_user_field(manifest), filtered_search.describe_fields(manifest))


def sort_hits(store: "IndexStore", hits: Sequence[T], key: SortKey) -> list[T]:
    """Search hits (anything with a ``row``) ordered by ``key``'s field of their indexed rows."""
    rows = [h.row for h in hits]
    return sort_by_field(hits, key, lambda h: h.row, store.entries_of_rows(rows) if rows else {})
