"""Wall time of `train-all` (local Ray, N tasks x 1 CPU) versus sequential training (1 thread).

Both are measured in one run on the same synthetic categories and the same config:

- sequential: ``fit_category(..., threads=1)`` + ``save_bundle`` for each category in turn (what
  ``pni-ray train --threads 1`` does, one category after the other);
- train-all:  ``train_all(..., cpus_per_task=1)`` with an embedded local Ray of ``--ray-cpus``
  CPUs, timed from the call (so Ray start-up, worker start-up and shutdown are included) to
  the written summary; evaluation is off in both.

It also checks that both produce bundles with the same model_id per category, and prints the
ratio train-all / sequential (target: <= 0.7x with 2 tasks on 2 cores).

    .venv/bin/python benchmarks/bench_train_all.py                        # 4 categories at 256 px
    .venv/bin/python benchmarks/bench_train_all.py --categories weave,washer --json out.json

On a machine shared with other busy sessions the wall ratio says little: Linux's autogroup
scheduler shares the CPUs equally between sessions, so the two Ray workers (one session) get no
more CPU than the one sequential process did, and the load drifting between the two phases
moves the ratio either way. The script therefore also prints the CPU time
each phase obtained and the load average, and flags a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--categories", default="weave,washer,granite,pillbox", help="synthetic categories (>= 2)")
    p.add_argument("--size", type=int, default=256, help="image side in px (data and model input)")
    p.add_argument("--n-train", type=int, default=40, help="train/good images per category")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--epochs", type=int, default=None, help="neighbourhood-MLP epochs (default: config default)")
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray (= parallel 1-CPU tasks)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temp dir, removed afterwards")
    p.add_argument("--order", choices=("sequential-first", "ray-first"), default="sequential-first")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pni_ray.bundle import model_id, save_bundle
    from pni_ray.options import build_config
    from pni_ray.data.synthetic import SyntheticSpec, make_synthetic
    from pni_ray.orchestration.train_all import train_all
    from pni_ray.fit import fit_category

    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    if len(categories) < 2:
        sys.exit("give at least two categories")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_all_"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    t0 = time.perf_counter()
    make_synthetic(data, seed=0, categories=categories,
                   spec=SyntheticSpec(size=args.size, n_train=args.n_train, n_test_good=2, n_test_defect_per_type=1))
    print(f"data: {len(categories)} categories x {args.n_train} train images at {args.size} px "
          f"({time.perf_counter() - t0:.1f} s) in {data}", flush=True)
    cfg = build_config(backbone=args.backbone, image_size=args.size, epochs=args.epochs)

    def sequential() -> tuple[float, dict[str, str], dict[str, float]]:
        out = workdir / "sequential"
        shutil.rmtree(out, ignore_errors=True)
        ids, per = {}, {}
        t, cpu = time.perf_counter(), time.process_time()
        load0 = os.getloadavg()[0]
        for category in categories:
            tc = time.perf_counter()
            trained = fit_category(data, category, cfg, 1, progress=False)  # as `pni-ray train --threads 1`
            ids[category] = model_id(save_bundle(trained, out / category / args.backbone))
            per[category] = time.perf_counter() - tc
            print(f"  sequential {category}: {per[category]:.1f} s", flush=True)
        wall = time.perf_counter() - t
        info = {"cpu_seconds": time.process_time() - cpu, "load_start": load0, "load_end": os.getloadavg()[0]}
        return wall, ids, per, info

    def with_ray() -> tuple[float, dict[str, str], dict]:
        out = workdir / "train_all"
        shutil.rmtree(out, ignore_errors=True)
        t, load0 = time.perf_counter(), os.getloadavg()[0]
        result = train_all(data, out, cfg, categories=categories, backbones=[args.backbone], cpus_per_task=1,
                           num_cpus=args.ray_cpus, evaluate=False, echo=lambda m: print("  " + m, flush=True))
        wall = time.perf_counter() - t
        if not result.ok:
            sys.exit(f"train-all failed: {result.failed}")
        ids = {r["category"]: r["model_id"] for r in result.rows}
        info = json.loads(result.summary_json.read_text())["ray"]
        info["task_seconds"] = {r["category"]: r["seconds"] for r in result.rows}
        info["peak_rss_mb"] = {r["category"]: r["peak_rss_mb"] for r in result.rows}
        info["cpu_seconds"] = sum(r["cpu_seconds"] for r in result.rows)
        info.update(load_start=load0, load_end=os.getloadavg()[0])
        return wall, ids, info

    runs = [("sequential", sequential), ("ray", with_ray)]
    if args.order == "ray-first":
        runs.reverse()
    results = {}
    for name, fn in runs:
        print(f"{name} ...", flush=True)
        results[name] = fn()
    t_seq, seq_ids, per, seq_info = results["sequential"]
    t_ray, ray_ids, info = results["ray"]
    same = seq_ids == ray_ids
    ratio = t_ray / t_seq
    figures = {
        "categories": categories, "size": args.size, "n_train": args.n_train, "backbone": args.backbone,
        "ray_cpus": args.ray_cpus, "cpu_count": os.cpu_count(), "load_avg_1min_end": os.getloadavg()[0],
        "sequential_seconds": round(t_seq, 2), "sequential_per_category": {k: round(v, 2) for k, v in per.items()},
        "train_all_seconds": round(t_ray, 2), "ray_init_seconds": round(info.get("init_seconds", float("nan")), 2),
        "train_all_task_seconds": info["task_seconds"], "train_all_peak_rss_mb": info["peak_rss_mb"],
        "ratio": round(ratio, 3), "target": 0.7, "same_model_ids": same,
        # CPU actually obtained: on a machine shared with other work the wall ratio follows the load
        "sequential_cpu_seconds": round(seq_info["cpu_seconds"], 1),
        "train_all_task_cpu_seconds": round(info["cpu_seconds"], 1),
        "sequential_cores_used": round(seq_info["cpu_seconds"] / t_seq, 2),
        "train_all_cores_used": round(info["cpu_seconds"] / t_ray, 2),
        "load_avg_sequential": [round(seq_info["load_start"], 1), round(seq_info["load_end"], 1)],
        "load_avg_train_all": [round(info["load_start"], 1), round(info["load_end"], 1)],
    }
    print()
    print(f"sequential (1 thread):        {t_seq:8.1f} s  ({', '.join(f'{k} {v:.1f}' for k, v in per.items())})")
    print(f"train-all ({len(categories)} tasks x 1 CPU, "
          f"{args.ray_cpus}-CPU local Ray): {t_ray:6.1f} s  (Ray start {figures['ray_init_seconds']:.1f} s; "
          f"tasks {', '.join(f'{k} {v:.1f}' for k, v in info['task_seconds'].items())})")
    print(f"ratio train-all / sequential: {ratio:8.3f}x  (target <= 0.7x: {'met' if ratio <= 0.7 else 'NOT met'}); "
          f"same model_ids: {same}; load average now {figures['load_avg_1min_end']:.1f} on {os.cpu_count()} cores")
    print(f"CPU obtained: sequential {seq_info['cpu_seconds']:.0f} s CPU = {figures['sequential_cores_used']:.2f} cores "
          f"(load {figures['load_avg_sequential'][0]}->{figures['load_avg_sequential'][1]}); train-all tasks "
          f"{info['cpu_seconds']:.0f} s CPU = {figures['train_all_cores_used']:.2f} cores "
          f"(load {figures['load_avg_train_all'][0]}->{figures['load_avg_train_all'][1]})")
    busy = max(figures["load_avg_sequential"] + figures["load_avg_train_all"]) > (os.cpu_count() or 1) + 0.5
    figures["machine_busy"] = busy
    if busy:
        autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
        grouped = autogroup.is_file() and autogroup.read_text().strip() == "1"
        print(f"NOTE: the machine was busy with other work (load > {os.cpu_count()} cores)"
              + ("; with sched_autogroup on, this session's processes share one fair slice of the CPUs, so "
                 "the wall ratio mostly reflects how much CPU each phase was given (see 'CPU obtained'), "
                 "not train-all's own overhead" if grouped else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
