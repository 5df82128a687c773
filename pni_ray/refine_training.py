"""Train the refinement network of a trained PNI model on synthetic defects (paper, Sec. 3.4).

Only train/good images are read: never a test image, never a ground-truth mask. Synthetic
defects (CutPaste, CutPaste-scar, DRAEM-style Perlin textures, strokes; `pni_ray.data.defects`)
are drawn on those images with a seeded generator, the trained PNI model scores them, and the
refiner learns to turn (image, PNI map) into the defect mask with the paper's loss
(l_reg + l_grad) / 2. Targets are the masks in the refiner's u units (see
`pni_ray.models.refiner`): 1 on a synthetic defect pixel, 0 elsewhere, where
u = (map - pixel_mean) / (target_sigmas * pixel_std) with the model's held-out calibration.

By default (`refiner.source = "all"`) the defects are drawn on every train/good image except the
refiner's calibration split. Images in the memory bank score lower than unseen ones (some of their
own patches are in C_emb), which argued for drawing on the PNI model's held-out images only
("holdout"); measured, the variety wins: the held-out images are 10% of train/good, half of them
calibrate, and a refiner trained on that handful of images refines bottle's test maps less well
(README "Measured", refiner row; docs/results.md). A share of the held-out images is always kept away from the defects (a
third split, `split_refiner_images`): the refined model's normalisation and threshold are computed
on their refined maps (`recalibrate`), and the manifest lists both splits
(training.refiner.source_images / calibration_images).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pni_ray.config import RefinerConfig, TrainConfig
from pni_ray.data.defects import DefectMix, sample_defect
from pni_ray.data.images import list_images
from pni_ray.data.transforms import resize_rgb
from pni_ray.models.pni import Normalisation, TrainedModel, build_detector
from pni_ray.models.refiner import MapRefiner, build_refiner, refinement_loss
from pni_ray.geometry import Prepared
from pni_ray.predict import chunks, default_name, detector_geometry, score_prepared

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RefinerData:
    """Synthetic training set: uint8 images, the PNI maps of those images, binary masks."""

    images: torch.Tensor  # (N, H, W, 3) uint8
    maps: torch.Tensor  # (N, H, W) float32, raw PNI scale
    masks: torch.Tensor  # (N, H, W) bool
    families: list[str]
    sources: list[str]  # file name of the good image each sample was made from

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = self.images[idx].permute(0, 3, 1, 2).float().div_(255.0)
        return images, self.maps[idx], self.masks[idx].float()


def good_images(data_root: Path | str, category: str) -> list[Path]:
    """train/good of the category: the only folder this module reads."""
    folder = Path(data_root) / category / "train" / "good"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no train/good folder to make synthetic defects from")
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"{folder}: no images to make synthetic defects from")
    return paths


def split_refiner_images(
    paths: list[Path], cfg: TrainConfig, held_out: list[str] | None = None
) -> tuple[list[Path], list[Path]]:
    """(defect sources, calibration images): the refiner's two splits of train/good.

    PNI's held-out images (the memory bank never saw them; `held_out`, the names the bundle records,
    else the training split drawn again) are split, seeded, into calibration images
    (`refiner.calibration_fraction` of them, at least one) and the rest. Synthetic defects are drawn
    on the rest ("holdout") or on every train/good image but the calibration ones ("all"), so the
    refined model is calibrated on images neither the bank nor the refiner has seen. The recorded
    names, not a split drawn again, since train/good may have changed since the bundle was trained:
    a split of other files would calibrate on images the memory bank holds.
    """
    from pni_ray.training import calibration_split

    rcfg = cfg.refiner
    if not 0 < rcfg.calibration_fraction < 1:
        raise ValueError(f"refiner calibration_fraction must be in (0, 1), got {rcfg.calibration_fraction}")
    if held_out is None:
        _, holdout = calibration_split(paths, cfg)
    else:
        by_name = {p.name: p for p in paths}
        gone = [name for name in held_out if name not in by_name]
        if gone:
            folder = paths[0].parent if paths else "train/good"
            raise ValueError(
                f"{folder}: the bundle's held-out image(s) {', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''} "
                f"are gone: the refined model is calibrated on images the memory bank never saw, and the bundle "
                "names those; refine with the train/good the bundle was trained on (its own category: -c given "
                "another?), or train again")
        holdout = sorted(by_name[name] for name in held_out)
    if len(holdout) < 2:
        raise ValueError(
            f"{len(holdout)} held-out train/good image(s): the refiner needs at least 2 (one to draw defects on, "
            "one to recalibrate the refined model on); raise scoring.holdout_fraction or add train images"
        )
    n_cal = min(len(holdout) - 1, max(1, int(round(rcfg.calibration_fraction * len(holdout)))))
    perm = torch.randperm(len(holdout), generator=torch.Generator().manual_seed(cfg.seed + 11)).tolist()
    calibration = sorted(holdout[i] for i in perm[:n_cal])
    chosen = set(calibration)
    pool = holdout if rcfg.source == "holdout" else paths
    return [p for p in pool if p not in chosen], calibration


def held_out_names(trained: TrainedModel) -> list[str] | None:
    """The train/good names the bundle held out of its memory bank (None for a model that records none)."""
    facts = trained.report.get("deterministic") if isinstance(trained.report, dict) else None
    return (facts or {}).get("holdout_images")


def stored_hw(canvas_hw: tuple[int, int], image_size: int) -> tuple[int, int]:
    """The size a synthetic sample is kept at: its canvas, the short side brought down to the features'
    image size where it is larger (a tiled canvas). The refiner runs at `refiner.image_size` (128 px)
    whatever it is given, so more pixels would only cost memory: 480 canvases of 1024 x 1024 are ~4 GB."""
    h, w = canvas_hw
    scale = min(1.0, image_size / min(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


@torch.no_grad()
def make_refiner_data(
    trained: TrainedModel, paths: list[Path], n_samples: int, seed: int, progress: bool = True, batch_size: int = 8
) -> RefinerData:
    """Seeded synthetic defects on `paths` (cycled in a shuffled order) and their PNI maps.

    Each image is prepared by the bundle's geometry (squashed, letterboxed, short side, or tiled) and
    scored by `score_prepared`, the path `score` and `evaluate` run, so the refiner learns from the
    canvases and maps it will refine. Defects are drawn inside the image content, never on padding."""
    cfg = trained.config
    rcfg = cfg.refiner
    rng = np.random.default_rng([seed, 0x5EF1])
    mix = DefectMix(weights=dict(rcfg.defect_weights), p_normal=rcfg.p_normal)
    detector = build_detector(dataclasses.replace(trained, refiner=None))
    geometry = detector_geometry(detector)
    mode = default_name(detector, refine=False)
    kept: dict[int, Prepared] = {}

    def good(k: int) -> Prepared:
        """Source image k prepared; kept where its canvas is kept whole (not a large tiled one: read again)."""
        if k in kept:
            return kept[k]
        prepared = geometry.prepare(geometry.load(paths[k]))
        geometry.check(prepared, name=str(paths[k]))
        if stored_hw(prepared.canvas_hw, cfg.features.image_size) == prepared.canvas_hw:
            kept[k] = prepared
        return prepared

    order = rng.permutation(len(paths))
    images, maps, masks, families, sources = [], [], [], [], []
    # drawn, scored and brought to the kept size a batch at a time: only a batch of full canvases is held
    for sl in tqdm(list(chunks(n_samples, geometry, batch_size)), desc="synthetic defects", unit="batch",
                   disable=not progress, leave=False):
        batch, batch_masks = [], []
        for i in range(sl.start, sl.stop):
            k = int(order[i % len(order)])
            source = good(k)
            y0, x0, y1, x1 = source.content
            content, mask, name = sample_defect(source.canvas[y0:y1, x0:x1], rng, mix)
            canvas = source.canvas.copy()
            canvas[y0:y1, x0:x1] = content
            full = np.zeros(source.canvas_hw, bool)
            full[y0:y1, x0:x1] = mask
            batch.append(geometry.rebuild(canvas, source.original_hw, source.content))
            batch_masks.append(full)
            families.append(name)
            sources.append(paths[k].name)
        batch_maps = torch.from_numpy(np.stack(score_prepared(detector, geometry, batch, [mode], batch_size)[0][mode]))
        batch_mask = torch.from_numpy(np.stack(batch_masks))
        hw = stored_hw(batch[0].canvas_hw, cfg.features.image_size)
        if hw != batch[0].canvas_hw:  # the refiner sees 128 px either way; a kept mask pixel: half its area defect
            batch_maps = F.interpolate(batch_maps[:, None].float(), size=hw, mode="area")[:, 0]
            batch_mask = F.interpolate(batch_mask[:, None].float(), size=hw, mode="area")[:, 0] >= 0.5
        images.extend(resize_rgb(p.canvas, hw) for p in batch)
        maps.append(batch_maps.float())
        masks.append(batch_mask)
    return RefinerData(images=torch.from_numpy(np.stack(images)), maps=torch.cat(maps), masks=torch.cat(masks),
                       families=families, sources=sources)


def defect_level(data: RefinerData, pixel_mean: float, pixel_std: float) -> float:
    """Median normalised PNI score over the synthetic defect pixels, at least 1 (the auto target)."""
    inside = data.maps[data.masks].double()
    if inside.numel() == 0:
        return 1.0
    return max(1.0, float(((inside - pixel_mean) / pixel_std).median()))


@torch.no_grad()
def evaluate_refiner(refiner: MapRefiner, data: RefinerData, idx: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean loss (and its parts) over samples `idx`, in u units, plus the identity baseline."""
    refiner.eval()
    sums: Counter = Counter()
    for i in range(0, len(idx), batch_size):
        b = idx[i : i + batch_size]
        images, maps, masks = data.batch(b)
        u = refiner.to_units(maps)
        loss, parts = refinement_loss(refiner.refine_units(images, u), masks)
        base, _ = refinement_loss(u, masks)
        n = len(b)
        sums["loss"] += float(loss) * n
        sums["identity_loss"] += float(base) * n
        for k, v in parts.items():
            sums[k] += float(v) * n
    return {k: v / max(len(idx), 1) for k, v in sums.items()}


def fit_refiner(
    refiner: MapRefiner,
    data: RefinerData,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    cfg: RefinerConfig,
    seed: int,
    progress: bool = True,
) -> list[dict]:
    """Adam on (l_reg + l_grad) / 2 against the masks; returns the per-epoch history."""
    generator = torch.Generator().manual_seed(seed + 7)
    encoder = [p for p in refiner.encoder.parameters() if p.requires_grad]
    ids = {id(p) for p in encoder}
    rest = [p for p in refiner.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest, "lr": cfg.lr}]
    if cfg.encoder_lr_scale > 0:
        groups.append({"params": encoder, "lr": cfg.lr * cfg.encoder_lr_scale})
    else:  # a frozen encoder: no gradient is computed for it
        for p in encoder:
            p.requires_grad_(False)
    optimiser = torch.optim.Adam(groups)
    history = []
    if len(val_idx):
        history.append({"epoch": 0, **{f"val_{k}": v for k, v in evaluate_refiner(refiner, data, val_idx, cfg.batch_size).items()}})
    bar = tqdm(range(cfg.epochs), desc="refiner", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        refiner.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        total, count = 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            images, maps, masks = data.batch(b)
            pred = refiner.refine_units(images, refiner.to_units(maps))
            loss, _ = refinement_loss(pred, masks)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(b)
            count += len(b)
        row: dict = {"epoch": epoch + 1, "train_loss": total / max(count, 1)}
        if len(val_idx):
            row.update({f"val_{k}": v for k, v in evaluate_refiner(refiner, data, val_idx, cfg.batch_size).items()})
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", val=f"{row.get('val_loss', float('nan')):.4f}")
        log.info("refiner epoch %d: %s", epoch + 1, {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
    refiner.eval()
    return history


def parent_normalisation(norm: Normalisation) -> Normalisation:
    """The unrefined model's statistics (a refined bundle keeps them as extras parent_*)."""
    keys = ("image_mean", "image_std", "pixel_mean", "pixel_std", "threshold")
    if all(f"parent_{k}" in norm.extras for k in keys):
        return Normalisation(**{k: float(norm.extras[f"parent_{k}"]) for k in keys})
    return norm


def recalibrate(trained: TrainedModel, paths: list[Path]) -> Normalisation:
    """Normalisation and threshold of the refined model from refined maps of `paths` (the third split).

    The unrefined parent's statistics stay in `extras` (parent_*): its maps are on another scale.
    """
    from pni_ray.training import calibrate

    cfg = trained.config
    detector = build_detector(trained)
    parent = parent_normalisation(trained.normalisation)
    norm = calibrate(detector, paths, cfg.batch_size, cfg.scoring.threshold_sigmas,
                     name=f"{detector.mode}+refine")
    extras = dict(norm.extras)
    extras.update({f"parent_{k}": float(getattr(parent, k))
                   for k in ("image_mean", "image_std", "pixel_mean", "pixel_std", "threshold")})
    extras["n_calibration"] = float(len(paths))
    return dataclasses.replace(norm, extras=extras)


def train_refiner(
    trained: TrainedModel, data_root: Path | str, category: str, progress: bool = True
) -> TrainedModel:
    """Train `trained.config.refiner` on synthetic defects of train/good; sets trained.refiner.

    Seeded by trained.config.seed. The refiner carries the PNI model's held-out pixel statistics
    so it maps raw maps to refined raw maps on its own. Returns `trained` (modified in place):
    refiner set, config.refiner.enabled True, normalisation and threshold recomputed on refined maps
    of the calibration split (`recalibrate`), report["refiner"] and report["seconds"]["refiner"].
    """
    if trained.mlp is None and trained.config.mode == "pni":
        raise ValueError("train_refiner needs a trained PNI model")
    t0 = time.perf_counter()
    cfg = trained.config
    rcfg = cfg.refiner
    if rcfg.n_samples < 2:
        raise ValueError(f"refiner n_samples must be >= 2, got {rcfg.n_samples}")
    if rcfg.epochs < 1 or rcfg.batch_size < 1:
        raise ValueError(f"refiner epochs and batch_size must be >= 1, got {rcfg.epochs}, {rcfg.batch_size}")
    seed = cfg.seed
    paths, calibration = split_refiner_images(good_images(data_root, category), cfg, held_out_names(trained))
    log.info("%s: refiner on %d synthetic defects drawn on %d train/good images (%s)",
             category, rcfg.n_samples, len(paths), rcfg.source)
    from pni_ray.training import MIN_HOLDOUT_IMAGES

    if len(calibration) < MIN_HOLDOUT_IMAGES:  # training's floor, which its held-out set may pass before this split
        log.warning("%s: only %d held-out images calibrate the refined model's score scale and threshold (fewer than "
                    "%d: refiner.calibration_fraction %g of the held-out images): the threshold and the metrics will "
                    "be unreliable; raise refiner.calibration_fraction (a --config file), or train again with more "
                    "held out (scoring.holdout_fraction) or more good images in train/good/", category,
                    len(calibration), MIN_HOLDOUT_IMAGES, rcfg.calibration_fraction)
    data = make_refiner_data(trained, paths, rcfg.n_samples, seed, progress, cfg.batch_size)
    t_data = time.perf_counter()

    perm = torch.randperm(rcfg.n_samples, generator=torch.Generator().manual_seed(seed + 3))
    n_val = min(rcfg.n_samples - 1, int(round(rcfg.val_fraction * rcfg.n_samples))) if rcfg.val_fraction > 0 else 0
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    norm = parent_normalisation(trained.normalisation)
    sigmas = rcfg.target_sigmas if rcfg.target_sigmas is not None else defect_level(data, norm.pixel_mean, norm.pixel_std)
    refiner = build_refiner(rcfg, seed=seed)
    refiner.set_map_statistics(norm.pixel_mean, norm.pixel_std, sigmas)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 5)
        history = fit_refiner(refiner, data, train_idx, val_idx, rcfg, seed, progress)
    t_fit = time.perf_counter()

    inside = data.maps[data.masks]
    outside = data.maps[~data.masks]
    scale = norm.pixel_std * sigmas
    facts = {
        "n_samples": rcfg.n_samples,
        "n_train": int(len(train_idx)),
        "n_val": int(n_val),
        "n_source_images": len(paths),
        "source": rcfg.source,
        "families": dict(sorted(Counter(data.families).items())),
        "defect_pixel_fraction": float(data.masks.float().mean()),
    }
    trained.refiner = refiner
    trained.config = cfg.replace(refiner=dataclasses.replace(rcfg, enabled=True))
    trained.normalisation = recalibrate(trained, calibration)
    facts["source_images"] = [p.name for p in paths]
    facts["calibration_images"] = [p.name for p in calibration]
    report = trained.report if isinstance(trained.report, dict) else {}
    report.setdefault("deterministic", {})["refiner"] = facts
    report["refiner"] = {
        "history": history,
        # where the PNI maps of the synthetic data lie in the refiner's u units (target 1 / 0)
        "target_sigmas": float(sigmas),
        "u_inside_defects_mean": float((inside.mean() - norm.pixel_mean) / scale) if inside.numel() else None,
        "u_outside_defects_mean": float((outside.mean() - norm.pixel_mean) / scale),
    }
    report.setdefault("seconds", {})["refiner"] = t_fit - t0
    report["seconds"]["refiner_data"] = t_data - t0
    trained.report = report
    log.info("%s: refiner trained in %.1f s (data %.1f s); last epoch %s",
             category, t_fit - t0, t_data - t0, history[-1] if history else None)
    return trained
