"""Train one category from good images only: memory bank, C_dist, neighbourhood MLP, position prior.

Plain torch, no Ray: `pni-ray train` calls this directly and `train-all` calls it inside a
Ray task, which is what makes their bundles byte-identical for the same seed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pni_ray.config import MLP_PRECISIONS, NeighbourhoodConfig, TrainConfig, spread_value
from pni_ray.data.mvtec import Category, LayoutError, load_category
from pni_ray.geometry import Geometry
from pni_ray.models.coreset import candidate_rows, greedy_kcenter_order
from pni_ray.models.features import PatchFeatureExtractor, build_extractor
from pni_ray.models.neighbourhood import NeighbourhoodMLP, choose_cut
from pni_ray.models.pni import Normalisation, PNIDetector, TrainedModel, build_detector, image_statistics
from pni_ray.models.position_prior import (
    SparsePositionPrior,
    choose_min_count,
    choose_spread,
    position_counts,
    prior_from_counts,
)
from pni_ray.models.scorer import PatchScorer, nearest_in_prefix_and_all, nearest_neighbours
from pni_ray.position_check import checked_scoring_mode
from pni_ray.predict import content_maps, detector_geometry, extract_training_features

log = logging.getLogger(__name__)


EVAL_ROWS = 8 * 40 * 40  # positions per validation batch: 8 images of a 320 px category's 40 x 40 grid


def stage_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a stage's output bytes. Fits of the same data, config, seed and threads on one CPU type
    give the same bundle; when two do not, these name the first stage that differed (features: the
    backbone's kernels; coreset order: the search; MLP targets: the assignment), which the bundle's
    own files cannot, holding only the end of each stage."""
    return hashlib.sha256(tensor.detach().contiguous().numpy().data).hexdigest()


def cpu_model() -> str:
    """The CPU's name, for the log: with the manifest's training.cpu_capability it says where a fit ran."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    except OSError:
        return platform.processor() or platform.machine() or "unknown"


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def calibration_split(paths: list[Path], cfg: TrainConfig) -> tuple[list[Path], list[Path]]:
    """train/good -> (memory-bank images, held-out calibration images): a seeded split holding out
    scoring.holdout_fraction of the images, at least scoring.min_holdout.

    Too few images for that is refused: a model without held-out images has no threshold, so it
    would flag nothing (holdout_fraction 0 asks for that explicitly)."""
    fraction = cfg.scoring.holdout_fraction
    n_hold = max(cfg.scoring.min_holdout, int(round(fraction * len(paths)))) if fraction > 0 else 0
    if len(paths) - n_hold < 1:
        good = Path(paths[0]).parent if paths else Path("train/good")
        raise LayoutError(good.parent.parent, [
            f"{good}: {len(paths)} good training image(s); at least {n_hold + 1} are needed: {n_hold} held out to "
            "calibrate the score scale and threshold (scoring.min_holdout), the rest for the memory bank. Add good "
            "images (MVTec AD categories have 60 to 400), or set scoring.holdout_fraction to 0 for a model without "
            "a threshold"])
    perm = torch.randperm(len(paths), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    hold = sorted(paths[i] for i in perm[:n_hold])
    keep = sorted(paths[i] for i in perm[n_hold:])
    return keep, hold


# Below these counts a trained model still scores, but its threshold and metrics say little.
MIN_MEMORY_IMAGES = 10
MIN_HOLDOUT_IMAGES = 5


def small_training_set_warning(n_memory: int, n_holdout: int) -> str | None:
    """Why a split of train/good this small gives an unreliable model, or None when it is big enough."""
    if n_memory >= MIN_MEMORY_IMAGES and n_holdout >= MIN_HOLDOUT_IMAGES:
        return None
    parts = []
    if n_memory < MIN_MEMORY_IMAGES:
        parts.append(f"only {n_memory} images in the memory bank (fewer than {MIN_MEMORY_IMAGES}): normal variation "
                     "it has not seen will score as anomalous")
    if n_holdout < MIN_HOLDOUT_IMAGES:
        parts.append(f"only {n_holdout} held-out images calibrate the score scale and threshold (fewer than "
                     f"{MIN_HOLDOUT_IMAGES})" + (": the threshold is the uncalibrated default" if not n_holdout else ""))
    return ("small training set: " + "; ".join(parts) + ". The threshold and the metrics will be unreliable; "
            "add good images to train/good/ (MVTec AD categories have 60 to 400).")


def coreset_pool(features: torch.Tensor, valid: torch.Tensor | None, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D, h, w) training features -> (every patch row, the rows the greedy coreset chooses from):
    valid positions only, seeded-subsampled to coreset.max_candidates."""
    rows = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    candidates = candidate_rows(valid, rows.shape[0], cfg.coreset.max_candidates, cfg.seed)
    return rows, rows if candidates is None else rows[candidates]


def coreset_size(n_patches: int, ratio: float, min_size: int, max_size: int) -> int:
    return int(min(n_patches, max(min_size, min(max_size, math.ceil(ratio * n_patches)))))


def training_precision(precision: str) -> str:
    """The precision the MLP's training steps run in: 'auto' resolved for this CPU (bfloat16 where it
    has native bf16, else float32); 'bfloat16' refused where the CPU would emulate it."""
    if precision not in MLP_PRECISIONS:
        raise ValueError(f"unknown MLP training precision {precision!r}; choose from {MLP_PRECISIONS}")
    if precision == "auto":
        return "bfloat16" if native_bf16() else "float32"
    if precision == "bfloat16" and not native_bf16():
        raise ValueError(
            "neighbourhood.train_precision 'bfloat16' needs a CPU with native bf16 (AVX512-BF16 or AMX); this "
            "one would emulate it, far slower than float32: train with --mlp-precision float32 or auto (or set "
            "neighbourhood.train_precision to \"float32\" in the --config file)"
        )
    return precision


def native_bf16() -> bool:
    """AVX512-BF16 or AMX: the x86 instructions oneDNN's bf16 kernels need to beat float32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def train_neighbourhood_mlp(
    features: torch.Tensor,
    targets: torch.Tensor,
    n_classes: int,
    cfg: NeighbourhoodConfig,
    seed: int,
    progress: bool,
    valid: torch.Tensor | None = None,
    crop: tuple[int, int] | None = None,
) -> tuple[NeighbourhoodMLP, dict]:
    """Cross-entropy against the nearest C_dist entry of each centre patch; seeded, with a val split.

    valid (N, h, w) bool: only valid positions (not letterbox padding) are sampled for the loss.
    crop (ch, cw): each batch trains on a seeded random crop of the grid (large tiled grids), its
    inputs widened by the window radius so every cropped position sees its true neighbourhood.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    n_img, dim, h, w = features.shape
    mlp = NeighbourhoodMLP(dim, n_classes, cfg)
    perm = torch.randperm(n_img, generator=generator)
    n_val = min(n_img - 1, max(1, int(round(cfg.val_fraction * n_img)))) if n_img > 1 else 0
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    optimiser = torch.optim.Adam(mlp.parameters(), lr=cfg.lr)
    batches = math.ceil(len(train_idx[: cfg.images_per_epoch]) / cfg.batch_images)  # as the epoch loop draws them
    schedule = learning_rate_schedule(optimiser, cfg, batches)
    history = []
    best: tuple[float, int, dict] | None = None  # (val loss, epoch, weights) of the best epoch so far
    per_image = cfg.positions_per_image or h * w  # None: every position
    precision = training_precision(cfg.train_precision)
    bf16 = precision == "bfloat16"
    bar = tqdm(range(cfg.epochs), desc="neighbourhood MLP", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        mlp.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)][: cfg.images_per_epoch]
        total, count = 0.0, 0
        for i in range(0, len(order), cfg.batch_images):
            batch = order[i : i + cfg.batch_images]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                step = _batch_logits(mlp, features, targets, valid, batch, crop, cfg.window, per_image, generator)
            if step is not None:
                logits, labels = step
                n_pick = labels.numel()
                loss = F.cross_entropy(logits.float(), labels)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * n_pick
                count += n_pick
            schedule.step()  # per batch, skipped or not: the schedule follows the plan, not the data
        val = evaluate_mlp(mlp, features, targets, valid, val_idx) if n_val else {}
        history.append({"epoch": epoch + 1, "train_images": len(order), "train_loss": total / max(count, 1), **val})
        bar.set_postfix(loss=f"{total / max(count, 1):.3f}", val_acc=f"{val.get('val_top1', float('nan')):.3f}")
        log.info("MLP epoch %d of %d: %d images, train loss %.4f%s", epoch + 1, cfg.epochs, len(order),
                 total / max(count, 1), "".join(f", {k.replace('_', ' ')} {v:.4f}" for k, v in val.items()))
        if "val_loss" in val:
            if best is None or val["val_loss"] < best[0]:
                best = (val["val_loss"], epoch + 1, copy.deepcopy(mlp.state_dict()))
            elif epoch + 1 - best[1] >= cfg.patience:
                log.info("MLP: validation loss has not improved for %d epochs; keeping epoch %d", cfg.patience, best[1])
                break
    bar.close()
    if best is not None:
        mlp.load_state_dict(best[2])
    mlp.eval()
    best_epoch = best[1] if best is not None else len(history)
    return mlp, {
        "history": history,
        "best_epoch": best_epoch,
        "best": history[best_epoch - 1] if history else {},
        "n_train_images": len(train_idx),
        "n_val_images": n_val,
        "precision": precision,
    }


def learning_rate_schedule(
    optimiser: torch.optim.Optimizer, cfg: NeighbourhoodConfig, batches_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The MLP's learning rate, stepped once per batch over epochs x batches_per_epoch batches.

    "cosine" anneals from cfg.lr towards 0 along a half cosine; "step" multiplies it by lr_gamma at
    the start of every lr_step-th epoch (the same rates as a per-epoch StepLR).
    """
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimiser, step_size=cfg.lr_step * batches_per_epoch, gamma=cfg.lr_gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, cfg.epochs * batches_per_epoch))


def _batch_logits(
    mlp: NeighbourhoodMLP,
    features: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None,
    batch: torch.Tensor,
    crop: tuple[int, int] | None,
    window: int,
    per_image: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Logits and labels of one training batch's sampled valid positions (None: no valid position).

    crop (ch, cw): the batch trains on a seeded random crop of the grid, its inputs widened by the
    window radius so every cropped position sees its true neighbourhood.
    """
    if valid is None and crop is None:
        hidden = mlp.hidden_features(features[batch])
        labels = targets[batch].reshape(-1)
    else:
        _, _, h, w = features.shape
        ch, cw = (h, w) if crop is None else (min(h, crop[0]), min(w, crop[1]))
        y0 = int(torch.randint(h - ch + 1, (1,), generator=generator)) if ch < h else 0
        x0 = int(torch.randint(w - cw + 1, (1,), generator=generator)) if cw < w else 0
        r = window // 2
        ya, yb, xa, xb = max(0, y0 - r), min(h, y0 + ch + r), max(0, x0 - r), min(w, x0 + cw + r)
        hidden = mlp.hidden_features(features[:, :, ya:yb, xa:xb][batch])
        hidden = hidden[:, :, y0 - ya : y0 - ya + ch, x0 - xa : x0 - xa + cw]
        labels = targets[:, y0 : y0 + ch, x0 : x0 + cw][batch].reshape(-1)
        if valid is not None:
            valid = valid[:, y0 : y0 + ch, x0 : x0 + cw][batch]
    rows = hidden.permute(0, 2, 3, 1).reshape(-1, hidden.shape[1])
    if valid is None:
        n_pick = min(rows.shape[0], per_image * len(batch))
        pick = torch.randperm(rows.shape[0], generator=generator)[:n_pick]
    else:
        allowed = valid.reshape(-1).nonzero(as_tuple=True)[0]
        n_pick = min(allowed.numel(), per_image * len(batch))
        if n_pick == 0:
            return None
        pick = allowed[torch.randperm(allowed.numel(), generator=generator)[:n_pick]]
    return mlp.classify(rows[pick]), labels[pick]


def _classes_ahead(rows: torch.Tensor, labels: torch.Tensor, check_nan: bool) -> torch.Tensor:
    """How many classes rank before each row's label: score strictly higher, or tie it at a lower
    index (argmax's first-index rule); n_classes where the row holds NaN (counted wrong)."""
    own = rows.gather(1, labels.unsqueeze(1))
    # counted in int32: a bool sum's default int64 copies the whole (rows, classes) mask first, which
    # took half of each epoch's validation pass
    ahead = (rows > own).sum(1, dtype=torch.int32)
    tied = ((rows == own).sum(1, dtype=torch.int32) > 1).nonzero(as_tuple=True)[0]  # the label always ties itself
    if tied.numel():
        earlier = torch.arange(rows.shape[1], device=rows.device) < labels[tied].unsqueeze(1)
        ahead[tied] += ((rows[tied] == own[tied]) & earlier).sum(1, dtype=torch.int32)
    if check_nan:
        ahead[rows.isnan().any(1)] = rows.shape[1]
    return ahead


@torch.no_grad()
def evaluate_mlp(
    mlp: NeighbourhoodMLP, features: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None,
    idx: torch.Tensor | None = None,
) -> dict:
    """Held-out cross-entropy, top-1 and top-5 of `mlp` on every (valid) position of `features`.

    Batch by batch, logits channels-last (one contiguous row of classes per position, as
    `NeighbourhoodMLP.probabilities` computes them): a (N, K, h, w) tensor of all held-out logits
    was 1 GB on a 761-image category, and reductions over its strided class axis cost as much as
    the forward pass. Top-k by counting instead of sorting: a label is in the top k when fewer
    than k classes rank before it (`_classes_ahead`: argmax's and topk's order, ties included). valid (N, h, w) bool: positions that count;
    idx: the images to evaluate (default all). Batches hold at most EVAL_ROWS positions, so big
    (tiled) grids go one image at a time.
    """
    mlp.eval()
    idx = torch.arange(len(features)) if idx is None else idx
    batch = max(1, EVAL_ROWS // (features.shape[2] * features.shape[3]))
    loss = top1 = top5 = 0.0
    count = 0
    for i in range(0, len(idx), batch):
        images = idx[i : i + batch]
        hidden = mlp.hidden_features(features[images]).permute(0, 2, 3, 1)
        rows = mlp.classify(hidden).reshape(-1, mlp.n_classes)
        labels = targets[images].reshape(-1)
        if valid is not None:
            keep = valid[images].reshape(-1)
            rows, labels = rows[keep], labels[keep]
        if labels.numel() == 0:
            continue
        batch_loss = float(F.cross_entropy(rows, labels, reduction="sum"))
        higher = _classes_ahead(rows, labels, check_nan=not math.isfinite(batch_loss))
        loss += batch_loss
        top1 += float((higher == 0).sum())
        top5 += float((higher < 5).sum())
        count += labels.numel()
    count = max(count, 1)
    return {"val_loss": loss / count, "val_top1": top1 / count, "val_top5": top5 / count}


COPIES_MAX_SCORE = 1e-3  # held-out images all scoring below this distance are copies of memory-bank images


def copies_warning(normalisation: Normalisation) -> str | None:
    """Why a threshold from held-out images that all score next to 0 flags almost any new image, or None: the
    held-out images are copies of memory-bank ones (one image copied to make up the count, a folder twice)."""
    top = normalisation.extras.get("holdout_max_image_score")
    if top is None or top >= COPIES_MAX_SCORE:
        return None
    return (f"every held-out good image scores {top:.2g} or less (next to 0): they are copies of memory-bank images, "
            f"so the threshold {normalisation.threshold:.3g} flags almost any other image; train/good needs distinct "
            "good images (its duplicates removed)")


@torch.no_grad()
def calibrate(
    detector: PNIDetector, paths: list[Path], batch_size: int, threshold_sigmas: float,
    geometry: Geometry | None = None, name: str | None = None,
) -> Normalisation:
    """Score-scale and threshold from held-out good images, never from test images.

    Maps and scores come from the scoring path itself (`content_maps`: the bundle's geometry, the
    pixel statistics over the image content only); `name` "pni+refine" calibrates refined maps.
    """
    if not paths:
        return Normalisation()
    geometry = geometry or detector_geometry(detector)
    content, scores = content_maps(detector, geometry, paths, batch_size, name)
    m = torch.from_numpy(np.concatenate([c.reshape(-1) for c in content]))
    image_mean, image_std = image_statistics(torch.from_numpy(scores))
    return Normalisation(
        image_mean=image_mean,
        image_std=image_std,
        pixel_mean=float(m.double().mean()),
        pixel_std=max(float(m.double().std()), 1e-6),
        threshold=image_mean + threshold_sigmas * image_std,
        extras={"holdout_max_image_score": float(scores.max()), "n_holdout": float(len(paths))},
    )


@dataclass
class HeldOut:
    """Held-out good images as the priors' cuts see them: features (N, D, h, w), each patch's nearest
    C_emb entry (N, h, w), and which cells are image content (None: all)."""

    features: torch.Tensor
    nearest: torch.Tensor
    valid: torch.Tensor | None

    def content(self) -> torch.Tensor:
        """(N * h * w,) bool: cells that are image content."""
        return torch.ones(self.nearest.numel(), dtype=torch.bool) if self.valid is None else self.valid.reshape(-1)


def held_out_patches(
    extractor: PatchFeatureExtractor,
    geometry: Geometry,
    holdout_paths: list[Path],
    memory: torch.Tensor,
    grid: tuple[int, int],
    cfg: TrainConfig,
    progress: bool,
) -> HeldOut | None:
    """Features and nearest C_emb entries of the held-out images; None without held-out images or
    when they give another grid than the memory bank's (the priors' cuts then fall back, logged)."""
    if not holdout_paths:
        return None
    feats, valid = extract_training_features(
        extractor, geometry, holdout_paths, cfg.batch_size, progress, desc="held-out features"
    )
    n, d, hh, ww = feats.shape
    if (hh, ww) != tuple(grid):
        log.warning("held-out images give a %dx%d grid, the memory bank %dx%d: the priors' cuts are not "
                    "measured (position prior: the broadest spread, entries seen once; p(c|N): tau)", hh, ww, *grid)
        return None
    _, idx = nearest_neighbours(feats.permute(0, 2, 3, 1).reshape(-1, d), memory, cfg.scoring.chunk_patches)
    return HeldOut(feats, idx.view(n, hh, ww), valid)


@dataclass
class PositionFit:
    """p(c|x) and how it was chosen: the window (spread) and how often an entry must have been seen
    in it (min_count), each with the held-out keep rates measured (empty where configured)."""

    prior: SparsePositionPrior
    spread: int | float
    spread_keep: dict[int | float, float]
    min_count: int
    count_keep: dict[int, float]


def fit_position_prior(
    held: HeldOut | None, memory: torch.Tensor, nearest: torch.Tensor, valid: torch.Tensor | None, cfg: TrainConfig
) -> PositionFit:
    """p(c|x) with the configured spread and count, or (None) the sharpest held-out good images tolerate:
    first the spread, then the count within it."""
    n_entries = memory.shape[0]
    tau = cfg.scoring.tau_scale / n_entries
    held_nearest, held_valid = (held.nearest, held.valid) if held else (None, None)
    if cfg.position.spread is not None:
        spread, spread_keep = spread_value(cfg.position.spread), {}
        counts = position_counts(nearest, n_entries, spread, valid)
    else:
        counts, spread, spread_keep = choose_spread(nearest, held_nearest, n_entries, cfg.position.spread_candidates,
                                                    cfg.position.min_keep, tau, valid, held_valid)
    grid = tuple(nearest.shape[1:])
    if cfg.position.min_count is not None:
        return PositionFit(prior_from_counts(counts, grid, cfg.position.min_count), spread, spread_keep,
                           cfg.position.min_count, {})
    known = {1: spread_keep[spread]} if spread in spread_keep else {}  # the spread rule measured count 1
    prior, min_count, count_keep = choose_min_count(counts, grid, held_nearest, cfg.position.min_count_candidates,
                                                    cfg.position.min_keep, tau, held_valid, measured=known)
    return PositionFit(prior, spread, spread_keep, min_count, count_keep)


@torch.no_grad()
def fit_neighbourhood_cut(
    held: HeldOut | None, mlp: NeighbourhoodMLP, memory: torch.Tensor, emb_to_dist: torch.Tensor, cfg: TrainConfig
) -> tuple[float, dict[float, float]]:
    """p(c|N)'s cut in multiples of tau: the configured one, or (cut None) the strictest held-out good
    patches tolerate (`choose_cut`), with p(c|N) over C_emb as the scorer computes it."""
    if cfg.neighbourhood.cut is not None:
        return float(cfg.neighbourhood.cut), {}
    if held is None:
        return 1.0, {}
    scorer = PatchScorer(memory, emb_to_dist, tau_scale=cfg.scoring.tau_scale)
    n, _, h, w = held.features.shape
    nearest = held.nearest.reshape(-1, 1)
    step = max(1, EVAL_ROWS // (h * w))  # images per pass: (step, |C_dist|, h, w) probabilities at most
    p_nearest = torch.cat([
        scorer.neighbourhood_mask_probs(mlp.probabilities(held.features[i : i + step]).permute(0, 2, 3, 1)
                                        .reshape(-1, mlp.n_classes), nearest[i * h * w : (i + step) * h * w])
        for i in range(0, n, step)]).reshape(-1)
    return choose_cut(p_nearest[held.content()], scorer.tau, cfg.neighbourhood.cut_candidates,
                      cfg.neighbourhood.min_keep)


def train_category(
    data_root: Path | str,
    category: str,
    cfg: TrainConfig = TrainConfig(),
    progress: bool = True,
    category_data: Category | None = None,
) -> TrainedModel:
    """Fit PatchCore memory bank and, in `pni` mode, the neighbourhood MLP and position prior."""
    t0 = time.perf_counter()
    if cfg.mode == "pni":
        training_precision(cfg.neighbourhood.train_precision)  # refused before minutes of features, not after
    seed_everything(cfg.seed)
    geometry = Geometry.from_config(cfg)
    cat = category_data or load_category(data_root, category, **geometry.read_options(), with_test=False)
    memory_paths, holdout_paths = calibration_split(cat.train, cfg)
    # from the headers, before any feature: a held-out image too thin for the geometry failed after the MLP
    content_extent = geometry.training_extent(memory_paths + holdout_paths)  # letterbox: what the model will have seen
    log.info("%s: %d memory-bank images, %d held out for calibration", category, len(memory_paths), len(holdout_paths))
    small = small_training_set_warning(len(memory_paths), len(holdout_paths))
    if small:
        log.warning("%s: %s", category, small)
    torch.manual_seed(cfg.seed)
    extractor = build_extractor(cfg.features)
    log.info("%s: geometry %s; CPU %s (torch kernels %s)", category, geometry.describe(), cpu_model(),
             torch.backends.cpu.get_cpu_capability())
    # valid (N, h, w) bool: False at letterbox / tiling padding; None when every cell is content
    grey: list[bool] = []
    feats, valid = extract_training_features(extractor, geometry, memory_paths, cfg.batch_size, progress, grey=grey)
    n_img, dim, h, w = feats.shape
    n_grey = sum(grey)
    if 0 < n_grey < len(grey):  # a mono camera's frames among a colour line's: trained as they are, but said
        example = next(p for p, g in zip(memory_paths, grey) if g)
        log.warning("%s: %d of the %d memory-bank images are grey (three equal channels; e.g. %s) among colour ones: "
                    "another camera's frames in this folder? They are trained on as they are", category, n_grey,
                    len(grey), example)
    rows, pool = coreset_pool(feats, valid, cfg)
    n_patches = rows.shape[0] if valid is None else int(valid.sum())
    n_select = min(pool.shape[0], coreset_size(n_patches, cfg.coreset.ratio, cfg.coreset.min_size, cfg.coreset.max_size))
    t_feat = time.perf_counter()
    log.info("%s: greedy coreset of %d from %d candidate patches (%d patches)", category, n_select, pool.shape[0], n_patches)
    order = greedy_kcenter_order(
        pool, n_select, cfg.coreset.projection_dim, cfg.coreset.chunk_size, cfg.seed, progress
    )
    memory = pool[order].contiguous()
    t_coreset = time.perf_counter()
    facts: dict = {
        "n_memory_images": n_img,
        "n_holdout_images": len(holdout_paths),
        "grey_memory_images": n_grey,  # three equal channels: scoring says when its inputs are not alike
        "n_patches": int(rows.shape[0]),
        **({} if geometry.cfg.policy == "resize" and not geometry.tiled else {"n_valid_patches": n_patches, "n_candidates": int(pool.shape[0]), "grid": [h, w]}),
        "holdout_images": [p.name for p in holdout_paths],
        "stage_sha256": {"features": stage_sha256(rows), "coreset_order": stage_sha256(order)},  # rows: feats, no copy
    }
    emb_to_dist = prior = mlp = None
    dist_size, cut = 0, 1.0
    if cfg.mode == "pni":
        dist_size = min(cfg.neighbourhood.dist_size, memory.shape[0])
        dist = memory[:dist_size]
        _, emb_to_dist = nearest_neighbours(memory, dist, cfg.scoring.chunk_patches)
        log.info("%s: nearest C_dist entry (MLP targets) and C_emb entry (position prior) of %d patches",
                 category, rows.shape[0])
        chunk = cfg.scoring.chunk_patches
        targets, nearest_emb = nearest_in_prefix_and_all(rows, memory, dist_size, chunk,
                                                         desc="nearest C_dist / C_emb" if progress else None)
        facts["stage_sha256"]["mlp_targets"] = stage_sha256(targets)
        t_assign = time.perf_counter()
        measured = (cfg.position.spread is None or cfg.position.min_count is None
                    or cfg.neighbourhood.cut is None)  # else nothing reads held-out patches
        held = held_out_patches(extractor, geometry, holdout_paths if measured else [], memory, (h, w), cfg, progress)
        fit = fit_position_prior(held, memory, nearest_emb.view(n_img, h, w), valid, cfg)
        prior = fit.prior
        facts["position_spread"] = fit.spread
        facts["position_held_out_keep"] = {str(k): round(v, 6) for k, v in fit.spread_keep.items()}
        facts["position_min_count"] = fit.min_count
        facts["position_min_count_held_out_keep"] = {str(k): round(v, 6) for k, v in fit.count_keep.items()}
        log.info("%s: position prior spread %g (held-out keep rates %s), entries seen >= %d times there "
                 "(keep rates %s)", category, fit.spread, {k: round(v, 4) for k, v in fit.spread_keep.items()},
                 fit.min_count, {k: round(v, 4) for k, v in fit.count_keep.items()})
        t_prior = time.perf_counter()
        mlp, mlp_report = train_neighbourhood_mlp(
            feats, targets.view(n_img, h, w), dist_size, cfg.neighbourhood, cfg.seed, progress,
            valid=valid, crop=geometry.mlp_crop(),
        )
        facts["mlp"] = mlp_report
        facts["position_prior_nnz"] = int(prior.prob.numel())
        cut, cut_keep = fit_neighbourhood_cut(held, mlp, memory, emb_to_dist, cfg)
        facts["neighbourhood_cut"] = cut
        facts["neighbourhood_held_out_keep"] = {f"{k:g}": round(v, 6) for k, v in cut_keep.items()}
        log.info("%s: p(c|N) cut at %g tau (held-out keep rates %s)", category, cut,
                 {f"{k:g}": round(v, 4) for k, v in cut_keep.items()})
    t_pni = time.perf_counter()
    trained = TrainedModel(
        category=category,
        config=cfg,
        memory=memory,
        dist_size=dist_size,
        emb_to_dist=emb_to_dist,
        position_prior=prior,
        mlp=mlp,
        normalisation=Normalisation(),
        grid=(h, w),
        feature_dim=dim,
        neighbourhood_cut=cut,
        content_extent=content_extent,
    )
    detector = build_detector(trained, extractor)
    if cfg.mode == "pni":
        mode, check = checked_scoring_mode(detector, geometry, holdout_paths, n_img, cfg, category)
        if check is not None:
            facts["position_check"] = check
        if mode != cfg.scoring.mode:
            cfg = cfg.replace(scoring=dataclasses.replace(cfg.scoring, mode=mode))
            trained.config = cfg
            detector = build_detector(trained, extractor)
    t_check = time.perf_counter()
    trained.normalisation = calibrate(
        detector, holdout_paths, cfg.batch_size, cfg.scoring.threshold_sigmas, geometry
    )
    copies = copies_warning(trained.normalisation)
    if copies:
        log.warning("%s: %s", category, copies)
    seconds = {
        "features": t_feat - t0,
        "coreset": t_coreset - t_feat,
        "pni": t_pni - t_coreset,  # = assignment + position_prior + mlp
        **({"assignment": t_assign - t_coreset, "position_prior": t_prior - t_assign, "mlp": t_pni - t_prior,
            "position_check": t_check - t_pni} if cfg.mode == "pni" else {}),
        "calibration": time.perf_counter() - t_check,
        "total": time.perf_counter() - t0,
    }
    trained.report = {"deterministic": facts, "seconds": seconds}
    priors = (f", priors {seconds['pni']:.1f} s (nearest entries {seconds['assignment']:.1f}, position prior "
              f"{seconds['position_prior']:.1f}, MLP {seconds['mlp']:.1f}), position check "
              f"{seconds['position_check']:.1f} s" if cfg.mode == "pni" else "")
    log.info("%s: trained in %.1f s: features %.1f s, coreset %.1f s%s, calibration %.1f s", category, seconds["total"],
             seconds["features"], seconds["coreset"], priors, seconds["calibration"])
    return trained
