"""Does PNI earn its name? The mode table (with prior diagnostics and time per image) for real
categories, in one run.

    python benchmarks/bench_ablation.py [--data-root ../shared/data/mvtec_ad] [--categories bottle,transistor]
                                        [--workdir DIR] [--threads 2] [--json FILE]

Trains each category at the defaults (or reuses `--workdir/<category>` when it holds a bundle
trained with the same config), then scores the test split in every mode. Rows: image AUROC,
pixel AUROC, AUPRO, ms per image; and per mode the share of C_emb a patch may use, the share of
good-image patches and of defect patches whose score the mask changed, the mean change on each,
and the MLP's held-out top-1 / top-5. Categories absent from the data root are skipped with a
message.

`--neighbourhood-cuts 4,16` also scores mode pni with p(c|N) cut at 4 and 16 times tau instead
of tau (p(c|x)'s cut unchanged) and prints, per cut, the share of held-out good patches whose
nearest entry the neighbourhood still allows (alone, and together with the position) and the
metrics: does a stricter neighbourhood find defects, or only veto normal patches?

`--shift F` runs the same on copies of each category (written under --workdir, never into the
data root) whose every image, and its mask, is rolled by a seeded random offset of up to F of its
side: a category whose objects move, where the position prior must widen (or cost nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pni_ray.bundle import load_bundle, read_manifest, save_bundle  # noqa: E402
from pni_ray.config import TrainConfig  # noqa: E402
from pni_ray.data.mvtec import load_category  # noqa: E402
from pni_ray.evaluate import ABLATION_MODES, attach_diagnostics, evaluate_category, prior_diagnostics  # noqa: E402
from pni_ray.models.pni import build_detector  # noqa: E402
from pni_ray.data.geometry import extract_training_features  # noqa: E402
from pni_ray.models.predict import detector_geometry  # noqa: E402
from pni_ray.models.scorer import nearest_neighbours  # noqa: E402
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


def bundle_for(data_root: Path, category: str, workdir: Path, cfg: TrainConfig) -> tuple[Path, float | None]:
    """A bundle of `category` trained with `cfg`: reused from workdir when its config matches."""
    path = workdir / category
    if (path / "manifest.json").is_file() and read_manifest(path).get("config") == json.loads(json.dumps(cfg.to_dict())):
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


def neighbourhood_cuts(detector, cat, manifest: dict, factors: list[float]) -> list[dict]:
    """Mode pni with p(c|N) cut at factor x tau: held-out keep rates (train/good only) and test metrics."""
    if detector.scorer.combine != "both":
        raise ValueError(f"{cat.name}: --neighbourhood-cuts needs scoring.combine 'both' (the paper's mean has one tau "
                         f"for both priors), this bundle has {detector.scorer.combine!r}")
    names = (manifest.get("training") or {}).get("holdout_images") or []
    p_n, p_x, tau = held_out_nearest_probs(detector, cat.root / "train" / "good", names)
    rows = []
    try:
        for factor in factors:
            detector.scorer.tau_neighbourhood = factor * tau
            metrics = evaluate_category(detector, cat, modes=("pni",), progress=False)["pni"]
            rows.append({"factor": factor, "keep_neighbourhood": float((p_n > factor * tau).float().mean()),
                         "keep_both": float(((p_n > factor * tau) & (p_x > tau)).float().mean()),
                         **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")}})
    finally:
        detector.scorer.tau_neighbourhood = tau
    return rows


def run_category(data_root: Path, category: str, workdir: Path, cfg: TrainConfig, cut_factors: list[float]) -> dict:
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
    return {"train_seconds": train_s, "position_spread": training.get("position_spread"),
            "held_out_keep": training.get("position_held_out_keep"), "modes": results, "neighbourhood_cuts": cuts}


def print_category(category: str, res: dict) -> None:
    trained = f"trained in {res['train_seconds']:.0f} s" if res["train_seconds"] else "bundle reused"
    print(f"\n{category} ({trained}; position spread {res['position_spread']}, held-out keep {res['held_out_keep']})")
    print(f"{'mode':<14}" + "".join(f"{title:>11}" for _, title, _ in COLUMNS))
    for mode, row in res["modes"].items():
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS]
        print(f"{mode:<14}" + "".join(f"{c:>11}" for c in cells))
    m = res["modes"]
    for key in ("pixel_auroc", "aupro", "image_auroc"):
        print(f"  pni - patchcore {key}: {m['pni'][key] - m['patchcore'][key]:+.4f}; "
              f"pni - position: {m['pni'][key] - m['position'][key]:+.4f}")
    for cut in res.get("neighbourhood_cuts", []):
        print(f"  pni, p(c|N) cut at {cut['factor']:g} tau: held-out keep {cut['keep_neighbourhood']:.4f} "
              f"(with position {cut['keep_both']:.4f}); {cut['image_auroc']:.4f} / {cut['pixel_auroc']:.4f} / "
              f"{cut['aupro']:.4f}")


def shifted_copy(data_root: Path, category: str, out_root: Path, fraction: float, seed: int = 0) -> Path:
    """Copy data_root/category to out_root/category with each image and its mask rolled together
    by a seeded random offset of up to `fraction` of the side (wrapping round); returns out_root."""
    src, dst = data_root / category, out_root / category
    rng = np.random.default_rng(seed)
    for image in sorted(src.glob("t*/*/*.png")):  # train/good, test/<defect>
        rel = image.relative_to(src)
        pixels = np.asarray(Image.open(image))
        offset = tuple(int(v) for v in rng.uniform(-fraction, fraction, 2) * pixels.shape[:2])
        pairs = [(pixels, dst / rel)]
        if rel.parts[0] == "test" and rel.parts[1] != "good":
            mask = Path("ground_truth") / rel.parts[1] / f"{image.stem}_mask.png"
            pairs.append((np.asarray(Image.open(src / mask)), dst / mask))
        for values, out in pairs:
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
    parser.add_argument("--neighbourhood-cuts", default="", metavar="F,F",
                        help="also score pni with p(c|N) cut at these multiples of tau (e.g. 4,16)")
    args = parser.parse_args()
    cut_factors = [float(f) for f in args.neighbourhood_cuts.split(",") if f]
    torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    out = {}
    for category in args.categories.split(","):
        if not (args.data_root / category / "train" / "good").is_dir():
            print(f"skipping {category}: not found under {args.data_root}")
            continue
        if args.shift:
            root = shifted_copy(args.data_root, category, args.workdir / f"shifted-{args.shift:g}" / "data", args.shift)
            out[category] = run_category(root, category, args.workdir / f"shifted-{args.shift:g}", cfg, cut_factors)
        else:
            out[category] = run_category(args.data_root, category, args.workdir, cfg, cut_factors)
        print_category(category, out[category])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
