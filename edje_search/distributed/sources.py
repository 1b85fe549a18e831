"""What a distributed build reads: a folder, a file list, or webdataset shards.

No Ray here: these functions tell the kinds of source apart and read img2dataset's shards, so
they are usable (and tested) without a cluster.

- a **folder**: every image file under it (``images.iter_image_files``, the rule every build uses);
- a **file list**: a text file (``.txt``/``.lst``) with one image path per line; relative paths
  are taken from the list's folder; blank lines and ``#`` comments are ignored;
- **webdataset shards** as img2dataset writes them: a ``.tar`` file, a folder holding ``.tar``
  files (and no images), or a list of ``.tar`` paths. Each sample is the members sharing a key:
  ``KEY.jpg`` (or another image extension), ``KEY.txt`` (the caption) and ``KEY.json`` (its
  metadata). A sample is indexed under the path ``SHARD.tar#MEMBER`` and its caption and
  metadata are kept in the manifest.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

from ..errors import BadInput
from ..images import is_image_path, iter_image_files

SHARD_SEPARATOR = "#"  # SHARD.tar#MEMBER names a sample inside a shard
LIST_SUFFIXES = (".txt", ".lst")


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved source: ``kind`` is "files" (paths of image files) or "shards" (paths of .tar files)."""

    kind: str
    paths: tuple[str, ...]


def resolve_source(source: str | os.PathLike) -> Source:
    """Tell a folder, a file list and webdataset shards apart (see the module docstring)."""
    path = Path(source)
    if not path.exists():
        raise BadInput(f"source {source} does not exist")
    if path.is_file():
        if path.suffix.lower() == ".tar":
            return Source("shards", (str(path.resolve()),))
        if path.suffix.lower() in LIST_SUFFIXES:
            return _from_list(path)
        if is_image_path(path):
            return Source("files", (str(path.resolve()),))
        raise BadInput(f"source {source}: not a folder, a .tar shard, a file list ({', '.join(LIST_SUFFIXES)}) "
                       f"or an image")
    shards = sorted(str(p.resolve()) for p in path.iterdir() if p.suffix.lower() == ".tar" and p.is_file())
    if shards and not any(is_image_path(p.name) for p in path.iterdir()):
        return Source("shards", tuple(shards))
    return Source("files", tuple(os.path.abspath(p) for p in iter_image_files(path)))


def _from_list(list_file: Path) -> Source:
    base = list_file.resolve().parent
    paths = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            paths.append(os.path.normpath(os.path.join(base, line)))
    if paths and all(p.lower().endswith(".tar") for p in paths):
        return Source("shards", tuple(paths))
    return Source("files", tuple(paths))


@dataclasses.dataclass
class ShardSample:
    """One sample of a shard: its index path, the image bytes and what the shard says about it."""

    path: str  # SHARD.tar#MEMBER
    data: bytes | None  # None when the sample has no image member
    meta: dict  # the KEY.json object, with "caption" from KEY.txt when present
    error: str = ""


def iter_shard(shard: str, max_member_bytes: int | None = None) -> Iterator[ShardSample]:
    """The samples of one webdataset ``.tar``, in shard order, streaming (members sharing a key
    are adjacent, as webdataset writers store them). Samples without an image member are
    yielded with an error, so they are reported instead of vanishing."""
    current_key = None
    parts: dict[str, tuple[str, bytes | None, int]] = {}  # extension -> (member name, bytes, size)

    def finish() -> ShardSample | None:
        if current_key is None:
            return None
        return _sample(shard, current_key, parts)

    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if key != current_key:
                    done = finish()
                    if done is not None:
                        yield done
                    current_key, parts = key, {}
                if max_member_bytes is not None and member.size > max_member_bytes:
                    parts[ext] = (member.name, None, member.size)  # not read: reported as too large
                    continue
                f = tar.extractfile(member)
                parts[ext] = (member.name, f.read() if f is not None else b"", member.size)
    except (OSError, tarfile.TarError) as e:
        raise BadInput(f"cannot read shard {shard}: {e}") from e
    done = finish()
    if done is not None:
        yield done


def _split_member(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``); webdataset keys end at the first dot of the base name."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def _sample(shard: str, key: str, parts: dict[str, tuple[str, bytes | None, int]]) -> ShardSample:
    meta: dict = {}
    if parts.get("json", (None, None))[1] is not None:
        try:
            loaded = json.loads(parts["json"][1].decode("utf-8"))
            meta = loaded if isinstance(loaded, dict) else {"json": loaded}
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {"json_error": "unreadable KEY.json"}
    if parts.get("txt", (None, None))[1] is not None:
        meta["caption"] = parts["txt"][1].decode("utf-8", errors="replace").strip()
    image = next((ext for ext in parts if is_image_path("x." + ext)), None)
    if image is None:
        return ShardSample(f"{shard}{SHARD_SEPARATOR}{key}", None, meta, "sample has no image member")
    member, data, size = parts[image]
    path = f"{shard}{SHARD_SEPARATOR}{member}"
    if data is None:
        return ShardSample(path, None, meta, f"file too large ({size:,} bytes)")
    return ShardSample(path, data, meta)
