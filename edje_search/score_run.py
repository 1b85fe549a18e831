"""A resumable scoring run: a stream of pairs in, JSON Lines out.

Beside ``OUT.jsonl`` the run keeps ``OUT.jsonl.skipped.jsonl`` (bad entries with their reason)
and ``OUT.jsonl.state.json``: how many input items (pairs and bad entries, in input order) are
done, and how many bytes of each file they produced. Each chunk's lines are appended and
fsynced before the state moves forward; a re-run cuts both files back to the sizes in the
state and skips the items it counts. So a run killed at any instant (even halfway through a
line) resumes without a duplicate or a gap, with or without a filter on the probability.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Iterable

from tqdm.auto import tqdm

from .errors import BadInput
from .fsutil import atomic_write_text
from .scoring import BadEntry, Pair, chunked, keep

STATE_SUFFIX = ".state.json"
SKIPPED_SUFFIX = ".skipped.jsonl"
STATE_VERSION = 1


def _fault(point: str) -> None:
    """Crash injection for the resume tests: EDJE_FAULT=<point> ends the process at once (no
    cleanup, no flush), as kill -9 would."""
    if os.environ.get("EDJE_FAULT") == point:
        os._exit(137)


@dataclasses.dataclass
class RunReport:
    output: str
    done: int = 0  # input items handled (pairs scored or skipped, bad entries)
    scored: int = 0
    kept: int = 0  # records written (all scored pairs without a filter)
    skipped: int = 0
    resumed_from: int = 0  # items already done when this run started
    finished: bool = False


def _lines(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8", "surrogateescape")


class ResumableOutput:
    """The output files of one run and the state that lets a later run carry on (module doc)."""

    def __init__(self, out: str | Path, signature: dict, *, overwrite: bool = False):
        self.out = Path(out)
        self.skipped_path = self.out.with_name(self.out.name + SKIPPED_SUFFIX)
        self.state_path = self.out.with_name(self.out.name + STATE_SUFFIX)
        self.signature = signature
        self.overwrite = overwrite
        self.report = RunReport(str(self.out))
        self._files: list = []

    def _read_state(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise BadInput(f"{self.state_path} is unreadable ({e}): pass --overwrite to start again") from None

    def start(self) -> RunReport:
        """Open the files: fresh, or cut back to the last recorded chunk; returns the report so far."""
        state = None if self.overwrite else self._read_state()
        if state is None:
            if self.out.exists() and not self.overwrite:
                raise BadInput(f"{self.out} exists and no score run state is beside it: pass --overwrite "
                               f"or choose another output")
            state = {"version": STATE_VERSION, "signature": self.signature, "bytes": 0, "skipped_bytes": 0,
                     "report": dataclasses.asdict(self.report)}
            self.out.parent.mkdir(parents=True, exist_ok=True)
            for path in (self.out, self.skipped_path):
                path.write_bytes(b"")
            self._write_state(state)
        elif state.get("signature") != self.signature:
            raise BadInput(f"{self.out} was written by a score run with other input or options: pass --overwrite "
                           f"or choose another output")
        for path, size in ((self.out, state["bytes"]), (self.skipped_path, state["skipped_bytes"])):
            if not path.exists() or path.stat().st_size < size:
                raise BadInput(f"{path} is shorter than its run state says: pass --overwrite to start again")
            os.truncate(path, size)  # drops what a killed run wrote after its last state
        self.report = RunReport(**state["report"])
        self.report.resumed_from = self.report.done
        self._state = state
        self._files = [open(self.out, "ab"), open(self.skipped_path, "ab")]
        return self.report

    def _write_state(self, state: dict) -> None:
        atomic_write_text(self.state_path, json.dumps(state, indent=1) + "\n")

    def append(self, records: list[dict], bad: list[BadEntry], *, consumed: int, scored: int) -> None:
        """Write one chunk's kept records and bad entries durably, then record the progress."""
        out, skipped = self._files
        data = _lines(records)
        if os.environ.get("EDJE_FAULT") == "score-half-written" and self.report.done > 0:
            out.write(data[: len(data) // 2])
            out.flush()
            os._exit(137)
        out.write(data)
        skipped.write(_lines({"position": b.position, "where": b.where, "reason": b.reason} for b in bad))
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
        if self.report.done > 0:
            _fault("score-before-state")
        r = self.report
        r.done += consumed
        r.scored += scored
        r.kept += len(records)
        r.skipped += len(bad)
        self._state.update(bytes=out.tell(), skipped_bytes=skipped.tell(), report=dataclasses.asdict(r))
        self._write_state(self._state)

    def finish(self) -> RunReport:
        self.report.finished = True
        self._state["report"] = dataclasses.asdict(self.report)
        self._write_state(self._state)
        self.close()
        return self.report

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []


def run_scoring(items: Iterable[Pair | BadEntry], scorer, output: ResumableOutput, *, min_prob: float | None = None,
                chunk_size: int = 512, progress: bool = True, total: int | None = None,
                on_bad: Callable[[BadEntry], None] | None = None) -> RunReport:
    """Score ``items`` with ``scorer`` (scoring.FileScorer or RowScorer, score_shards.ShardScorer) into
    ``output``, ``chunk_size`` items at a time (memory stays bounded), keeping records with
    prob >= ``min_prob`` when given."""
    report = output.start()
    if report.finished:
        output.close()
        return report
    bar = tqdm(total=total, initial=report.done, unit="pair", desc="scoring", disable=not progress,
               dynamic_ncols=True)
    try:
        for chunk in chunked(itertools.islice(items, report.done, None), chunk_size):
            pairs = [x for x in chunk if isinstance(x, Pair)]
            bad = [x for x in chunk if isinstance(x, BadEntry)]
            records, failed = scorer.score(pairs) if pairs else ([], [])
            bad = sorted(bad + failed, key=lambda b: b.position)
            output.append([r for r in records if keep(r, min_prob)], bad, consumed=len(chunk), scored=len(records))
            for b in bad:
                if on_bad is not None:
                    on_bad(b)
            bar.update(len(chunk))
            bar.set_postfix(kept=report.kept, skipped=report.skipped, refresh=False)
    finally:
        bar.close()
        output.close()
    return output.finish()
