"""Greedy k-center coreset: picks/s of the pruned implementation vs the previous one, same order.

    .venv/bin/python benchmarks/bench_coreset.py --category bottle --reference-picks 2000
    .venv/bin/python benchmarks/bench_coreset.py --large --reference-picks 600
    .venv/bin/python benchmarks/bench_coreset.py --texture --reference-picks 500

Features are the training pool `pni-ray train` builds at the defaults (efficientnet_lite2,
320 px, the held-out calibration images left out), extracted once and cached under --cache.
`--large` builds a big category first: transistor's train/good images with their three flips,
grayscale, cropped to 1024 x 768 (846 images: 761 in the memory bank, 779k patches, |C_emb|
capped at 16384) -- written under --large-root so `pni-ray train` can be timed on it too.
`--texture` writes the synthetic granite texture at a real category's size instead (320 px, 220
train/good images, pni_ray.data.synthetic): features without clusters, where the triangle rule
admits most members every pick and the members' lower bound does the pruning.

The previous implementation (tests/coreset_reference.py) runs for --reference-picks picks
(all of them with --reference-picks 0); its prefix of the order must equal the new one's.
Both run in this process at --threads torch threads, so their ratio is measured in one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

LARGE_NAME = "transistor_x4"
LARGE_IMAGES = 846
LARGE_CROP = (1024, 768)  # width, height: non-square like the field case in issue 15
TEXTURE_NAME = "granite"
TEXTURE_TRAIN, TEXTURE_SIZE = 220, 320


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "mvtec_ad")
    p.add_argument("--category", default="bottle")
    data_set = p.add_mutually_exclusive_group()
    data_set.add_argument("--large", action="store_true", help="build and use the 846-image flipped-transistor category")
    data_set.add_argument("--texture", action="store_true", help="build and use a 220-image synthetic granite texture")
    p.add_argument("--large-root", type=Path, default=Path("/tmp/pni_large"),
                   help="where --large (and --texture, under texture/) write their images")
    p.add_argument("--cache", type=Path, default=Path("/tmp/pni_coreset_cache"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reference-picks", type=int, default=1000, help="picks timed for the previous code (0: all)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def make_large_category(source: Path, root: Path) -> Path:
    """transistor train/good x {identity, hflip, vflip, both}, grayscale, 1024 x 768 centre crop."""
    from PIL import Image, ImageOps

    out = root / LARGE_NAME / "train" / "good"
    if out.is_dir() and len(list(out.glob("*.png"))) == LARGE_IMAGES:
        return root
    out.mkdir(parents=True, exist_ok=True)
    images = sorted((source / "transistor" / "train" / "good").glob("*.png"))
    flips = [lambda im: im, ImageOps.mirror, ImageOps.flip, lambda im: ImageOps.flip(ImageOps.mirror(im))]
    n = 0
    for flip in flips:
        for path in images:
            if n == LARGE_IMAGES:
                return root
            with Image.open(path) as im:
                gray = flip(im.convert("L"))
                w, h = gray.size
                cw, ch = LARGE_CROP
                left, top = (w - cw) // 2, (h - ch) // 2
                gray.crop((left, top, left + cw, top + ch)).save(out / f"{n:04d}.png")
            n += 1
    return root


def make_texture_category(root: Path, n_train: int = TEXTURE_TRAIN, size: int = TEXTURE_SIZE) -> Path:
    """The synthetic granite texture with `n_train` train/good images of `size` px under root (kept if there)."""
    from PIL import Image

    from pni_ray.data.synthetic.generate import SyntheticSpec, make_synthetic

    images = sorted((root / TEXTURE_NAME / "train" / "good").glob("*.png"))
    if images and len(images) == n_train:
        with Image.open(images[0]) as im:
            if im.size == (size, size):
                return root
    make_synthetic(root, seed=0, categories=[TEXTURE_NAME],
                   spec=SyntheticSpec(size=size, n_train=n_train, n_test_good=0, n_test_defect_per_type=0))
    return root


def training_pool(data_root: Path, category: str, cache: Path, cfg=None) -> torch.Tensor:
    """(N, D) patch rows exactly as train_category hands them to the coreset (`cfg`: the defaults)."""
    from pni_ray.config import TrainConfig
    from pni_ray.geometry import Geometry
    from pni_ray.predict import extract_training_features
    from pni_ray.data.mvtec import load_category
    from pni_ray.models.features import build_extractor
    from pni_ray.training import calibration_split, coreset_pool

    cfg = cfg or TrainConfig()
    cache.mkdir(parents=True, exist_ok=True)
    # every setting that shapes the pool, and where its images are (two roots may share a category name)
    key = hashlib.sha256(f"{cfg!r} {Path(data_root).resolve()}".encode()).hexdigest()[:12]
    path = cache / f"{category}-{cfg.features.backbone}-{cfg.features.image_size}px-{key}.pt"
    if path.is_file():
        return torch.load(path)
    geometry = Geometry.from_config(cfg)
    cat = load_category(data_root, category, max_pixels=geometry.max_pixels)
    keep, _ = calibration_split(cat.train, cfg)
    torch.manual_seed(cfg.seed)
    feats, valid = extract_training_features(build_extractor(cfg.features), geometry, keep, cfg.batch_size, True)
    pool = coreset_pool(feats, valid, cfg)[1].contiguous()
    torch.save(pool, path)
    return pool


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from coreset_reference import greedy_kcenter_order_reference

    from pni_ray.config import TrainConfig
    from pni_ray.models.coreset import greedy_kcenter_order
    from pni_ray.training import coreset_size

    data_root, category = args.data_root, args.category
    needs = None if args.texture else "transistor" if args.large else category  # the texture is generated
    if needs and not (args.data_root / needs / "train" / "good").is_dir():
        print(f"skipping: {needs} not found under {args.data_root} (its train/good/ images are the coreset's input)")
        return
    if args.large:
        data_root, category = make_large_category(args.data_root, args.large_root), LARGE_NAME
    elif args.texture:
        data_root, category = make_texture_category(args.large_root / "texture"), TEXTURE_NAME
    rows = training_pool(data_root, category, args.cache)
    c = TrainConfig().coreset
    n_select = coreset_size(rows.shape[0], c.ratio, c.min_size, c.max_size)
    n_ref = n_select if args.reference_picks <= 0 else min(n_select, args.reference_picks)
    print(f"{category}: {rows.shape[0]} patches x {rows.shape[1]}, |C_emb| = {n_select}, {args.threads} thread(s)")

    greedy_kcenter_order(rows[:4096], 16, c.projection_dim, c.chunk_size, 0, progress=False)  # numba compiles or loads
    t = time.perf_counter()
    new = greedy_kcenter_order(rows, n_select, c.projection_dim, c.chunk_size, 0, progress=False)
    t_new = time.perf_counter() - t
    t = time.perf_counter()
    new_prefix = greedy_kcenter_order(rows, n_ref, c.projection_dim, c.chunk_size, 0, progress=False)
    t_new_prefix = time.perf_counter() - t
    t = time.perf_counter()
    ref = greedy_kcenter_order_reference(rows, n_ref, c.projection_dim, c.chunk_size, 0, progress=False)
    t_ref = time.perf_counter() - t

    same = bool(torch.equal(ref, new[:n_ref])) and bool(torch.equal(ref, new_prefix))
    result = {
        "category": category,
        "n_patches": rows.shape[0],
        "dim": rows.shape[1],
        "n_select": n_select,
        "threads": args.threads,
        "reference_picks": n_ref,
        "reference_s": t_ref,
        "reference_picks_per_s": n_ref / t_ref,
        "new_prefix_s": t_new_prefix,
        "new_prefix_picks_per_s": n_ref / t_new_prefix,
        "new_full_s": t_new,
        "new_full_picks_per_s": n_select / t_new,
        "speedup_same_prefix": t_ref / t_new_prefix,
        "same_order": same,
    }
    print(f"previous: {n_ref} picks in {t_ref:.1f} s = {n_ref / t_ref:.1f} picks/s")
    print(f"new:      {n_ref} picks in {t_new_prefix:.2f} s = {n_ref / t_new_prefix:.1f} picks/s "
          f"({t_ref / t_new_prefix:.1f}x on the same prefix)")
    print(f"new:      all {n_select} picks in {t_new:.2f} s = {n_select / t_new:.1f} picks/s")
    print(f"order identical to the previous code over the first {n_ref} picks: {same}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
