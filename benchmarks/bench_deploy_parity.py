"""Deploy exactly what was evaluated, on real data: bottle cropped to 320 x 200 (as bench_geometry's
``crop``), one bundle per geometry (resize, letterbox, short-side, and tiles), then per test image
`evaluate` vs `pni-ray score BUNDLE` vs `pni-ray score EXPORT` (float32 maps): max relative image-score
difference, ranking, max map difference as a fraction of the evaluated map's range, error rows.

    .venv/bin/python benchmarks/bench_deploy_parity.py --workdir /tmp/deploy --threads 1 --json out.json

Bundles already in --workdir are reused (delete them to retrain). Lighter than bench_geometry by
default (efficientnet_lite0 at 160 px) so the four trainings fit a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_geometry import CROP_SIZE, DATA, crop_box  # noqa: E402

from pni_ray.export.deploy_parity import deployment_parity, within_limits  # noqa: E402
from pni_ray.bundle import save_bundle  # noqa: E402
from pni_ray.config import FeatureConfig, GeometryConfig, TrainConfig  # noqa: E402
from pni_ray.data.mvtec import derive_category  # noqa: E402
from pni_ray.training import train_category  # noqa: E402


def geometries(tile_size: int) -> dict[str, GeometryConfig]:
    return {
        "resize": GeometryConfig(),
        "letterbox": GeometryConfig(policy="letterbox"),
        "short-side": GeometryConfig(policy="short-side"),
        "tile": GeometryConfig(tile=True, tile_size=tile_size, tile_overlap=32, tile_scale=0.5),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/pni_ray_bench_deploy"))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--tile-size", type=int, default=128)
    p.add_argument("--geometries", default="resize,letterbox,short-side,tile")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not (args.data / "bottle" / "test").is_dir():
        print(f"skipped: no bottle at {args.data}", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    crop_root = args.workdir / "data"
    if not (crop_root / "bottle" / "test").is_dir():
        derive_category(args.data, "bottle", crop_root, crop=crop_box(args.data), size=CROP_SIZE)
    base = TrainConfig(features=dataclasses.replace(FeatureConfig(), backbone=args.backbone, image_size=args.image_size))
    results = {}
    for name in args.geometries.split(","):
        bundle = args.workdir / "bundles" / name
        t0 = time.perf_counter()
        if not (bundle / "manifest.json").is_file():
            trained = train_category(crop_root, "bottle", base.replace(geometry=geometries(args.tile_size)[name]), progress=False)
            save_bundle(trained, bundle, overwrite=True)
        t1 = time.perf_counter()
        figures = deployment_parity(bundle, crop_root, "bottle", args.workdir / "runs" / name, engine=args.engine,
                                    threads=args.threads)
        figures.update(train_seconds=round(t1 - t0, 1), parity_seconds=round(time.perf_counter() - t1, 1),
                       within_limits=within_limits(figures))
        results[name] = figures
        b, e = figures["score_bundle"], figures["score_export"]
        print(f"{name:<10} n={figures['n_images']}  bundle: score rel {b.get('max_rel_score_diff', float('nan')):.2e} "
              f"map {b.get('max_map_diff_of_range', float('nan')):.2e} errors {b['error_rows']}  export: score rel "
              f"{e.get('max_rel_score_diff', float('nan')):.2e} map {e.get('max_map_diff_of_range', float('nan')):.2e} "
              f"errors {e['error_rows']}  ranking {b.get('ranking_identical')}/{e.get('ranking_identical')}  "
              f"ok={figures['within_limits']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["within_limits"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
