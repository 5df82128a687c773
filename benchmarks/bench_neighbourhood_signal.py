"""Does p(c|N) know something the patch distance does not? Patch-level AUROC of each signal.

    python benchmarks/bench_neighbourhood_signal.py --bundle B [--category transistor]
                                                    [--data-root ../shared/data/mvtec_ad] [--json FILE]

PNI uses the neighbourhood MLP as a mask; issue 12 asks whether some other use of it would pay.
This measures the signal itself on the test split: defect cells (at least half covered by the mask)
against the content cells of good images, each patch scored by

- `patchcore`: the distance to the nearest C_emb entry; `pni`: the bundle's pni patch score;
- `surprise`: -log p(k | N), k the C_dist class of that nearest entry: how unlikely the context
  finds what the patch looks like;
- `relative surprise`: log max_k p(k | N) - log p(k* | N), the same against the context's best guess;
- `distance to expected`: the distance to the nearest entry of the class the context finds likeliest;
- `patchcore + b surprise`, `pni + b surprise`: a soft use, each term standardised on the normal
  patches, for several b.

A signal that separates well alone but lowers the AUROC when added to the distance carries what the
distance already holds. Test labels are read to measure, not to choose anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIGNALS = ("patchcore", "pni", "surprise", "relative surprise", "distance to expected")
BETAS = (0.1, 0.25, 0.5, 1.0)


@torch.no_grad()
def patch_signals(detector: Any, category: Any, batch_size: int = 8) -> dict[str, dict[str, np.ndarray]]:
    """{"normal" | "defect": {signal: (n,) values}} over the test split's content cells."""
    from pni_ray.evaluate import defect_cells
    from pni_ray.predict import chunks, detector_geometry, features
    from pni_ray.models.rowmin import first_argmin
    from pni_ray.models.scorer import squared_distances

    scorer, geometry = detector.scorer, detector_geometry(detector)
    out: dict[str, dict[str, list]] = {g: {s: [] for s in SIGNALS} for g in ("normal", "defect")}
    for sl in chunks(len(category.test), geometry, batch_size):
        batch = category.test[sl]
        prepared = [geometry.prepare(geometry.load(s.path)) for s in batch]
        feats = features(detector.extractor, geometry, prepared, tile_batch=batch_size)
        p_dist = detector.mlp.probabilities(feats)
        b, d, h, w = feats.shape
        valid = torch.from_numpy(np.stack([p.valid_grid() for p in prepared])).reshape(-1)
        good = torch.tensor([s.label == 0 for s in batch]).repeat_interleave(h * w)
        defect = torch.from_numpy(np.stack([
            defect_cells(geometry, category.mask(s, p.original_hw)) if s.label else np.zeros(p.grid, bool)
            for s, p in zip(batch, prepared)])).reshape(-1)
        pni = scorer.diagnose(feats, p_dist, "pni")
        rows = feats.permute(0, 2, 3, 1).reshape(-1, d)
        probs = p_dist.permute(0, 2, 3, 1).reshape(b * h * w, -1).clamp_min(1e-12)
        dist_sq = squared_distances(rows, scorer.memory, scorer.memory_sq).clamp_min(0)
        nearest_class = scorer.emb_to_dist[first_argmin(dist_sq)]
        log_p = torch.log(probs.gather(1, nearest_class[:, None])[:, 0])
        expected = probs.argmax(1)
        of_expected = scorer.emb_to_dist[None, :] == expected[:, None]
        values = {
            "patchcore": pni["plain"].reshape(-1), "pni": pni["score"].reshape(-1), "surprise": -log_p,
            "relative surprise": torch.log(probs.max(1).values) - log_p,
            "distance to expected": dist_sq.masked_fill(~of_expected, float("inf")).amin(1).sqrt(),
        }
        for group, mask in (("normal", valid & good), ("defect", valid & defect)):
            for name, v in values.items():
                out[group][name].append(v[mask].numpy())
    return {g: {s: np.concatenate(v) for s, v in signals.items()} for g, signals in out.items()}


def signal_table(signals: dict[str, dict[str, np.ndarray]], betas: tuple[float, ...] = BETAS) -> dict[str, float]:
    """Patch AUROC (defect against normal) of each signal and of patchcore / pni + b * surprise."""
    from pni_ray.metrics import auroc

    normal, defect = signals["normal"], signals["defect"]
    labels = np.r_[np.zeros(len(normal["pni"])), np.ones(len(defect["pni"]))]
    both = {s: np.r_[normal[s], defect[s]].astype(np.float64) for s in normal}
    table = {s: auroc(labels, v) for s, v in both.items()}

    def standard(name: str) -> np.ndarray:
        ref = normal[name].astype(np.float64)
        return (both[name] - ref.mean()) / (ref.std() + 1e-12)

    for base in ("patchcore", "pni"):
        for beta in betas:
            table[f"{base} + {beta:g} surprise"] = auroc(labels, standard(base) + beta * standard("surprise"))
    table["corr(surprise, pni) on normal patches"] = float(np.corrcoef(normal["surprise"], normal["pni"])[0, 1])
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="a PNI bundle (trained without --mode patchcore)")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "mvtec_ad")
    p.add_argument("--category", default=None, help="default: the bundle's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pni_ray.data.mvtec import load_category
    from pni_ray.inference import load_detector

    torch.set_num_threads(args.threads)
    detector, manifest = load_detector(args.bundle)
    if detector.mlp is None:
        raise SystemExit(f"{args.bundle}: a PatchCore bundle has no neighbourhood model to measure")
    category = args.category or manifest["category"]
    if not (args.data_root / category).is_dir():
        print(f"skipped: {args.data_root / category} is absent")
        return 0
    cat = load_category(args.data_root, category, max_pixels=detector_max_pixels(detector))
    signals = patch_signals(detector, cat)
    table = signal_table(signals)
    print(f"{category}: {len(signals['normal']['pni'])} normal patches (good images), "
          f"{len(signals['defect']['pni'])} defect patches")
    for name, value in table.items():
        print(f"  {name:<40} {value:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"category": category, "patch_auroc": table}, indent=2))
    return 0


def detector_max_pixels(detector: Any) -> int:
    from pni_ray.predict import detector_geometry

    return detector_geometry(detector).max_pixels


if __name__ == "__main__":
    raise SystemExit(main())
