"""Self-contained HTML report of a scores directory: one file, inline PNG/SVG/CSS, no network.

Sections: run summary; histogram of image scores with the decision threshold (inline SVG); the
most anomalous images, each shown as the original and with its anomaly map overlaid (inline
base64 PNGs, one colour scale for all so maps compare); counts per folder; every failure.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pni_ray.results import decode_row, has_threshold, part_files, path_of_row, read_part, table_metadata

LIGHT_COLUMNS = ["path", "category", "image_score", "is_anomalous", "map_dtype", "height", "width",
                 "map_min", "map_max", "model_id", "scored_at", "error"]
THUMB = 240
MAX_FAILURES_SHOWN = 500

# (position, RGB) control points of a perceptually ordered map (dark blue -> cyan -> yellow -> red)
_CMAP = np.array([
    [0.00, 0, 0, 80], [0.20, 20, 60, 200], [0.40, 0, 190, 220], [0.60, 120, 230, 90],
    [0.80, 250, 220, 30], [1.00, 230, 20, 20],
], dtype=np.float32)


def colormap(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> (..., 3) uint8."""
    x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)
    chans = [np.interp(x, _CMAP[:, 0], _CMAP[:, c]) for c in (1, 2, 3)]
    return np.stack(chans, axis=-1).astype(np.uint8)


def overlay(rgb: np.ndarray | None, amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map coloured on one scale and blended over the image (alpha grows with the value)."""
    norm = (amap - vmin) / max(vmax - vmin, 1e-12)
    colour = colormap(norm).astype(np.float32)
    if rgb is None:
        return colour.astype(np.uint8)
    alpha = (0.2 + 0.6 * np.clip(norm, 0, 1))[..., None]
    return (rgb.astype(np.float32) * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)


def _thumb(arr: np.ndarray, side: int = THUMB) -> Image.Image:
    img = Image.fromarray(arr)
    img.thumbnail((side, side), Image.BILINEAR)
    return img


def png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a" if x is None else str(x)
    return f"{x:.{digits}g}"


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    step = 10 ** math.floor(math.log10(span / n))
    for mult in (1, 2, 2.5, 5, 10):
        if span / (step * mult) <= n:
            step *= mult
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def histogram_svg(scores: list[float], threshold: float | None, bins: int = 40, width: int = 760,
                  height: int = 260) -> str:
    """Inline SVG histogram of image scores, bars above the threshold in red, threshold dashed."""
    if not scores:
        return '<p class="muted">No scored images.</p>'
    values = np.asarray(scores, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    has_thr = threshold is not None and math.isfinite(threshold)
    if has_thr:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.03
    lo, hi = lo - pad, hi + pad
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    ml, mr, mt, mb = 48, 16, 18, 40
    pw, ph = width - ml - mr, height - mt - mb
    cmax = max(int(counts.max()), 1)

    def x(v: float) -> float:
        return ml + (v - lo) / (hi - lo) * pw

    def y(c: float) -> float:
        return mt + ph - c / cmax * ph

    parts = [f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'role="img" aria-label="histogram of image scores">']
    parts.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ddd"/>')
    for c in sorted({int(round(t)) for t in _nice_ticks(0, cmax, 4)}):
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y(c):.1f}" y2="{y(c):.1f}" stroke="#e6e6e6"/>'
                     f'<text x="{ml - 6}" y="{y(c) + 4:.1f}" text-anchor="end" class="tick">{int(c)}</text>')
    for i, c in enumerate(counts):
        if c == 0:
            continue
        x0, x1 = x(edges[i]), x(edges[i + 1])
        centre = 0.5 * (edges[i] + edges[i + 1])
        cls = "bar-bad" if has_thr and centre > threshold else "bar-ok"
        parts.append(f'<rect class="{cls}" x="{x0 + 0.5:.1f}" y="{y(c):.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                     f'height="{mt + ph - y(c):.1f}"><title>{edges[i]:.4g} to {edges[i + 1]:.4g}: {c} images'
                     f'</title></rect>')
    for t in _nice_ticks(lo, hi, 8):
        parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" stroke="#666"/>'
                     f'<text x="{x(t):.1f}" y="{mt + ph + 17}" text-anchor="middle" class="tick">{t:.4g}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 4}" text-anchor="middle" class="axis">image score</text>')
    parts.append(f'<text x="12" y="{mt + ph / 2}" text-anchor="middle" class="axis" '
                 f'transform="rotate(-90 12 {mt + ph / 2})">images</text>')
    if has_thr:
        tx = x(threshold)
        anchor = "end" if tx > ml + pw * 0.8 else "start"
        dx = -5 if anchor == "end" else 5
        parts.append(f'<line class="threshold" x1="{tx:.1f}" x2="{tx:.1f}" y1="{mt}" y2="{mt + ph}"/>'
                     f'<text x="{tx + dx:.1f}" y="{mt + 13}" text-anchor="{anchor}" class="thr-label">'
                     f'threshold {threshold:.4g}</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#222;
 background:#fff;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
.muted{color:#777} .mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.stats{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.stat{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.stat b{display:block;font-size:20px} .stat span{font-size:12px;color:#666}
.stat.bad b{color:#c62828} .stat.warn b{color:#d48806}
svg.hist .bar-ok{fill:#5b8def} svg.hist .bar-bad{fill:#e0524f}
svg.hist .threshold{stroke:#111;stroke-width:2;stroke-dasharray:6 4}
svg.hist .tick{font-size:11px;fill:#555} svg.hist .axis{font-size:12px;fill:#333} svg.hist .thr-label{font-size:12px;fill:#111;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(500px,1fr));gap:14px}
.card{border:1px solid #ddd;border-radius:6px;padding:10px}
.card.anomalous{border-color:#e0524f;box-shadow:0 0 0 1px #e0524f33}
.card .pair{display:flex;gap:8px} .card figure{margin:0;text-align:center}
.card img{width:240px;height:auto;image-rendering:auto;border:1px solid #eee;display:block}
.card figcaption{font-size:11px;color:#777}
.card .head{display:flex;justify-content:space-between;align-items:baseline;margin-bottom:6px}
.badge{font-size:11px;border-radius:10px;padding:2px 8px;color:#fff;background:#5b8def}
.badge.bad{background:#e0524f}
.path{word-break:break-all;margin-top:6px}
.scale{display:flex;align-items:center;gap:8px;font-size:12px;margin:6px 0 12px}
.scale img{height:12px;width:240px;border:1px solid #ccc}
table{border-collapse:collapse;font-size:13px} td,th{border-bottom:1px solid #eee;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f6f6f6} td.num,th.num{text-align:right}
"""


def _load_original(path: str, white_level: int | None, max_pixels: int = 50_000_000) -> np.ndarray | None:
    from pni_ray.data.images import load_rgb

    try:
        return load_rgb(path, max_pixels, white_level)
    except Exception:  # noqa: BLE001 - the report still shows the map
        return None


def _read_light(out: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    rows: list[dict[str, Any]] = []
    for part in part_files(out):
        missing = [c for c in LIGHT_COLUMNS if c not in read_part(part, "schema").names]
        if missing:
            raise ValueError(f"{part}: not a pni-ray score part file (it has no {missing[0]!r} column); report reads "
                             "the OUT directory of `pni-ray score`")
        t = read_part(part, LIGHT_COLUMNS)
        for i, r in enumerate(t.to_pylist()):
            r["_part"], r["_index"] = part, i
            rows.append(r)
    return rows, table_metadata(out)


def _dataset(out: Path) -> dict[str, Any]:
    ds = out / "_dataset.json"
    return json.loads(ds.read_text()) if ds.is_file() else {}


def _threshold(dataset: dict[str, Any], meta: dict[str, str]) -> float | None:
    value = dataset.get("threshold")
    if value is not None:
        return float(value)
    return float(meta["threshold"]) if "threshold" in meta else None


def build_report(out: Path | str, top_n: int = 12, title: str | None = None) -> tuple[str, dict[str, Any]]:
    """The report's HTML and a few counts."""
    out = Path(out)
    if not part_files(out):
        days = sorted(p.name for p in out.glob("dt=*") if p.is_dir()) if out.is_dir() else []
        hint = (f"; it holds the nightly job's partitions ({days[0]} .. {days[-1]}): report one, e.g. {out / days[-1]}"
                if days else "")
        raise ValueError(f"{out}: no part-*.parquet files: not a pni-ray score output (or nothing committed yet){hint}")
    rows, meta = _read_light(out)
    dataset = _dataset(out)
    threshold = _threshold(dataset, meta)
    scored = [r for r in rows if r["error"] is None and r["image_score"] is not None]
    failed = sorted((r for r in rows if r["error"] is not None), key=lambda r: r["path"])
    decided = has_threshold(threshold)  # else no image is anomalous or normal
    anomalous = sum(bool(r["is_anomalous"]) for r in scored) if decided else None
    scored.sort(key=lambda r: (-r["image_score"], r["path"]))
    top = scored[:top_n]

    # maps of the shown images, read from their part files only
    cache: dict[Path, Any] = {}
    for r in top:
        if r["_part"] not in cache:
            cache[r["_part"]] = read_part(r["_part"], ["anomaly_map"]).column("anomaly_map")
        r["anomaly_map"] = cache[r["_part"]][r["_index"]].as_py()
    shown_maps = [(r, decode_row(r)) for r in top]
    with_maps = [m for _, m in shown_maps if m is not None]
    vmin = min((float(m.min()) for m in with_maps), default=0.0)
    vmax = max((float(m.max()) for m in with_maps), default=1.0)

    categories = sorted({r["category"] for r in rows if r["category"]})
    model_ids = sorted({r["model_id"] for r in rows if r["model_id"]})
    times = [r["scored_at"] for r in rows if r["scored_at"] is not None]
    title = title or f"pni-ray scores: {', '.join(categories) or out.name}"
    rate = anomalous / len(scored) if scored and decided else None

    h: list[str] = []
    esc = html.escape
    h.append(f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{CSS}</style></head><body>")
    h.append(f"<h1>{esc(title)}</h1>")
    h.append(f'<div class="muted mono">{esc(str(out.resolve()))}</div>')
    h.append('<div class="muted">model ' + esc(", ".join(m[:16] for m in model_ids) or "n/a")
             + (f" &middot; scored {esc(min(times).strftime('%Y-%m-%d %H:%M'))} to {esc(max(times).strftime('%Y-%m-%d %H:%M'))} UTC" if times else "")
             + (f" &middot; maps: {esc(meta.get('map_format', 'n/a'))}" if meta else "") + "</div>")
    stats = [("images", len(rows), ""), ("scored", len(scored), ""), ("failed", len(failed), "bad" if failed else ""),
             ("anomalous", anomalous if decided else "n/a: no threshold", "warn" if anomalous else ""),
             ("anomaly rate", "n/a" if rate is None else f"{rate:.1%}", ""),
             ("threshold", _fmt(threshold), "")]
    h.append('<div class="stats">' + "".join(
        f'<div class="stat {cls}"><b>{esc(str(v))}</b><span>{esc(k)}</span></div>' for k, v, cls in stats) + "</div>")

    h.append("<h2>Image scores</h2>")
    h.append(histogram_svg([r["image_score"] for r in scored], threshold))
    h.append('<div class="muted">' + ("Bars right of the dashed threshold are images judged anomalous." if decided else
                                      "The model has no threshold: no image is judged anomalous or normal.") + "</div>")

    h.append(f"<h2>Most anomalous images (top {len(top)})</h2>")
    if top:
        if with_maps:
            bar = colormap(np.linspace(0, 1, 240, dtype=np.float32))[None].repeat(12, axis=0)
            h.append(f'<div class="scale">map scale <span class="mono">{vmin:.4g}</span>'
                     f'<img alt="colour scale" src="{png_data_uri(Image.fromarray(bar))}">'
                     f'<span class="mono">{vmax:.4g}</span> (one scale for all maps)</div>')
        h.append('<div class="grid">')
        for r, amap in shown_maps:
            # the file itself, not the cell's escaped text, read on the model's scale
            rgb = _load_original(path_of_row(r["path"]), dataset.get("white_level"))
            if rgb is not None and amap is not None and rgb.shape[:2] != amap.shape:
                rgb = None  # the file changed since it was scored
            figs = []
            if rgb is not None:
                figs.append(f'<figure><img alt="image" src="{png_data_uri(_thumb(rgb))}"><figcaption>image</figcaption></figure>')
            if amap is not None:
                figs.append(f'<figure><img alt="anomaly map" src="{png_data_uri(_thumb(overlay(rgb, amap, vmin, vmax)))}">'
                            f'<figcaption>{"map over image" if rgb is not None else "map (image no longer readable)"}'
                            f'</figcaption></figure>')
            elif rgb is None:
                figs.append('<p class="muted">image no longer readable, no map stored</p>')
            else:
                figs.append('<p class="muted">no map stored (--map-format none)</p>')
            bad = decided and bool(r["is_anomalous"])
            verdict = ("anomalous" if bad else "normal") if decided else "undecided"
            h.append(f'<div class="card{" anomalous" if bad else ""}"><div class="head"><b>{r["image_score"]:.4f}</b>'
                     f'<span class="badge{" bad" if bad else ""}">{verdict}</span></div>'
                     f'<div class="pair">{"".join(figs)}</div>'
                     f'<div class="path mono">{esc(r["path"])}</div>'
                     f'<div class="muted mono">{r["width"]}x{r["height"]} px &middot; map {_fmt(r["map_min"])} to '
                     f'{_fmt(r["map_max"])}</div></div>')
        h.append("</div>")
    else:
        h.append('<p class="muted">No scored images.</p>')

    folders: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in rows:
        f = folders[os.path.dirname(r["path"])]
        f[0] += 1
        f[1] += r["error"] is not None
        f[2] += bool(r["is_anomalous"])
    h.append("<h2>By folder</h2><table><tr><th>folder</th><th class=num>images</th><th class=num>failed</th>"
             "<th class=num>anomalous</th><th class=num>rate</th></tr>")
    for folder, (n, nf, na) in sorted(folders.items(), key=lambda kv: (-kv[1][2], kv[0]))[:50]:
        ok = n - nf
        h.append(f'<tr><td class="mono">{esc(folder)}</td><td class=num>{n}</td><td class=num>{nf}</td>'
                 f'<td class=num>{na if decided else "n/a"}</td>'
                 f'<td class=num>{"n/a" if not ok or not decided else f"{na / ok:.0%}"}</td></tr>')
    h.append("</table>")
    if len(folders) > 50:
        h.append(f'<p class="muted">... {len(folders) - 50} more folders</p>')

    h.append(f"<h2>Failures ({len(failed)})</h2>")
    if failed:
        h.append("<table><tr><th>file</th><th>error</th></tr>")
        for r in failed[:MAX_FAILURES_SHOWN]:
            h.append(f'<tr><td class="mono">{esc(r["path"])}</td><td>{esc(r["error"])}</td></tr>')
        h.append("</table>")
        if len(failed) > MAX_FAILURES_SHOWN:
            h.append(f'<p class="muted">... and {len(failed) - MAX_FAILURES_SHOWN} more (query the error column)</p>')
    else:
        h.append('<p class="muted">None: every input was scored.</p>')
    h.append("</body></html>")
    info = {"rows": len(rows), "scored": len(scored), "failed": len(failed), "anomalous": anomalous,
            "top": [r["path"] for r in top], "threshold": threshold}
    return "\n".join(h), info


def write_report(out: Path | str, html_path: Path | str, top_n: int = 12, title: str | None = None) -> dict[str, Any]:
    from pni_ray.results import atomic_write_bytes

    text, info = build_report(out, top_n=top_n, title=title)
    html_path = Path(html_path)
    try:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(html_path, text.encode("utf-8"))
    except OSError as exc:
        raise ValueError(f"{html_path}: cannot write the report ({exc.strerror or exc})") from None
    info["html"] = str(html_path)
    return info
