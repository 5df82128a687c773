"""Does PNI earn its name? The mode table (with prior diagnostics and time per image) for real
categories, in one run.

    python benchmarks/bench_ablation.py [--data-root ../shared/data/mvtec_ad] [--categories bottle,transistor]
                                        [--workdir DIR] [--threads 2] [--json FILE] [--seeds 0,1,2]
                                        [--neighbourhood-cuts 4,16] [--neighbourhood-rescue 1000,100] [--shift F] [--rotate DEG]
                                        [--shrink S]

Trains each category at the defaults (or reuses `--workdir/<category>` when it holds a bundle
trained with the same config), then scores the test split in every mode. Rows: image AUROC,
pixel AUROC, AUPRO, ms per image; and per mode the share of C_emb a patch may use, the share of
good-image patches and of defect patches whose score the mask changed, the mean change on each,
and the MLP's held-out top-1 / top-5. Categories absent from the data root are skipped with a
message.

`--neighbourhood-cuts 4,16` also scores mode pni with p(c|N) cut at 4 and 16 times tau instead
of the bundle's own cut (`neighbourhood_cut`, chosen at training; p(c|x)'s cut unchanged) and
prints, per cut, the share of held-out good patches whose nearest entry the neighbourhood still
allows (alone, and together with the position) and the metrics: does a stricter neighbourhood find
defects, or only veto normal patches?

`--seeds 0,1,2` trains and scores each category once per seed (the seed draws the held-out split,
the coreset's projection and the MLP's initialisation and batches) and ends with the spread: per mode
and metric the mean and the range over seeds, and pni - patchcore per seed. A gain smaller than that
spread is no gain. Seed 0's bundles live in `--workdir/<category>`, seed s's in
`--workdir/seed-s/<category>`.

`--neighbourhood-rescue 1000,100` also scores mode pni where an entry is allowed when both priors
allow it (the default) or when p(c|N) alone exceeds 1000 (100) times tau: can the context let a
normal patch's own entry back in where its position never saw it, without letting defects in?
It prints the share of held-out good patches whose nearest entry is allowed without and with it.

`--image-ranking` also says what holds image AUROC below 1: in mode pni, the (defect, good) test
image pairs ranked the wrong way (the defect image scoring no higher), counted by good image and by
defect type, and where on each of the three highest-scoring good images its map peaks.

`--shift F` runs the same on copies of each category (written under --workdir, never into the
data root) whose every image, and its mask, is rolled by a seeded random offset of up to F of its
side: a category whose objects move, where the position prior must widen (or cost nothing).
`--rotate DEG` turns each image and its mask about its centre by a seeded random angle of up to DEG
degrees either way (180: any orientation, as screws and hazelnuts lie), the uncovered corners filled
by reflection (image and mask alike); with `--shift` too, each image is turned, then rolled. The copies
are drawn with seed 0 whatever `--seeds` says: the seeds change the fits, not the copies.
`--shrink S` first scales each image and its mask down by S about the centre onto a plain ground like the image's
own border (its median colour and noise): small parts on a plain ground, which with `--shift` and `--rotate` lie
anywhere and at any angle, as screws do.

Each category's table is followed by the bundle's position check (synthetic defects on held-out good images,
`pni_ray.position_check`) and, where it dropped p(c|x), the deployed mode against patchcore.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pni_ray.bundle import load_bundle, read_manifest, save_bundle  # noqa: E402
from pni_ray.config import TrainConfig  # noqa: E402
from pni_ray.data.mvtec import load_category  # noqa: E402
from pni_ray.evaluate import ABLATION_MODES, attach_diagnostics, evaluate_category, prior_diagnostics, run_modes  # noqa: E402
from pni_ray.models.pni import build_detector  # noqa: E402
from pni_ray.models.scorer import PatchScorer, nearest_neighbours  # noqa: E402
from pni_ray.orchestration.train_plan import canonical, recorded_config  # noqa: E402
from pni_ray.predict import detector_geometry, extract_training_features  # noqa: E402
from pni_ray.training import train_category  # noqa: E402

COLUMNS = (
    ("image_auroc", "img AUROC", "{:.4f}"),
    ("pixel_auroc", "pix AUROC", "{:.4f}"),
    ("aupro", "AUPRO", "{:.4f}"),
    ("ms_per_image", "ms/img", "{:.0f}"),
    ("allowed_share", "allowed", "{:.4f}"),
    ("changed_normal", "chg good", "{:.4f}"),
    ("changed_defect", "chg defect", "{:.4f}"),
    ("score_change_normal", "d good", "{:.3f}"),
    ("score_change_defect", "d defect", "{:.3f}"),
    ("mlp_val_top1", "MLP top1", "{:.3f}"),
    ("mlp_val_top5", "MLP top5", "{:.3f}"),
)
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def bundle_for(data_root: Path, category: str, workdir: Path, cfg: TrainConfig) -> tuple[Path, float | None]:
    """A bundle of `category` trained with `cfg`: reused from workdir when its config matches (as train-all compares
    them: a scoring mode the position check changed counts as the one asked for)."""
    path = workdir / category
    if (path / "manifest.json").is_file() and canonical(recorded_config(read_manifest(path))) == canonical(cfg.to_dict()):
        return path, None
    t0 = time.perf_counter()
    trained = train_category(data_root, category, cfg, progress=True)
    seconds = time.perf_counter() - t0
    save_bundle(trained, path, overwrite=True)
    return path, seconds


@torch.no_grad()
def held_out_nearest_probs(detector, image_dir: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """p(c|N) and p(c|x) of each held-out good patch's nearest C_emb entry (content cells, as training
    measures the spread), and tau."""
    scorer, geometry = detector.scorer, detector_geometry(detector)
    feats, valid = extract_training_features(detector.extractor, geometry, [image_dir / n for n in names], 8, False)
    n, d, h, w = feats.shape
    nearest = nearest_neighbours(feats.permute(0, 2, 3, 1).reshape(-1, d), scorer.memory, scorer.chunk_patches)[1]
    dist_index = scorer.emb_to_dist[nearest].view(n, h * w, 1)
    p_n = torch.cat([  # 8 images at a time: the (n, |C_dist|, h, w) probabilities are never held at once
        detector.mlp.probabilities(feats[i : i + 8]).flatten(2).transpose(1, 2).gather(2, dist_index[i : i + 8])
        for i in range(0, n, 8)]).reshape(-1) * scorer.inv_cluster[nearest]
    p_x = scorer.position_prior[torch.arange(h * w).repeat(n), nearest]
    keep = slice(None) if valid is None else valid.reshape(-1)
    return p_n[keep], p_x[keep], scorer.tau


def held_out_under_both(detector, cat, manifest: dict, option: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`held_out_nearest_probs` of the bundle's held-out images, for an option that varies the rule
    "both priors" (refused under the paper's mean, which has one tau for both priors)."""
    if detector.scorer.combine != "both":
        raise ValueError(f"{cat.name}: {option} needs scoring.combine 'both' (the paper's mean has one tau "
                         f"for both priors), this bundle has {detector.scorer.combine!r}")
    names = (manifest.get("training") or {}).get("holdout_images") or []
    if not names:
        raise ValueError(f"{cat.name}: {option} measures held-out good images, and this bundle held none out "
                         f"(scoring.holdout_fraction 0)")
    return held_out_nearest_probs(detector, cat.root / "train" / "good", names)


def neighbourhood_cuts(detector, cat, manifest: dict, factors: list[float]) -> list[dict]:
    """Mode pni with p(c|N) cut at factor x tau: held-out keep rates (train/good only) and test metrics."""
    p_n, p_x, tau = held_out_under_both(detector, cat, manifest, "--neighbourhood-cuts")
    rows, own = [], detector.scorer.tau_neighbourhood
    try:
        for factor in factors:
            detector.scorer.tau_neighbourhood = factor * tau
            metrics = evaluate_category(detector, cat, modes=("pni",), progress=False)["pni"]
            rows.append({"factor": factor, "keep_neighbourhood": float((p_n > factor * tau).float().mean()),
                         "keep_both": float(((p_n > factor * tau) & (p_x > tau)).float().mean()),
                         **{k: metrics[k] for k in METRICS}})
    finally:
        detector.scorer.tau_neighbourhood = own
    return rows


class RescueScorer(PatchScorer):
    """Mode pni with a third rule: both priors allow an entry (the default), or the neighbourhood alone
    is confident in it (p(c|N) > rescue * tau), so a normal patch whose own entry its position never
    saw can be let back in by its context. Scored by the definition (dense / top-k), not candidates."""

    rescue = float("inf")

    def allowed(self, probs, positions, idx, mode):
        out = super().allowed(probs, positions, idx, mode)
        if mode != "pni":
            return out
        return out | (self.neighbourhood_mask_probs(probs, idx) > self.rescue * self.tau)

    def uses_candidates(self, mode: str) -> bool:
        return False


def neighbourhood_rescue(detector, cat, manifest: dict, factors: list[float]) -> list[dict]:
    """Mode pni allowing also what p(c|N) alone puts above factor x tau: held-out keep (train/good only)
    and test metrics. Does the neighbourhood let normal patches back in without letting defects in?"""
    scorer = detector.scorer
    p_n, p_x, tau = held_out_under_both(detector, cat, manifest, "--neighbourhood-rescue")
    rows, own_class = [], type(scorer)
    try:
        scorer.__class__ = RescueScorer
        for factor in factors:
            scorer.rescue = factor
            metrics = evaluate_category(detector, cat, modes=("pni",), progress=False)["pni"]
            both = (p_n > scorer.tau_neighbourhood) & (p_x > tau)
            rows.append({"factor": factor, "keep_both": float(both.float().mean()),
                         "keep_rescued": float((both | (p_n > factor * tau)).float().mean()),
                         **{k: metrics[k] for k in METRICS}})
    finally:
        scorer.__class__ = own_class
        scorer.__dict__.pop("rescue", None)
    return rows


def image_ranking(detector, cat, mode: str = "pni", top_good: int = 3) -> dict:
    """Which test images cost image AUROC in `mode`: wrongly ranked (defect, good) pairs by good image and
    by defect type, and the map's peak (row, column, in the image's pixels) on the top-scoring good images."""
    samples = cat.test
    result = run_modes(detector, [s.path for s in samples], (mode,), progress=False)[mode]
    scores = np.asarray(result.scores, dtype=np.float64)
    good = [i for i, s in enumerate(samples) if not s.label]
    bad = [i for i, s in enumerate(samples) if s.label]
    wrong = scores[bad][:, None] <= scores[good][None, :]  # (defect, good): the defect scores no higher
    by_good = Counter({f"{samples[j].defect_type}/{samples[j].path.name}": int(n) for j, n in zip(good, wrong.sum(0)) if n})
    by_type: Counter[str] = Counter()
    for i, n in zip(bad, wrong.sum(1)):
        if n:
            by_type[samples[i].defect_type] += int(n)
    peaks = []
    for j in sorted(good, key=lambda k: -scores[k])[:top_good]:
        m = np.asarray(result.maps[j])
        row, col = np.unravel_index(int(np.argmax(m)), m.shape)
        peaks.append({"image": f"{samples[j].defect_type}/{samples[j].path.name}", "score": float(scores[j]),
                      "peak": [int(row), int(col)], "size": [int(m.shape[0]), int(m.shape[1])]})
    order = lambda d: dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))  # noqa: E731
    return {"mode": mode, "pairs": len(good) * len(bad), "misordered": sum(by_good.values()),
            "by_good_image": order(by_good), "by_defect_type": order(by_type), "top_good": peaks}


def run_category(data_root: Path, category: str, workdir: Path, cfg: TrainConfig, cut_factors: list[float],
                 rescue_factors: list[float] = (), ranking: bool = False) -> dict:
    bundle, train_s = bundle_for(data_root, category, workdir, cfg)
    trained, manifest = load_bundle(bundle)
    detector = build_detector(trained)
    cat = load_category(data_root, category)
    results = evaluate_category(detector, cat, modes=ABLATION_MODES, progress=True)
    attach_diagnostics(results, prior_diagnostics(detector, cat, ABLATION_MODES), manifest)
    for row in results.values():
        row["ms_per_image"] = 1000.0 / row["images_per_s"]
    training = manifest.get("training") or {}
    cuts = neighbourhood_cuts(detector, cat, manifest, cut_factors) if cut_factors else []
    rescues = neighbourhood_rescue(detector, cat, manifest, list(rescue_factors)) if rescue_factors else []
    ranked = image_ranking(detector, cat) if ranking else None
    return {"train_seconds": train_s, "position_spread": training.get("position_spread"),
            "held_out_keep": training.get("position_held_out_keep"),
            "position_min_count": training.get("position_min_count", 1),
            "min_count_held_out_keep": training.get("position_min_count_held_out_keep"),
            "neighbourhood_cut": manifest.get("neighbourhood_cut", 1.0),
            "neighbourhood_held_out_keep": dict(sorted((training.get("neighbourhood_held_out_keep") or {}).items(),
                                                       key=lambda kv: float(kv[0]))),
            "modes": results, "neighbourhood_cuts": cuts,
            "neighbourhood_rescue": rescues, "deployed_mode": trained.config.scoring.mode,
            "position_check": training.get("position_check"), **({"image_ranking": ranked} if ranked else {})}


def print_category(category: str, res: dict) -> None:
    trained = f"trained in {res['train_seconds']:.0f} s" if res["train_seconds"] else "bundle reused"
    print(f"\n{category} ({trained}; position spread {res['position_spread']}, held-out keep {res['held_out_keep']}; "
          f"entries seen >= {res.get('position_min_count', 1)} times, held-out keep {res.get('min_count_held_out_keep')}; "
          f"p(c|N) cut {res.get('neighbourhood_cut', 1.0):g} tau, held-out keep {res.get('neighbourhood_held_out_keep')})")
    print(f"{'mode':<14}" + "".join(f"{title:>11}" for _, title, _ in COLUMNS))
    for mode, row in res["modes"].items():
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS]
        print(f"{mode:<14}" + "".join(f"{c:>11}" for c in cells))
    m = res["modes"]
    for key in ("pixel_auroc", "aupro", "image_auroc"):
        print(f"  pni - patchcore {key}: {m['pni'][key] - m['patchcore'][key]:+.4f}; "
              f"pni - position: {m['pni'][key] - m['position'][key]:+.4f}")
    check, deployed = res.get("position_check") or {}, res.get("deployed_mode", "pni")
    if "kept" in check:
        gains = ", ".join(f"{k} {check['position'][k] - check['patchcore'][k]:+.4f}" for k in ("pixel_auroc", "aupro"))
        print(f"  position check on {check['defects']} synthetic defects of held-out images: position - patchcore "
              f"{gains}: prior {'kept' if check['kept'] else 'dropped'}")
    elif check:
        print(f"  position check skipped: {check.get('skipped')}")
    if deployed in m and deployed != "pni":
        print(f"  deployed mode {deployed}: " + "; ".join(
            f"{key} {m[deployed][key]:.4f} ({m[deployed][key] - m['patchcore'][key]:+.4f} over patchcore)"
            for key in ("image_auroc", "pixel_auroc", "aupro")))
    for cut in res.get("neighbourhood_cuts", []):
        print(f"  pni, p(c|N) cut at {cut['factor']:g} tau: held-out keep {cut['keep_neighbourhood']:.4f} "
              f"(with position {cut['keep_both']:.4f}); {cut['image_auroc']:.4f} / {cut['pixel_auroc']:.4f} / "
              f"{cut['aupro']:.4f}")
    if res.get("image_ranking"):
        r = res["image_ranking"]
        print(f"  {r['mode']}: {r['misordered']} of {r['pairs']} (defect, good) image pairs ranked the wrong way; "
              f"by good image {r['by_good_image']}; by defect type {r['by_defect_type']}")
        for g in r["top_good"]:
            print(f"    good {g['image']}: score {g['score']:.3f}, map peak at row {g['peak'][0]}, column {g['peak'][1]} "
                  f"of {g['size'][0]} x {g['size'][1]}")
    for row in res.get("neighbourhood_rescue", []):
        print(f"  pni, or p(c|N) > {row['factor']:g} tau alone: held-out keep {row['keep_both']:.4f} -> "
              f"{row['keep_rescued']:.4f}; {row['image_auroc']:.4f} / {row['pixel_auroc']:.4f} / {row['aupro']:.4f}")


def seed_spread(runs: dict[int, dict]) -> dict[str, dict]:
    """Per mode and metric over seeds: mean, min, max; and pni - patchcore (and - position) per seed."""
    seeds = sorted(runs)
    spread: dict[str, dict] = {}
    for mode in runs[seeds[0]]["modes"]:
        spread[mode] = {}
        for key in METRICS:
            values = [runs[s]["modes"][mode][key] for s in seeds]
            spread[mode][key] = {"mean": float(np.mean(values)), "min": min(values), "max": max(values)}
    for other in ("patchcore", "position"):
        spread[f"pni - {other}"] = {
            key: [runs[s]["modes"]["pni"][key] - runs[s]["modes"][other][key] for s in seeds] for key in METRICS}
    return spread


def print_seed_spread(category: str, runs: dict[int, dict]) -> None:
    spread = seed_spread(runs)
    print(f"\n{category} over seeds {', '.join(str(s) for s in sorted(runs))}: mean [min, max]")
    print(f"{'mode':<14}" + "".join(f"{key:>26}" for key in METRICS))
    for mode in runs[min(runs)]["modes"]:
        cells = [f"{v['mean']:.4f} [{v['min']:.4f}, {v['max']:.4f}]" for v in spread[mode].values()]
        print(f"{mode:<14}" + "".join(f"{c:>26}" for c in cells))
    for other in ("patchcore", "position"):
        diffs = spread[f"pni - {other}"]
        print(f"  pni - {other} per seed: " + "; ".join(
            f"{key} " + " ".join(f"{d:+.4f}" for d in diffs[key]) for key in METRICS))


def json_figures(out: dict[str, dict[int, dict]]) -> dict:
    """What --json writes: {category: run} for one seed (each run names its seed), or
    {category: {"runs": {seed: run}, "spread": seed_spread(runs)}} for several."""
    return {category: (next(iter(runs.values())) if len(runs) == 1 else {"runs": runs, "spread": seed_spread(runs)})
            for category, runs in out.items()}


def shrunk(values: np.ndarray, scale: float, fill: np.ndarray, order: int) -> np.ndarray:
    """values scaled by `scale` about the centre of a canvas of the same size holding `fill`."""
    h, w = values.shape[:2]
    small = np.asarray(Image.fromarray(values).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                      Image.BILINEAR if order else Image.NEAREST))
    out = fill.copy()
    top, left = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    out[top:top + small.shape[0], left:left + small.shape[1]] = small
    return out


def border_fill(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A background canvas like the image's own border: its median colour with noise of its spread."""
    edge = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.float64)
    median, spread = np.median(edge, axis=0), np.median(np.abs(edge - np.median(edge, axis=0)), axis=0) * 1.4826
    noise = rng.normal(0.0, 1.0, pixels.shape) * np.maximum(spread, 1.0)
    return np.clip(median + noise, 0, 255).round().astype(pixels.dtype)


def moved_copy(data_root: Path, category: str, out_root: Path, shift: float = 0.0, rotate: float = 0.0,
               shrink: float = 1.0, seed: int = 0) -> Path:
    """Copy data_root/category to out_root/category with each image and its mask moved together: rotated
    about its centre by a seeded random angle of up to `rotate` degrees either way (the corners the turn
    uncovers filled by reflecting the image, so they hold no constant colour to recognise, and the mask
    alike, so a defect reflected into a corner is labelled there too), then rolled
    by a seeded random offset of up to `shift` of the side (wrapping round). Returns out_root.
    With rotate 0 the offsets are those of the shift-only copies of earlier rounds (the same draws).
    shrink < 1 first scales each image down by that factor about its centre onto a canvas like its own
    border (median colour and noise), so the object is small on a plain ground, as screws lie; the
    shrink's noise comes from its own generator, so the offsets and angles stay those drawn without it."""
    src, dst = data_root / category, out_root / category
    rng, ground_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    for image in sorted(src.glob("t*/*/*.png")):  # train/good, test/<defect>
        rel = image.relative_to(src)
        pixels = np.asarray(Image.open(image))
        offset = tuple(int(v) for v in rng.uniform(-shift, shift, 2) * pixels.shape[:2])
        angle = float(rng.uniform(-rotate, rotate)) if rotate else 0.0
        pairs = [(pixels, dst / rel, 1, border_fill(pixels, ground_rng) if shrink < 1 else None)]  # image: bilinear
        if rel.parts[0] == "test" and rel.parts[1] != "good":
            mask = Path("ground_truth") / rel.parts[1] / f"{image.stem}_mask.png"
            mask_values = np.asarray(Image.open(src / mask))
            pairs.append((mask_values, dst / mask, 0, np.zeros_like(mask_values)))  # mask: nearest
        for values, out, order, fill in pairs:
            if shrink < 1:
                values = shrunk(values, shrink, fill, order)
            if angle:  # corners reflected, the mask's alike
                values = ndimage.rotate(values, angle, axes=(1, 0), reshape=False, order=order,
                                        mode="reflect").astype(values.dtype)
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.roll(values, offset, axis=(0, 1))).save(out)
    return out_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "mvtec_ad")
    parser.add_argument("--categories", default="bottle,transistor")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_ablation"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--shift", type=float, default=0.0, metavar="F",
                        help="score copies whose images are rolled by up to F of their side (objects that move)")
    parser.add_argument("--rotate", type=float, default=0.0, metavar="DEG",
                        help="score copies whose images are turned by up to DEG degrees either way (objects that turn; "
                             "with --shift, turned then rolled)")
    parser.add_argument("--shrink", type=float, default=1.0, metavar="S",
                        help="score copies whose objects are scaled down by S onto a plain ground like their border "
                             "(small parts on a plain ground, as screws lie; with --shift / --rotate, shrunk first)")
    parser.add_argument("--image-ranking", action="store_true",
                        help="also list the (defect, good) image pairs pni ranks the wrong way, and where good maps peak")
    parser.add_argument("--seeds", default="0", metavar="S,S",
                        help="train and score once per seed and print the spread over seeds (default 0)")
    parser.add_argument("--neighbourhood-rescue", default="", metavar="F,F",
                        help="also score pni allowing what p(c|N) alone puts above these multiples of tau (e.g. 1000,100)")
    parser.add_argument("--neighbourhood-cuts", default="", metavar="F,F",
                        help="also score pni with p(c|N) cut at these multiples of tau (e.g. 4,16)")
    args = parser.parse_args()
    cut_factors = [float(f) for f in args.neighbourhood_cuts.split(",") if f]
    rescue_factors = [float(f) for f in args.neighbourhood_rescue.split(",") if f]
    seeds = list(dict.fromkeys(int(v) for v in args.seeds.split(",") if v.strip()))  # distinct, in order
    if not seeds:
        parser.error("--seeds: give at least one seed, e.g. 0 or 0,1,2")
    torch.set_num_threads(args.threads)
    out: dict = {}
    for category in args.categories.split(","):
        if not (args.data_root / category / "train" / "good").is_dir():
            print(f"skipping {category}: not found under {args.data_root}")
            continue
        root, workdir, moved_record = args.data_root, args.workdir, {}
        if args.shift or args.rotate or args.shrink < 1:
            moved_record = {"copy": {"shift": args.shift, "rotate": args.rotate, "shrink": args.shrink, "seed": 0}}
            workdir = args.workdir / "-".join(f"{name}-{value:g}" for name, value in (
                ("shrunk", args.shrink if args.shrink < 1 else 0), ("shifted", args.shift), ("rotated", args.rotate))
                if value)
            root = moved_copy(args.data_root, category, workdir / "data", args.shift, args.rotate, args.shrink)
        for seed in seeds:
            runs = out.setdefault(category, {})
            seed_dir = workdir if seed == 0 else workdir / f"seed-{seed}"
            runs[seed] = {"seed": seed, **moved_record, **run_category(root, category, seed_dir, TrainConfig(seed=seed),
                                                                       cut_factors, rescue_factors, args.image_ranking)}
            print_category(category if len(seeds) == 1 else f"{category}, seed {seed}", runs[seed])
        if len(seeds) > 1:
            print_seed_spread(category, out[category])
    if args.json:  # one seed: {category: run}, as before; several: {category: {"runs": {seed: run}, "spread": ...}}
        args.json.write_text(json.dumps(json_figures(out), indent=2))


if __name__ == "__main__":
    main()
