"""Deploy exactly what was evaluated: `evaluate`, `score` from the bundle and `score` from its export,
image by image.

    figures = deployment_parity(BUNDLE, DATA_ROOT, CATEGORY, WORKDIR)

runs the three on the category's test split: `evaluate`'s own maps and image scores (run_modes,
the bundle's default mode, refined when it has a refiner), `pni-ray score BUNDLE` and
`pni-ray score EXPORT` (exported here) with float32 maps, and compares every image: relative
image-score difference, same ranking, map difference as a fraction of the evaluated map's range,
error rows. Used by tests/test_deploy_parity.py (synthetic data) and
benchmarks/bench_deploy_parity.py (cropped bottle).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pni_ray.export.onnx_export import ExportOptions, export_bundle
from pni_ray.data.mvtec import load_category
from pni_ray.evaluate import run_modes
from pni_ray.inference import load_detector
from pni_ray.predict import default_name
from pni_ray.orchestration.score import Options, score
from pni_ray.results import decode_row, read_table


def read_scores(out: Path) -> dict[str, dict[str, Any]]:
    """path -> {"score", "map", "error"} from a `pni-ray score` output directory."""
    rows = read_table(out).to_pylist()
    return {r["path"]: {"score": r["image_score"], "map": decode_row(r), "error": r["error"]} for r in rows}


def compare(ref_scores: np.ndarray, ref_maps: list[np.ndarray], rows: dict[str, dict[str, Any]],
            paths: list[str]) -> dict[str, Any]:
    """Figures of one scoring output against the evaluated scores and maps (same image order)."""
    errors = [p for p in paths if p not in rows or rows[p]["error"] is not None]
    if errors:
        return {"n_images": len(paths), "error_rows": len(errors), "first_error": rows.get(errors[0], {}).get("error")}
    got = np.array([rows[p]["score"] for p in paths], np.float64)
    ref = ref_scores.astype(np.float64)
    map_frac = []
    for p, r in zip(paths, ref_maps):
        m = rows[p]["map"]
        if m is None or m.shape != r.shape:
            raise AssertionError(f"{p}: map {None if m is None else m.shape} != evaluated {r.shape}")
        span = max(float(r.max() - r.min()), 1e-12)
        map_frac.append(float(np.abs(m.astype(np.float64) - r).max()) / span)
    return {
        "n_images": len(paths),
        "error_rows": 0,
        "max_rel_score_diff": float((np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12)).max()),
        "ranking_identical": bool(np.array_equal(np.argsort(-ref, kind="stable"), np.argsort(-got, kind="stable"))),
        "max_map_diff_of_range": float(max(map_frac)),
    }


def deployment_parity(bundle: Path | str, data_root: Path | str, category: str, workdir: Path | str,
                      engine: str = "local", threads: int = 1, batch_size: int = 8) -> dict[str, Any]:
    """{"score_bundle": figures, "score_export": figures, "n_images", "name", ...} for one bundle."""
    bundle, workdir = Path(bundle), Path(workdir)
    detector, _ = load_detector(bundle)
    name = default_name(detector)
    cat = load_category(data_root, category)
    test_paths = [s.path for s in cat.test]
    result = run_modes(detector, test_paths, (name.removesuffix("+refine"),), batch_size,
                       (name.removesuffix("+refine"),) if name.endswith("+refine") else (), progress=False)[name]
    paths = [os.path.normpath(os.path.abspath(p)) for p in test_paths]  # as `score` names its rows
    export_dir = workdir / "export"
    export_bundle(bundle, export_dir, ExportOptions(max_batch=batch_size), force=True)
    opts = Options(batch_size=batch_size, map_format="float32", threads=threads, workers=1, cpus_per_worker=threads)
    figures: dict[str, Any] = {"name": name, "n_images": len(paths)}
    for key, model in (("score_bundle", bundle), ("score_export", export_dir)):
        out = workdir / key
        summary = score(model, paths, out, opts, engine=engine)
        figures[key] = compare(result.scores, result.maps, read_scores(out), paths)
        figures[key]["summary_failed"] = summary["failed"]
    return figures


def within_limits(figures: dict[str, Any], score_rel: float = 1e-3, map_frac: float = 1e-3) -> bool:
    """The issue's bar: zero error rows, scores within 1e-3 relative, same ranking, maps within 1e-3 of the range."""
    return all(
        f["error_rows"] == 0 and f["max_rel_score_diff"] <= score_rel and f["ranking_identical"]
        and f["max_map_diff_of_range"] <= map_frac
        for f in (figures["score_bundle"], figures["score_export"])
    )
