"""Images/s of `pni-ray score` (local Ray) versus a plain in-process loop over the same images.

    python benchmarks/bench_score.py [--images 1000] [--bundle BUNDLE] [--repeats 1] [--json FILE]

Both sides start cold, as a user would run them: `pni-ray score` is a subprocess (interpreter,
imports, embedded Ray, model actors), and the plain loop is a subprocess too (interpreter,
imports, model) that decodes, resizes, scores with torch on all cores, upsamples and encodes
each map and writes one Parquet file: the same work, no Ray, no chunking, no resume. With
--repeats R the two alternate R times and the medians are compared. Without --bundle a tiny
128 px "washer" bundle is trained on synthetic data first (seconds).

The plain loop runs with 1 torch thread and with all CPUs (--plain-threads) and the faster one is
the baseline: on busy or oversubscribed cores more threads can be several times slower.

Prints images/s of each, the ratio ray / plain (target >= 0.75), and the steady-state rates
after start-up (Ray: from its first committed chunk; plain: after loading the model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PNI_RAY = [sys.executable, "-c", "from pni_ray.cli import main; main()"]  # what the `pni-ray` script runs

from pni_ray.orchestration.score_inputs import CHUNK_SIZE  # noqa: E402  score's default chunk


def tiny_bundle(workdir: Path) -> Path:
    import dataclasses

    import torch

    from pni_ray.bundle import save_bundle
    from pni_ray.config import CoresetConfig, FeatureConfig, NeighbourhoodConfig, ScoringConfig, TrainConfig
    from pni_ray.data.synthetic import SyntheticSpec, make_synthetic
    from pni_ray.training import train_category

    torch.set_num_threads(os.cpu_count() or 1)
    data = workdir / "synthetic"
    make_synthetic(data, seed=0, categories=["washer"],
                   spec=SyntheticSpec(size=128, n_train=16, n_test_good=4, n_test_defect_per_type=2))
    cfg = dataclasses.replace(
        TrainConfig(),
        features=FeatureConfig(backbone="efficientnet_lite0", image_size=128),
        coreset=CoresetConfig(ratio=0.1, min_size=64, max_size=2048),
        neighbourhood=NeighbourhoodConfig(dist_size=64, hidden=64, bottleneck=16, epochs=3, window=5),
        scoring=ScoringConfig(holdout_fraction=0.15, blur_sigma=2.0),
        batch_size=8,
    )
    trained = train_category(data, "washer", cfg, progress=False)
    return save_bundle(trained, workdir / "bundle", overwrite=True)


def plain_loop(bundle: str, root: str, out: str, batch_size: int, threads: int) -> None:
    """The baseline, run in a fresh interpreter: a for loop, nothing else."""
    t0 = time.perf_counter()
    import numpy as np
    import torch

    from pni_ray.data.images import ImageError, is_image_file, load_rgb
    from pni_ray.orchestration.model_loader import load_scoring_model
    from pni_ray.results import error_row, now_utc, rows_to_table, schema, scored_row, table_to_parquet_bytes

    torch.set_num_threads(threads)
    model = load_scoring_model(bundle)
    paths = sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and is_image_file(p))
    t_loaded = time.perf_counter()
    rows = []
    for i in range(0, len(paths), batch_size):
        batch, ok = [], []
        for p in paths[i: i + batch_size]:
            try:
                batch.append(model.geometry.prepare(load_rgb(p)))
                ok.append(p)
            except ImageError as exc:
                rows.append(error_row(p, model.category, str(exc), model.model_id, now_utc()))
        if not batch:
            continue
        maps, scores = model.canvas_maps(batch)
        for p, prepared, m, s in zip(ok, batch, maps, scores):
            rows.append(scored_row(p, model.category, float(s), model.threshold, model.geometry.restore(m, prepared), "uint8",
                                   model.model_id, now_utc()))
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "plain.parquet").write_bytes(table_to_parquet_bytes(rows_to_table(rows, schema("uint8", model.threshold))))
    t1 = time.perf_counter()
    print(json.dumps({"images": len(rows), "in_process_seconds": t1 - t0, "steady_seconds": t1 - t_loaded}))


def run_ray(bundle: Path, root: Path, out: Path, workers: int | None, batch_size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*PNI_RAY, "-q", "score", str(bundle), str(root), "--out", str(out),
           "--batch-size", str(batch_size), "--no-progress"] + (["--workers", str(workers)] if workers else [])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pni-ray score failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "_summary.json").read_text())
    run = summary["run"]
    n = summary["scored"]
    first = run["first_chunk_seconds"] or 0.0
    steady = after_first_chunk(n, run["pipeline_seconds"], first)
    return {"images": n, "wall_s": wall, "images_per_s": n / wall, "steady_images_per_s": steady,
            "startup_s": wall - (run["pipeline_seconds"] - first) if steady else None}


def after_first_chunk(n: int, pipeline_s: float, first_chunk_s: float) -> float | None:
    """images/s once the first chunk (CHUNK_SIZE images) is committed; None when every image was in it."""
    return (n - CHUNK_SIZE) / max(pipeline_s - first_chunk_s, 1e-9) if n > CHUNK_SIZE else None


def run_plain(bundle: Path, root: Path, out: Path, batch_size: int, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-loop", str(bundle), str(root), str(out),
           str(batch_size), str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    n = res["images"]
    return {"images": n, "wall_s": wall, "images_per_s": n / wall, "steady_images_per_s": n / res["steady_seconds"],
            "startup_s": wall - res["steady_seconds"]}


def compare_outputs(ray_out: Path, plain_out: Path) -> float:
    import pyarrow.parquet as pq

    from pni_ray.results import read_table

    a = {r["path"]: r["image_score"] for r in read_table(ray_out, columns=["path", "image_score"]).to_pylist()}
    b = {r["path"]: r["image_score"] for r in pq.read_table(plain_out / "plain.parquet", columns=["path", "image_score"]).to_pylist()}
    assert a.keys() == b.keys(), "different rows"
    return max(abs(a[k] - b[k]) for k in a)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--plain-loop":
        plain_loop(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=None, help="model actors (default: one per CPU)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--plain-threads", default=None,
                    help="torch threads of the plain loop, comma-separated; the fastest is the baseline "
                         "(default: 1 and all CPUs, as oversubscribed cores can make more threads slower)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from pni_ray.orchestration.corpus import make_image_corpus

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_score_"))
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    bundle = args.bundle or tiny_bundle(workdir)
    sources = sorted((workdir / "synthetic" / "washer" / "test").glob("*/*.png")) if not args.bundle else []
    if not sources:
        from pni_ray.data.synthetic import SyntheticSpec, make_synthetic

        make_synthetic(workdir / "synthetic", seed=0, categories=["washer"],
                       spec=SyntheticSpec(size=128, n_train=1, n_test_good=4, n_test_defect_per_type=2))
        sources = sorted((workdir / "synthetic" / "washer" / "test").glob("*/*.png"))
    root = workdir / "images"
    shutil.rmtree(root, ignore_errors=True)
    make_image_corpus(sources, root, args.images)
    print(f"setup {time.perf_counter() - t:.1f} s: {args.images} images, bundle {bundle}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)

    threads = sorted({int(t) for t in (args.plain_threads or f"1,{os.cpu_count() or 1}").split(",")})
    ray_runs, plain_by_threads = [], {t: [] for t in threads}
    for r in range(args.repeats):
        for t in threads:
            plain_by_threads[t].append(run_plain(bundle, root, workdir / "plain", args.batch_size, t))
            print(f"[{r + 1}] plain loop, {t} torch threads: {plain_by_threads[t][-1]['images_per_s']:.2f} images/s "
                  f"({plain_by_threads[t][-1]['wall_s']:.1f} s)", flush=True)
        ray_runs.append(run_ray(bundle, root, workdir / "ray", args.workers, args.batch_size))
        print(f"[{r + 1}] pni-ray score: {ray_runs[-1]['images_per_s']:.2f} images/s "
              f"({ray_runs[-1]['wall_s']:.1f} s)", flush=True)
    diff = compare_outputs(workdir / "ray", workdir / "plain")

    def med(runs: list[dict], key: str) -> float | None:
        values = [r[key] for r in runs]
        return None if None in values else statistics.median(values)

    def rate(value: float | None, unit: str = " images/s") -> str:
        return f"n/a (all {args.images} images in the first chunk of {CHUNK_SIZE})" if value is None else f"{value:.2f}{unit}"

    best_threads = max(threads, key=lambda t: med(plain_by_threads[t], "images_per_s"))
    plain_runs = plain_by_threads[best_threads]

    result = {
        "images": args.images, "cpus": os.cpu_count(), "repeats": args.repeats, "load_average_end": os.getloadavg()[0],
        "ray_images_per_s": med(ray_runs, "images_per_s"), "plain_images_per_s": med(plain_runs, "images_per_s"),
        "ray_steady_images_per_s": med(ray_runs, "steady_images_per_s"),
        "plain_steady_images_per_s": med(plain_runs, "steady_images_per_s"),
        "ray_startup_s": med(ray_runs, "startup_s"), "plain_startup_s": med(plain_runs, "startup_s"),
        "plain_threads": best_threads, "max_abs_score_difference": diff,
        "runs": {"ray": ray_runs, **{f"plain_{t}_threads": v for t, v in plain_by_threads.items()}},
    }
    result["ratio"] = result["ray_images_per_s"] / result["plain_images_per_s"]
    result["steady_ratio"] = (None if result["ray_steady_images_per_s"] is None
                              else result["ray_steady_images_per_s"] / result["plain_steady_images_per_s"])
    print(f"\n{args.images} images, {os.cpu_count()} CPUs, median of {args.repeats}:")
    print(f"  pni-ray score (local Ray): {result['ray_images_per_s']:8.2f} images/s end to end "
          + ("" if result["ray_startup_s"] is None else f"(start-up {result['ray_startup_s']:.1f} s, then ")
          + rate(result["ray_steady_images_per_s"]) + ("" if result["ray_startup_s"] is None else ")"))
    for t in threads:
        print(f"  plain loop, {t} thread(s):  {med(plain_by_threads[t], 'images_per_s'):8.2f} images/s end to end")
    print(f"  plain in-process loop:     {result['plain_images_per_s']:8.2f} images/s end to end, best ({best_threads} threads) "
          f"(start-up {result['plain_startup_s']:.1f} s, then {result['plain_steady_images_per_s']:.2f} images/s)")
    print(f"  ratio ray / plain: {result['ratio']:.2f}x end to end (target >= 0.75), "
          f"{rate(result['steady_ratio'], 'x')} after start-up; max |score difference| {diff:.2e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
