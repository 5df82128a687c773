"""The scores table: one Parquet row per input image, and how to encode and decode its maps.

Schema (every part file of a `pni-ray score` output directory has exactly this schema):

==============  ======================  ===================================================
column          type                    meaning
==============  ======================  ===================================================
path            string                  absolute path of the input as given (not resolved)
category        string                  the model's category (what the image was scored as)
image_score     float64, null on error  raw image score: max of the model-size map averaged
                                        over image_window^2 patches (usually below map_max)
is_anomalous    bool, null on error     image_score > the model's threshold (null: the model has none)
anomaly_map     binary, null            the map at the image's own resolution, encoded per
                                        map_dtype (null on error or with --map-format none)
map_dtype       string, null            "uint8", "float16" or "float32" (null: no map stored)
height, width   int32, null on error    the original image's size = the map's shape (H, W)
map_min         float32, null on error  minimum of the full-resolution float map
map_max         float32, null on error  maximum of the full-resolution float map
model_id        string                  sha256 of the model's manifest.json
scored_at       timestamp[us, UTC]      when the row was produced
error           string, null            why the input could not be scored (names the file)
==============  ======================  ===================================================

Decoding `anomaly_map` (row-major, C order, little-endian, shape (height, width)):

* ``uint8``:   ``map = map_min + q / 255 * (map_max - map_min)`` with
  ``q = frombuffer(anomaly_map, uint8)``: min/max-scaled per image, error <= range / 510.
* ``float16``: ``map = frombuffer(anomaly_map, '<f2')``, raw values.
* ``float32``: ``map = frombuffer(anomaly_map, '<f4')``, the exact float map (4x the bytes of uint8).

Maps are brought to the image's size by `pni_ray.geometry.resize_map`, the resize `evaluate` uses.

The same instructions are stored in the Parquet schema metadata (keys ``pni_ray.*``) and in the
``anomaly_map`` field's metadata, so any reader can decode a map without this module.
"""

from __future__ import annotations

import io
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pni_ray.fileio import atomic_write_bytes, atomic_write_json  # noqa: F401 (re-exported)

MAP_FORMATS = ("uint8", "float16", "float32", "none")
TABLE_FORMAT = "pni-ray-scores"
TABLE_VERSION = 1

UINT8_DECODE = "map = map_min + frombuffer(anomaly_map, uint8).reshape(height, width) / 255 * (map_max - map_min)"
FLOAT16_DECODE = "map = frombuffer(anomaly_map, '<f2').reshape(height, width)"
FLOAT32_DECODE = "map = frombuffer(anomaly_map, '<f4').reshape(height, width)"

_MAP_FIELD_META = {
    b"encoding": b"row-major (height, width); see map_dtype",
    b"uint8": UINT8_DECODE.encode(),
    b"float16": FLOAT16_DECODE.encode(),
    b"float32": FLOAT32_DECODE.encode(),
}

COLUMNS = (
    "path", "category", "image_score", "is_anomalous", "anomaly_map", "map_dtype", "height", "width",
    "map_min", "map_max", "model_id", "scored_at", "error",
)


def schema(map_format: str = "uint8", threshold: float | None = None, extra: dict[str, Any] | None = None) -> pa.Schema:
    """The table schema with decoding instructions (and the model threshold) in its metadata."""
    if map_format not in MAP_FORMATS:
        raise ValueError(f"map format must be one of {MAP_FORMATS}, got {map_format!r}")
    meta = {
        "pni_ray.format": TABLE_FORMAT,
        "pni_ray.format_version": str(TABLE_VERSION),
        "pni_ray.map_format": map_format,
        "pni_ray.map_layout": "row-major (height, width), little-endian",
        "pni_ray.decode.uint8": UINT8_DECODE,
        "pni_ray.decode.float16": FLOAT16_DECODE,
        "pni_ray.decode.float32": FLOAT32_DECODE,
    }
    if threshold is not None:
        meta["pni_ray.threshold"] = repr(float(threshold))
    for k, v in (extra or {}).items():
        meta[f"pni_ray.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("category", pa.string()),
            pa.field("image_score", pa.float64()),
            pa.field("is_anomalous", pa.bool_()),
            pa.field("anomaly_map", pa.binary(), metadata=_MAP_FIELD_META),
            pa.field("map_dtype", pa.string()),
            pa.field("height", pa.int32()),
            pa.field("width", pa.int32()),
            pa.field("map_min", pa.float32()),
            pa.field("map_max", pa.float32()),
            pa.field("model_id", pa.string()),
            pa.field("scored_at", pa.timestamp("us", tz="UTC")),
            pa.field("error", pa.string()),
        ],
        metadata=meta,
    )


# ------------------------------------------------------------------------------------------
# maps
# ------------------------------------------------------------------------------------------


def encode_map(amap: np.ndarray, map_format: str) -> tuple[bytes | None, str | None, float, float]:
    """Float map -> (payload, map_dtype, map_min, map_max); payload None for format "none"."""
    amap = np.ascontiguousarray(amap, dtype=np.float32)
    lo, hi = float(amap.min()), float(amap.max())
    if map_format == "none":
        return None, None, lo, hi
    if map_format == "float16":
        return amap.astype("<f2").tobytes(), "float16", lo, hi
    if map_format == "float32":
        return amap.astype("<f4").tobytes(), "float32", lo, hi
    if map_format == "uint8":
        span = hi - lo
        q = np.zeros(amap.shape, np.uint8) if span <= 0 else np.rint((amap - lo) * (255.0 / span)).clip(0, 255).astype(np.uint8)
        return q.tobytes(), "uint8", lo, hi
    raise ValueError(f"map format must be one of {MAP_FORMATS}, got {map_format!r}")


def decode_map(payload: bytes | None, map_dtype: str | None, height: int, width: int,
               map_min: float | None = None, map_max: float | None = None) -> np.ndarray | None:
    """Inverse of encode_map: (height, width) float32, or None when no map was stored."""
    if payload is None or map_dtype is None:
        return None
    if map_dtype == "float16":
        return np.frombuffer(payload, "<f2").reshape(int(height), int(width)).astype(np.float32)
    if map_dtype == "float32":
        return np.frombuffer(payload, "<f4").reshape(int(height), int(width)).copy()
    if map_dtype == "uint8":
        q = np.frombuffer(payload, np.uint8).reshape(int(height), int(width)).astype(np.float32)
        return (np.float32(map_min) + q / np.float32(255.0) * np.float32(map_max - map_min)).astype(np.float32)
    raise ValueError(f"unknown map dtype {map_dtype!r}")


def decode_row(row: dict[str, Any]) -> np.ndarray | None:
    """Decode the map of one row given as a dict (pandas `row.to_dict()`, pyarrow `to_pylist()`)."""
    return decode_map(row.get("anomaly_map"), row.get("map_dtype"), row.get("height") or 0,
                      row.get("width") or 0, row.get("map_min"), row.get("map_max"))


# ------------------------------------------------------------------------------------------
# rows and tables
# ------------------------------------------------------------------------------------------


PATH_TEXT = 2  # the path column's form (`row_path`); 1, outputs without it: backslashes not doubled


def row_path(path: str) -> str:
    """The `path` column's text for an input path, one to one: the path itself where it is UTF-8
    without a backslash; else backslashes doubled and undecodable bytes as ``\\xNN`` (os.fsdecode keeps
    them as lone surrogates, which Arrow refuses). Every escaped text holds a backslash and no plain
    one does, and within the escaped ones a single backslash only starts a byte, so the byte name
    ``bad<0xff>.png`` and the UTF-8 name ``bad\\xff.png`` are two rows (escaping the bytes alone gave both
    one text, and a rerun then took the second file as done). `path_of_row` inverts it."""
    raw = path.encode("utf-8", "surrogateescape")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\\" not in text:
        return text
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def path_of_row(text: str) -> str:
    """The file a `path` cell names (the inverse of `row_path`), for opening it again (the report)."""
    if "\\" not in text:
        return text
    raw, i = bytearray(), 0
    while i < len(text):
        if text.startswith("\\\\", i):
            raw += b"\\"
            i += 2
        elif text.startswith("\\x", i):
            raw.append(int(text[i + 2: i + 4], 16))
            i += 4
        else:
            raw += text[i].encode("utf-8")
            i += 1
    return os.fsdecode(bytes(raw))


def message_text(message: str) -> str:
    """An error message as Parquet can hold it (a path's non-UTF-8 bytes inside it as ``\\xNN``)."""
    return message.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def has_threshold(threshold: float | None) -> bool:
    """Whether a model's threshold decides anything: a model trained without held-out images has none (null in
    JSON, +inf once read), and then no image is anomalous or normal."""
    return threshold is not None and math.isfinite(threshold)


def decide(score: float, threshold: float | None) -> bool | None:
    """score > threshold; None (undecided) for a model without a threshold (`has_threshold`): "normal" for every
    image, defects included, was what `False` said."""
    return bool(float(score) > threshold) if has_threshold(threshold) else None


def scored_row(path: str, category: str | None, score: float, threshold: float, full_map: np.ndarray,
               map_format: str, model_id: str, scored_at: datetime) -> dict[str, Any]:
    payload, dtype, lo, hi = encode_map(full_map, map_format)
    return {
        "path": path, "category": category, "image_score": float(score),
        "is_anomalous": decide(score, threshold), "anomaly_map": payload, "map_dtype": dtype,
        "height": int(full_map.shape[0]), "width": int(full_map.shape[1]), "map_min": lo, "map_max": hi,
        "model_id": model_id, "scored_at": scored_at, "error": None,
    }


def error_row(path: str, category: str | None, error: str, model_id: str, scored_at: datetime) -> dict[str, Any]:
    return {
        "path": path, "category": category, "image_score": None, "is_anomalous": None, "anomaly_map": None,
        "map_dtype": None, "height": None, "width": None, "map_min": None, "map_max": None,
        "model_id": model_id, "scored_at": scored_at, "error": error,
    }


def rows_to_table(rows: Sequence[dict[str, Any]], table_schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=table_schema)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # Parquet's own compression squeezes the smooth uint8 maps several-fold; zstd reads everywhere.
    pq.write_table(table, buf, compression="zstd", row_group_size=max(1, table.num_rows))
    return buf.getvalue()


def part_files(out) -> list:
    """Committed part files of an output directory (temp files and `_` files are not parts)."""

    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p for p in out.glob("part-*.parquet") if p.is_file())


class DamagedPart(ValueError):
    """A part file of a score output that cannot be read: named, with what to do."""


def read_part(part: Path, columns: Iterable[str] | str | None = None) -> Any:
    """One part file's columns (all for None; its schema for "schema"), a damaged or unreadable file named
    in the error: pyarrow's own says only what it found ("Parquet magic bytes not found"), not where."""
    try:
        if columns == "schema":
            return pq.read_schema(part)
        return pq.read_table(part, columns=list(columns) if columns is not None else None)
    except pa.ArrowInvalid as exc:
        raise DamagedPart(f"{part}: not a readable Parquet file ({exc}); scoring writes each part whole, so it was "
                          "damaged since: remove it and rerun `pni-ray score` with the same arguments to score its "
                          "inputs again") from None
    except OSError as exc:
        raise DamagedPart(f"{part}: cannot read ({exc.strerror or exc})") from None


def read_table(out, columns: Iterable[str] | None = None) -> pa.Table:
    """All committed rows of an output directory (empty table with the schema if none)."""
    parts = part_files(out)
    if not parts:
        return schema().empty_table() if columns is None else schema().empty_table().select(list(columns))
    tables = [read_part(p, columns) for p in parts]
    return pa.concat_tables(tables, promote_options="permissive")


def table_metadata(out) -> dict[str, str]:
    """`pni_ray.*` schema metadata of the first part file (threshold, map format...)."""
    parts = part_files(out)
    if not parts:
        return {}
    meta = read_part(parts[0], "schema").metadata or {}
    return {k.decode()[len("pni_ray."):]: v.decode() for k, v in meta.items() if k.startswith(b"pni_ray.")}
