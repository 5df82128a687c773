"""Where pixel AUROC is lost: the misordered (defect, normal) pixel pairs, split by where the pixels lie.

    python benchmarks/bench_pixel_loss.py --bundle B [--category bottle] [--modes patchcore,pni]
                                          [--data-root ../shared/data/mvtec_ad] [--json FILE]

1 - pixel AUROC is the share of (defect pixel, normal pixel) pairs the map orders wrongly (ties
count half). Each wrong pair is charged once to its defect pixel, grouped by depth inside the
mask, and once to its normal pixel, grouped by distance to the nearest defect pixel of its image
(normal pixels of good images form their own group); each split sums to 1 - AUROC. The same two
charges are also split by the test folder (defect type) of the pixel's image: which defects score
too low, and around which ones normal pixels score too high. A prior over which memory entries are
plausible changes patch scores; it cannot separate a normal pixel from a defect that its stride-8
patch and the blur overlap, nor raise a defect whose features are close to what is normal at that
place, so these splits bound what the priors can win on a category. Maps are compared at each
image's own size in float64 (bottle at 320 px: 8.5M pixels). Depth inside a mask counts only mask
pixels, so a defect cut by the image border is deeper there than it looks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import distance_transform_edt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEPTHS = ((0, 4), (4, 12), (12, None))  # px inside the mask
DISTANCES = ((0, 8), (8, 24), (24, 64), (64, None))  # px from the nearest defect pixel


def _band(values: np.ndarray, bands) -> np.ndarray:
    """Index of the (lo, hi] band each value falls in (-1: none)."""
    out = np.full(values.shape, -1, np.int16)
    for i, (lo, hi) in enumerate(bands):
        out[(values > lo) & (values <= (np.inf if hi is None else hi))] = i
    return out


def pixel_groups(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: defect-depth band (-1 on normal pixels) and normal-distance band (-1 on defect
    pixels; len(DISTANCES) on good images)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.full(mask.shape, -1, np.int16), np.full(mask.shape, len(DISTANCES), np.int16)
    depth = np.where(mask, _band(distance_transform_edt(mask), DEPTHS), -1)
    distance = np.where(mask, -1, _band(distance_transform_edt(~mask), DISTANCES))
    return depth.astype(np.int16), distance.astype(np.int16)


def loss_by_group(scores: np.ndarray, depth: np.ndarray, distance: np.ndarray,
                  kind: np.ndarray | None = None, kind_names: tuple[str, ...] = ()) -> dict[str, object]:
    """AUROC and the share of wrongly ordered pairs charged to each defect and each normal group; with
    `kind` (per pixel, the index in `kind_names` of its image's test folder, e.g. the defect type) also
    charged to the defect pixels and to the normal pixels of each kind."""
    is_defect = depth >= 0
    pos, neg = scores[is_defect].astype(np.float64), scores[~is_defect].astype(np.float64)
    pairs = float(len(pos)) * float(len(neg))
    if pairs == 0:
        raise ValueError("pixel AUROC needs defect and normal pixels: the test split has no defect masks"
                         if len(pos) == 0 else "pixel AUROC needs normal pixels")
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    # per defect pixel: normals above it, plus half the ties; per normal pixel: defects below it, plus half the ties
    neg_le, neg_lt = np.searchsorted(neg_sorted, pos, "right"), np.searchsorted(neg_sorted, pos, "left")
    pos_le, pos_lt = np.searchsorted(pos_sorted, neg, "right"), np.searchsorted(pos_sorted, neg, "left")
    above = (len(neg) - neg_le) + 0.5 * (neg_le - neg_lt)
    below = pos_lt + 0.5 * (pos_le - pos_lt)
    gd, gn = depth[is_defect], distance[~is_defect]
    names_n = [f"{lo}-{hi or 'inf'} px from a defect" for lo, hi in DISTANCES] + ["good images"]
    out: dict[str, object] = {
        "pixel_auroc": 1.0 - float(above.sum()) / pairs,
        "loss_by_defect_pixels": {f"{lo}-{hi or 'inf'} px deep": float(above[gd == i].sum()) / pairs
                                  for i, (lo, hi) in enumerate(DEPTHS)},
        "loss_by_normal_pixels": {name: float(below[gn == i].sum()) / pairs for i, name in enumerate(names_n)},
        "normal_pixel_share": {name: float((gn == i).mean()) for i, name in enumerate(names_n)},
    }
    if kind is not None:
        kd, kn = kind[is_defect], kind[~is_defect]
        out["loss_by_defect_pixels_of"] = {name: float(above[kd == i].sum()) / pairs for i, name in enumerate(kind_names)
                                           if (kd == i).any()}
        out["loss_by_normal_pixels_of"] = {name: float(below[kn == i].sum()) / pairs for i, name in enumerate(kind_names)}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "mvtec_ad")
    p.add_argument("--category", default=None, help="default: the bundle's")
    p.add_argument("--modes", default="patchcore,pni")
    p.add_argument("--refine", action="store_true", help="also the refined map of the last mode")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pni_ray.data.mvtec import load_category
    from pni_ray.evaluate import run_modes
    from pni_ray.inference import load_detector
    from pni_ray.predict import detector_geometry

    detector, manifest = load_detector(args.bundle)
    if args.refine and getattr(detector, "refiner", None) is None:  # said now, not after scoring every mode
        raise SystemExit(f"--refine: {args.bundle} has no refiner (pni-ray refine {args.bundle} DATA_ROOT --out DIR)")
    category = args.category or manifest["category"]
    if not (args.data_root / category).is_dir():
        print(f"skipped: {args.data_root / category} is absent")
        return 0
    cat = load_category(args.data_root, category, max_pixels=detector_geometry(detector).max_pixels)  # as `evaluate` does
    modes = tuple(args.modes.split(","))
    results = run_modes(detector, [s.path for s in cat.test], modes, refine_modes=modes[-1:] if args.refine else ())
    first = next(iter(results.values()))
    groups = [pixel_groups(cat.mask(s, m.shape) > 0) for s, m in zip(cat.test, first.maps)]
    depth = np.concatenate([g[0].ravel() for g in groups])
    distance = np.concatenate([g[1].ravel() for g in groups])
    kinds = tuple(sorted({s.defect_type for s in cat.test}))
    kind = np.concatenate([np.full(m.size, kinds.index(s.defect_type), np.int16) for s, m in zip(cat.test, first.maps)])
    out = {name: loss_by_group(np.concatenate([m.ravel() for m in res.maps]), depth, distance, kind, kinds)
           for name, res in results.items()}
    for name, r in out.items():
        print(f"{category} {name}: pixel AUROC {r['pixel_auroc']:.4f}, lost {1 - r['pixel_auroc']:.4f}")
        for key in ("loss_by_normal_pixels", "loss_by_defect_pixels"):
            for group, value in r[key].items():
                share = r["normal_pixel_share"].get(group)
                print(f"  {group:<28} {value:.4f}" + (f"   ({share:.1%} of normal pixels)" if share is not None else ""))
        for kind_name, value in r["loss_by_normal_pixels_of"].items():
            on_defects = r["loss_by_defect_pixels_of"].get(kind_name)
            print(f"  {kind_name + ' images':<28} " + (f"defect pixels {on_defects:.4f}, " if on_defects is not None else "")
                  + f"normal pixels {value:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"category": category, "modes": out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
