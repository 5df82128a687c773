"""PNI scoring time relative to PatchCore scoring, same bundle, same images, one run.

    python benchmarks/bench_scoring_modes.py [--bundle DIR] [--data-root ../shared/data/mvtec_ad] [--threads 1] [--repeats 3]

Times the bundle on its own category's test images under --data-root. Without --bundle it trains one
on bottle there when present (else on generated washer images). Both modes include the backbone; PNI
adds the neighbourhood MLP and the masked minimum. Target: pni / patchcore <= 1.3 (issue 12).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pni_ray.bundle import save_bundle
from pni_ray.bundle_manifest import read_manifest
from pni_ray.config import TrainConfig
from pni_ray.data.mvtec import load_category
from pni_ray.data.transforms import load_batch
from pni_ray.inference import load_detector
from pni_ray.training import train_category

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-scoring-modes-") as scratch:  # bundles, images: removed after
        run(Path(scratch))


def run(scratch: Path) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-images", type=int, default=32)
    ap.add_argument("--data-root", type=Path, default=DATA_ROOT, help="folder of category folders")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = args.bundle
    if bundle is not None:
        category, data_root = read_manifest(bundle)["category"], args.data_root
        if not (data_root / category / "test").is_dir():
            sys.exit(f"{bundle} is a {category} model: no {category}/test/ under {data_root} (--data-root)")
    elif (args.data_root / "bottle").is_dir():
        data_root, category = args.data_root, "bottle"
    else:
        from pni_ray.data.synthetic import make_synthetic

        data_root, category = scratch / "synthetic", "washer"
        make_synthetic(data_root, categories=[category])
    if bundle is None:
        bundle = scratch / category
        print(f"training {category} at defaults (no --bundle given) ...")
        save_bundle(train_category(data_root, category, TrainConfig(), progress=False), bundle)
    detector, manifest = load_detector(bundle)
    test = [s.path for s in load_category(data_root, category).test]
    # evenly spaced over the test split, so every defect type and good images are timed (the split is
    # sorted by type: its first 16 images are all one type)
    paths = [test[i] for i in np.linspace(0, len(test) - 1, min(args.n_images, len(test))).round().astype(int)]
    images = load_batch(paths, detector.image_size)
    timings = {"patchcore": [], "pni": []}
    with torch.no_grad():
        for mode in timings:  # a warm-up of each mode's own path (allocations, the candidate lists)
            detector(images[:2], mode=mode)
        for _ in range(args.repeats):
            for mode in ("patchcore", "pni"):  # interleaved so drift hits both alike
                t0 = time.perf_counter()
                for i in range(0, len(images), 8):
                    detector(images[i : i + 8], mode=mode)
                timings[mode].append(time.perf_counter() - t0)
    best = {m: min(t) for m, t in timings.items()}
    n = len(images)
    print(f"bundle {bundle} (|C_emb|={manifest['n_memory']}, |C_dist|={manifest['dist_size']}), "
          f"{n} {category} test images from {data_root} at {detector.image_size}px, {args.threads} thread(s), best of {args.repeats}")
    for mode, t in best.items():
        print(f"  {mode:<10} {n / t:8.2f} images/s  ({1000 * t / n:.1f} ms/image)")
    print(f"pni / patchcore scoring time: {best['pni'] / best['patchcore']:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
