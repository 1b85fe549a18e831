"""What the index store asks of a store of rows, whichever holds them: the first-stage vectors
(``segments.SegmentArray``, one ``.npy`` file per commit) and the tokens and their scales
(``zarr_rows.ZarrRows``, sharded Zarr v3 arrays). Commits, verify, repair and compaction go
through these methods only."""
from __future__ import annotations

from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class RowArray(Protocol):
    url: str
    row_shape: tuple[int, ...]
    segments: list[tuple[int, int]]  # (first row, row count) of each committed span, sorted
    n_rows: int  # one past the last committed row
    written: dict[int, tuple[str, bytes]]  # checksums of spans written and not yet committed

    def set_segments(self, segments: Sequence[tuple[int, int]]) -> None:
        """Adopt a generation's committed spans."""

    def write_segment(self, start: int, rows: np.ndarray) -> tuple[int, int]:
        """Write a new span starting at ``start``; nothing committed is touched."""

    def get(self, rows) -> np.ndarray:
        """Committed rows in the order asked; IndexCorrupt if any is unreadable."""

    def read_segment(self, start: int, count: int) -> np.ndarray: ...

    def iter_rows(self, batch: int = 65536, first: int = 0,
                  end: int | None = None) -> Iterator[tuple[int, np.ndarray]]: ...

    def read_checked(self, start: int, count: int) -> tuple[np.ndarray | None, list[int], str]:
        """(rows, unreadable rows, first reason) of a span: what verify checks."""

    def span_matches(self, start: int, rows: np.ndarray, checksum: str) -> bool: ...

    def layout_mismatch(self, segments: Sequence[tuple[int, int]]) -> str | None:
        """How the stored rows disagree with the layout the index config implies, or None."""

    def rewrite_rows(self, lost: Sequence[int], starts: Sequence[int] = ()) -> list[tuple[int, int]]:
        """Repair: write again the spans holding ``lost`` rows (zeros in their place)."""

    def path_of(self, start: int, rows: Sequence[int] = ()) -> str: ...

    def stray_files(self) -> list[str]: ...

    def remove_stray_files(self) -> list[str]: ...
