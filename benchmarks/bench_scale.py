"""`pni-ray score` at growing N: images/s, driver and worker peak memory, Parquet bytes per image.

    python benchmarks/bench_scale.py --sizes 1000,5000,20000 [--bundle BUNDLE] [--image-size 1024]
    python benchmarks/bench_scale.py --sizes 200,1000            # a quick run

Cost must grow linearly (images/s flat across N) and memory must not grow with N. Inputs are
`--pool` distinct synthetic images (pni_ray.data.synthetic, category `washer`, --image-size
px, PNG) hard-linked N times under nested folders of 1000 files: every input is its own
path that is decoded in full, while the disk holds only the pool (the pool stays in the page
cache, so file reads are cheaper than cold production storage). Each N runs `pni-ray score
BUNDLE DIR --out OUT` cold, in a subprocess, as a user would; its process tree is polled (/proc)
every --poll seconds for each process's peak RSS so far (VmHWM, so spikes between polls count): the driver (the `pni-ray` process itself) and the largest
Ray worker. Without --bundle a tiny 128 px washer bundle is trained first (seconds), so the
figures measure the pipeline (decode, resize, Ray, map encoding, Parquet), not the model.

images/s is end to end (start-up included); "after 1st chunk" is the rate once the first
Parquet part is committed (start-up excluded). Prints one row per N and the ratios of the largest N to the smallest (target: images/s after the 1st chunk
within 10%, peak memory within 20%).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pni_ray.orchestration.process_memory import vm_hwm_bytes  # noqa: E402

PNI_RAY = [sys.executable, "-c", "from pni_ray.cli import main; main()"]  # what the `pni-ray` script runs
FILES_PER_DIR = 1000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,5000,20000", help="comma-separated N")
    p.add_argument("--bundle", type=Path, default=None, help="model to score with (default: a tiny trained one)")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--pool", type=int, default=64, help="distinct images behind the N inputs")
    p.add_argument("--workers", type=int, default=None, help="pni-ray score --workers (default: its own)")
    p.add_argument("--map-format", default="uint8", choices=["uint8", "float16", "none"])
    p.add_argument("--poll", type=float, default=0.5)
    p.add_argument("--workdir", type=Path, default=None, help="keep inputs and outputs here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


@contextlib.contextmanager
def scratch_dir(path: Path | None, prefix: str) -> Iterator[Path]:
    """`path` (created) when given, so results are kept; else a temporary directory, removed after."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        yield Path(name)


def make_pool(folder: Path, count: int, size: int) -> list[Path]:
    """Distinct, seeded synthetic images (PNG) of the requested size."""
    from PIL import Image

    from pni_ray.data.synthetic import render

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"pool_{i:04d}.png"
        if not path.exists():
            image, _ = render("washer", (0, i), None, size)
            Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def link_inputs(folder: Path, pool: list[Path], n: int) -> Path:
    """N hard links to the pool's files, FILES_PER_DIR per sub-folder."""
    root = folder / f"inputs_{n}"
    if root.is_dir():
        return root
    for i in range(n):
        sub = root / f"d{i // FILES_PER_DIR:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        os.link(pool[i % len(pool)], sub / f"img_{i:06d}.png")
    return root


def _peak_rss_bytes(pid: str) -> int:
    """The process's peak RSS so far (VmHWM), so a spike between two polls still counts; its current RSS
    where /proc has no VmHWM."""
    hwm = vm_hwm_bytes(pid)
    if hwm is not None:
        return hwm
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, peak RSS bytes so far, command line), read from /proc (Linux)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            rss = _peak_rss_bytes(entry)
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        table[int(entry)] = (ppid, rss, cmd)
    return table


class TreeMemory:
    """Peak RSS of a process and of its largest descendant that is a Ray worker, polled from /proc."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid, self.interval = pid, interval
        self.driver = self.worker = 0
        self.workers_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            table = _proc_table()
            if self.pid in table:
                self.driver = max(self.driver, table[self.pid][1])
            tree, frontier = set(), {self.pid}
            while frontier:
                frontier = {p for p, (ppid, _, _) in table.items() if ppid in frontier} - tree
                tree |= frontier
            for p in tree:
                _, rss, cmd = table[p]
                if "default_worker" in cmd or cmd.startswith("ray::"):
                    self.workers_seen.add(p)
                    self.worker = max(self.worker, rss)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def score_once(bundle: Path, inputs: Path, out: Path, n: int, args: argparse.Namespace) -> dict:
    cmd = [*PNI_RAY, "score", str(bundle), str(inputs), "--out", str(out), "--map-format", args.map_format]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray whose workers are polled here
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    memory = TreeMemory(proc.pid, args.poll)
    first: list[tuple[float, Path]] = []

    def watch_first_part() -> None:  # start-up ends when the first chunk is committed
        while proc.poll() is None and not first:
            parts = sorted(out.glob("part-*.parquet"))
            if parts:
                first.append((time.perf_counter(), parts[0]))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_first_part, daemon=True)
    watcher.start()
    log, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    memory.stop()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"pni-ray score failed for N={n}:\n{log[-3000:]}")
    summary = json.loads((out / "_summary.json").read_text())
    parquet = sum(p.stat().st_size for p in out.glob("*.parquet"))
    steady = None
    if first:
        import pyarrow.parquet as pq

        _, part = first[0]
        rest = n - pq.ParquetFile(part).metadata.num_rows
        run = summary.get("run") or {}  # score's own clock: from the first commit to the pipeline's end, no exit tail
        span = (run.get("pipeline_seconds") or 0.0) - (run.get("first_chunk_seconds") or 0.0)
        steady = rest / span if rest > 0 and span > 0 else None
    return {
        "n": n, "seconds": seconds, "images_per_s": n / seconds, "steady_images_per_s": steady,
        "driver_peak_mb": memory.driver / 2**20, "worker_peak_mb": memory.worker / 2**20,
        "ray_workers": len(memory.workers_seen), "parquet_bytes_per_image": parquet / n,
        "scored": summary.get("scored"), "failed": summary.get("failed"),
    }


def run_sizes(args: argparse.Namespace, work: Path, sizes: list[int]) -> list[dict]:
    """Score each N cold; inputs, pool and outputs live under `work`."""
    bundle = args.bundle
    if bundle is None:
        from bench_score import tiny_bundle

        bundle = tiny_bundle(work)
    pool = make_pool(work / "pool", args.pool, args.image_size)
    rows = []
    for n in sizes:
        inputs = link_inputs(work, pool, n)
        out = work / f"out_{n}"
        if out.exists():
            shutil.rmtree(out)
        row = score_once(bundle, inputs, out, n, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def ratio_line(a: dict, b: dict) -> str:
    """Largest N against smallest: the flatness target is on the rate after the first chunk (a fixed start-up
    weighs less on a larger N, so the end-to-end rate rises with N by construction); n/a where a figure is missing
    (one chunk only, or no Ray worker seen)."""
    def ratio(key: str) -> str:
        return "n/a" if not a[key] or not b[key] else f"{b[key] / a[key]:.3f}x"

    return (f"N={b['n']} vs N={a['n']}: images/s after the 1st chunk {ratio('steady_images_per_s')} (target 0.9-1.1; "
            f"end to end {ratio('images_per_s')}), driver memory {ratio('driver_peak_mb')}, "
            f"worker memory {ratio('worker_peak_mb')} (target <= 1.2 each)")


def main() -> int:
    args = parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with scratch_dir(args.workdir, "pni-ray-scale-") as work:
        rows = run_sizes(args, work, sizes)
    print(f"\n`pni-ray score`, {args.image_size} x {args.image_size} PNG inputs, map format {args.map_format}")
    print("| N | seconds | images/s | after 1st chunk | driver peak MB | worker peak MB | Parquet bytes/image |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        steady = "-" if r["steady_images_per_s"] is None else f"{r['steady_images_per_s']:.2f}"
        print(f"| {r['n']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | {steady} | {r['driver_peak_mb']:.0f} | "
              f"{r['worker_peak_mb']:.0f} | {r['parquet_bytes_per_image']:.0f} |")
    if len(rows) > 1:
        print("\n" + ratio_line(rows[0], rows[-1]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
