"""Per-image metadata kept in the manifest: where the file is, its pixel size, and the EXIF
fields people filter photo collections by.

Everything here reads an image that is already open (its header parsed from bytes in memory),
so collecting metadata costs no extra file read. Field names and types are listed in
:data:`IMAGE_FIELDS`; the filter language (storage/filters.py) checks comparisons against them.
User metadata (a sidecar ``--metadata FILE.jsonl``, webdataset ``.json``) is merged on top.
"""
from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Mapping

from PIL import Image

# EXIF tag numbers (EXIF 2.32 / TIFF 6.0). Pillow exposes the numbers, and its ExifTags
# enums moved between releases, so the few used here are named once.
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_MAKE, _MODEL, _ORIENTATION, _DATETIME = 0x010F, 0x0110, 0x0112, 0x0132
_DATETIME_ORIGINAL, _LENS_MODEL = 0x9003, 0xA434
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON = 1, 2, 3, 4

# Fields collected at indexing time, with their type for the filter language. folder/name come
# from the path; width/height are the upright size (EXIF orientation applied); taken is the
# camera's local time "YYYY-MM-DDTHH:MM:SS" as EXIF records it (no time zone); lat/lon are
# decimal degrees, negative south and west.
IMAGE_FIELDS = {
    "folder": "text", "name": "text", "width": "number", "height": "number", "taken": "date",
    "make": "text", "model": "text", "lens": "text", "lat": "number", "lon": "number", "orientation": "number",
}


def path_fields(path: str) -> dict:
    """folder and file name of an absolute path."""
    folder, name = os.path.split(path)
    return {"folder": folder, "name": name}


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value or None


def _exif_date(value) -> str | None:
    """EXIF "YYYY:MM:DD HH:MM:SS" -> ISO "YYYY-MM-DDTHH:MM:SS" (None when malformed or blank)."""
    text = _text(value)
    if not text or len(text) < 19 or text[4] != ":" or text[7] != ":":
        return None
    iso = f"{text[0:4]}-{text[5:7]}-{text[8:10]}T{text[11:19]}"
    return iso if iso[:4].isdigit() and iso[:4] != "0000" else None


def _degrees(dms, ref) -> float | None:
    """GPS (degrees, minutes, seconds) rationals and an N/S/E/W reference -> signed decimal degrees."""
    try:
        d, m, s = (float(x) for x in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = d + m / 60 + s / 3600
    if value != value or value > 180:  # NaN from a 0/0 rational, or nonsense
        return None
    return round(-value if _text(ref) in ("S", "W") else value, 7)


def image_fields(img: Image.Image) -> dict:
    """Pixel size and EXIF fields of an opened image (only the header needs to have been read).

    Fields absent from the file are left out rather than stored as null."""
    out: dict = {}
    try:
        exif = img.getexif()
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the image; it just has no EXIF
        exif = Image.Exif()
    orientation = exif.get(_ORIENTATION)
    w, h = img.size
    if orientation in (5, 6, 7, 8):  # rotated a quarter turn: the upright image is h x w
        w, h = h, w
    out["width"], out["height"] = int(w), int(h)
    if isinstance(orientation, int) and 1 <= orientation <= 8:
        out["orientation"] = orientation
    try:
        sub = exif.get_ifd(_EXIF_IFD)
        gps = exif.get_ifd(_GPS_IFD)
    except Exception:  # noqa: BLE001 - same: a malformed sub-IFD only loses those fields
        sub, gps = {}, {}
    taken = _exif_date(sub.get(_DATETIME_ORIGINAL)) or _exif_date(exif.get(_DATETIME))
    for key, value in (("taken", taken), ("make", _text(exif.get(_MAKE))), ("model", _text(exif.get(_MODEL))),
                       ("lens", _text(sub.get(_LENS_MODEL)))):
        if value:
            out[key] = value
    if _GPS_LAT in gps and _GPS_LON in gps:
        lat, lon = _degrees(gps[_GPS_LAT], gps.get(_GPS_LAT_REF)), _degrees(gps[_GPS_LON], gps.get(_GPS_LON_REF))
        if lat is not None and lon is not None and abs(lat) <= 90:
            out["lat"], out["lon"] = lat, lon
    return out


def header_fields(data: bytes) -> dict:
    """:func:`image_fields` from a file's bytes, parsing only the header (no pixels decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return image_fields(img)
    except Exception:  # noqa: BLE001 - metadata is best effort; the caller decides whether the file is usable
        return {}


def stored_file_fields(path: str) -> dict | None:
    """:func:`path_fields` and :func:`image_fields` of an indexed file, reading only its header
    (PIL reads lazily: no pixels are decoded). None when the file is not a regular file any more."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with Image.open(path) as img:
            return {**path_fields(path), **image_fields(img)}
    except Exception:  # noqa: BLE001 - gone, unreadable or not an image now: the next sync handles the file
        return None


def read_sidecar(path: str | Path) -> dict[str, dict]:
    """A JSON-lines file of ``{"path": ..., field: value, ...}`` -> absolute path -> fields.

    Relative paths are taken relative to the sidecar's folder. Raises ValueError naming the line
    of the first malformed entry."""
    base = Path(path).resolve().parent
    out: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise ValueError(f'{path}:{n}: each line must be an object with a "path" string')
            fields = {k: v for k, v in item.items() if k != "path"}
            bad = [k for k in fields if not k.isidentifier()]
            if bad:
                raise ValueError(f"{path}:{n}: field name {bad[0]!r} is not a plain name (letters, digits, _)")
            out[os.path.abspath(base / item["path"])] = fields
    return out


def merged(*parts: Mapping | None) -> dict | None:
    """Later mappings override earlier ones; None when nothing is left."""
    out: dict = {}
    for p in parts:
        if p:
            out.update(p)
    return out or None
