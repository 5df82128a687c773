"""Image geometry on real data: policies on a non-square bottle, and tiling on an upscaled one.

Two experiments on ../shared/data/mvtec_ad/bottle (skipped with a message when it is absent),
each on a derived copy written under --workdir (images and masks cropped / resized alike):

``crop``  bottle cropped to its central 900 x 562 band and resized to 320 x 200 (w x h). One
          model per policy (resize, letterbox, short-side) at the defaults; each is evaluated on
          the cropped test split (maps at 200 x 320, checked) in patchcore and pni modes.
``tile``  bottle upscaled to 1280 x 1280. The untiled run squashes to the model size
          (--tile-model-size, 320); the tiled run covers the 1280 image with overlapping tiles of
          that size (--tile-overlap) stitched into one 160 x 160 feature grid. Both at the same
          config otherwise; the tiled coreset draws from a seeded subsample of the patch rows
          (--coreset-candidates), because its grid has 16x the patches.

Prints one table per experiment (metrics, training seconds, scoring seconds per image) and
writes them as JSON with --json.

    .venv/bin/python benchmarks/bench_geometry.py --workdir /tmp/geo --threads 2
    .venv/bin/python benchmarks/bench_geometry.py --experiments tile --mode patchcore
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pni_ray.config import GeometryConfig, TrainConfig
from pni_ray.data.mvtec import derive_category, load_category
from pni_ray.evaluate import evaluate_category, run_modes
from pni_ray.models.pni import build_detector
from pni_ray.training import train_category

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"
# top, left, height, width of the central band of the (square) bottle images, as fractions of their side:
# (169, 0, 562, 900) of the 900 px originals, (60, 0, 200, 320) of the shared 320 px copies
CROP_FRACTIONS = (169 / 900, 0.0, 562 / 900, 1.0)
CROP_SIZE = (200, 320)  # height, width


def crop_box(data: Path) -> tuple[int, int, int, int]:
    """CROP_FRACTIONS in pixels of the bottle images under `data` (a crop past the image's edge would be
    black padding, not bottle)."""
    with Image.open(sorted((data / "bottle" / "train" / "good").glob("*.png"))[0]) as first:
        w, h = first.size
    top, left, height, width = CROP_FRACTIONS
    return round(top * h), round(left * w), round(height * h), round(width * w)
UPSCALED = (1280, 1280)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="MVTec AD root holding bottle/")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/pni_ray_bench_geometry"))
    p.add_argument("--experiments", default="crop,tile", help="comma-separated: crop, tile")
    p.add_argument("--mode", choices=("pni", "patchcore"), default="pni", help="training mode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tile-model-size", type=int, default=320)
    p.add_argument("--tile-overlap", type=int, default=64)
    p.add_argument("--coreset-candidates", type=int, default=400_000)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def derived(src: Path, dst: Path, **kw) -> Path:
    """The derived bottle copy, written once (a finished copy is marked by a stamp file)."""
    stamp = dst / ".complete"
    if not stamp.exists():
        t = time.perf_counter()
        derive_category(src, "bottle", dst, **kw)
        stamp.write_text("ok")
        print(f"derived {dst / 'bottle'} ({kw}) in {time.perf_counter() - t:.0f} s", flush=True)
    return dst


def drop_lost_defects(root: Path) -> None:
    """Remove test images whose whole defect was cropped away: labelled defective, nothing to see."""
    lost = [s for s in load_category(root, "bottle").test
            if s.mask_path is not None and not np.asarray(Image.open(s.mask_path)).any()]
    for sample in lost:
        sample.path.unlink()
        sample.mask_path.unlink()
    print(f"crop: dropped {len(lost)} test images whose defect lies wholly outside the crop: "
          f"{[f'{s.defect_type}/{s.path.name}' for s in lost]}", flush=True)


def run_one(name: str, root: Path, cfg: TrainConfig, expect_hw: tuple[int, int]) -> dict:
    """Train on root/bottle, evaluate patchcore (+ pni), check map sizes; one row of the table."""
    print(f"--- {name}: training ({cfg.geometry})", flush=True)
    trained = train_category(root, "bottle", cfg)
    detector = build_detector(trained)
    cat = load_category(root, "bottle", max_pixels=cfg.geometry.max_pixels)
    modes = ("patchcore", "pni") if cfg.mode == "pni" else ("patchcore",)
    probe = run_modes(detector, [cat.test[0].path], ("patchcore",), progress=False)["patchcore"]
    if probe.maps[0].shape != expect_hw:
        raise SystemExit(f"{name}: map of {probe.maps[0].shape}, expected the image's own {expect_hw}")
    t = time.perf_counter()
    metrics = evaluate_category(detector, cat, modes=modes)
    seconds = time.perf_counter() - t
    facts = trained.report["deterministic"]
    row = {
        "train_s": round(trained.report["seconds"]["total"], 1),
        "eval_s_per_image": round(seconds / len(cat.test), 3),
        "grid": list(trained.grid),
        "memory": int(trained.memory.shape[0]),
        "n_valid_patches": facts.get("n_valid_patches", facts["n_patches"]),
        "map_hw": list(probe.maps[0].shape),
        "modes": {m: {k: metrics[m][k] for k in ("image_auroc", "pixel_auroc", "aupro", "images_per_s")} for m in modes},
    }
    print(json.dumps({name: row}), flush=True)
    return row


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'run':<22} {'mode':<10} {'img AUROC':>9} {'px AUROC':>9} {'AUPRO':>7} {'train s':>8} {'s/img':>7}  grid")
    for name, row in rows.items():
        for mode, m in row["modes"].items():
            print(f"{name:<22} {mode:<10} {m['image_auroc']:>9.4f} {m['pixel_auroc']:>9.4f} {m['aupro']:>7.4f} "
                  f"{row['train_s']:>8.0f} {1 / m['images_per_s']:>7.2f}  {row['grid'][0]}x{row['grid'][1]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "bottle" / "train" / "good").is_dir():
        print(f"skipped: no bottle data at {args.data / 'bottle'}")
        return 0
    torch.set_num_threads(args.threads)
    base = TrainConfig(mode=args.mode)
    results: dict[str, dict] = {}
    todo = {e.strip() for e in args.experiments.split(",") if e.strip()}
    if "crop" in todo:
        root = derived(args.data, args.workdir / "crop", crop=crop_box(args.data), size=CROP_SIZE)
        drop_lost_defects(root)
        rows = {}
        for policy in ("resize", "letterbox", "short-side"):
            cfg = dataclasses.replace(base, geometry=GeometryConfig(policy=policy))
            rows[policy] = run_one(f"crop/{policy}", root, cfg, CROP_SIZE)
        results["crop_320x200"] = rows
        print_table(f"bottle cropped to 320 x 200 (w x h), model size {base.features.image_size}", rows)
    if "tile" in todo:
        root = derived(args.data, args.workdir / "up", size=UPSCALED)
        size = args.tile_model_size
        feats = dataclasses.replace(base.features, image_size=size)
        untiled = dataclasses.replace(base, features=feats)
        tiled = dataclasses.replace(
            untiled,
            geometry=GeometryConfig(tile=True, tile_size=size, tile_overlap=args.tile_overlap),
            coreset=dataclasses.replace(base.coreset, max_candidates=args.coreset_candidates),
        )
        rows = {f"resize to {size}": run_one(f"up/resize{size}", root, untiled, UPSCALED),
                f"tiles of {size}": run_one(f"up/tiled{size}", root, tiled, UPSCALED)}
        results["upscaled_1280"] = rows
        print_table(f"bottle upscaled to 1280 x 1280: squashed to {size} vs tiled at native resolution", rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
