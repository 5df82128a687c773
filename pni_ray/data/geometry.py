"""Geometry helpers that read image files: training features, calibration maps, derived data sets.

The geometry itself (policies, canvases, tiling, the one map resize) is `pni_ray.geometry`,
torch-free so the edge runtime shares it; the detector pipeline on prepared images is
`pni_ray.models.predict`. Names are re-exported here for callers of the old module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pni_ray.geometry import (  # noqa: F401 (re-exported)
    POLICIES,
    STRIDE,
    Geometry,
    GeometryError,
    Prepared,
    blend_weights,
    cell_validity,
    resize_map,
    stitch,
    tile_starts,
)
from pni_ray.models.predict import chunks, default_name, features, fill_invalid, predict_images, score_prepared  # noqa: F401

if TYPE_CHECKING:
    from pni_ray.models.features import PatchFeatureExtractor


@torch.no_grad()
def content_maps(
    detector: object, geometry: Geometry, paths: Sequence[Path], batch_size: int, name: str | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Maps over the image content (canvas resolution, padding cropped) and image scores: calibration.

    `name` is the mode name to score with ("pni", "pni+refine"); default: the detector's own.
    """
    name = name or default_name(detector)
    maps_out: list[np.ndarray] = []
    scores_out: list[float] = []
    for sl in chunks(len(paths), geometry, batch_size):
        prepared = [geometry.prepare(geometry.load(p)) for p in paths[sl]]
        maps, scores, _ = score_prepared(detector, geometry, prepared, [name], batch_size)
        maps_out.extend(geometry.content_map(m, p) for m, p in zip(maps[name], prepared))
        scores_out.extend(scores[name])
    return maps_out, np.asarray(scores_out, dtype=np.float64)


@torch.no_grad()
def extract_training_features(
    extractor: "PatchFeatureExtractor",
    geometry: Geometry,
    paths: Sequence[Path],
    batch_size: int,
    progress: bool = True,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, D, gh, gw) features (a view of channels-last storage: rows = a free reshape) and (N, gh, gw)
    validity, None when every cell of every image is content (no padding).

    Every image must give the same grid (short-side and tiling keep the aspect ratio): the first
    image sets it and any other is refused with both shapes in the message.
    """
    feats: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    n_done = 0
    for sl in tqdm(list(chunks(len(paths), geometry, batch_size)), desc=desc, unit="batch", disable=not progress, leave=False):
        prepared = [geometry.prepare(geometry.load(p)) for p in paths[sl]]
        if grid is None:
            grid = prepared[0].grid
        for p, path in zip(prepared, paths[sl]):
            geometry.check(p, grid, name=str(path))
        batch = features(extractor, geometry, prepared, tile_batch=batch_size)
        if feats is None:
            feats = torch.empty(len(paths), grid[0], grid[1], batch.shape[1], dtype=batch.dtype)
            valid = torch.empty(len(paths), grid[0], grid[1], dtype=torch.bool)
        assert valid is not None
        feats[n_done : n_done + len(prepared)] = batch.permute(0, 2, 3, 1)
        valid[n_done : n_done + len(prepared)] = torch.from_numpy(np.stack([p.valid_grid() for p in prepared]))
        n_done += len(prepared)
    if feats is None or valid is None:
        raise ValueError("no training images")
    return feats.permute(0, 3, 1, 2), (None if bool(valid.all()) else valid)


def candidate_rows(valid: torch.Tensor | None, n_rows: int, max_candidates: int | None, seed: int) -> torch.Tensor | None:
    """Row indices the coreset may choose from: valid positions, seeded-subsampled to the cap.

    None means "every row" (no padding, no cap): the caller keeps its original, copy-free path.
    """
    idx = None
    if valid is not None and not bool(valid.all()):
        idx = valid.reshape(-1).nonzero(as_tuple=True)[0]
    n = n_rows if idx is None else idx.numel()
    if max_candidates and n > max_candidates:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))[:max_candidates].sort().values
        idx = pick if idx is None else idx[pick]
    return idx


def derive_category(
    src_root: Path | str,
    category: str,
    dst_root: Path | str,
    crop: tuple[int, int, int, int] | None = None,
    size: tuple[int, int] | None = None,
) -> Path:
    """Write a copy of an MVTec-layout category with every image and mask cropped and/or resized alike.

    crop (top, left, height, width) is applied first, then size (height, width): images bilinear,
    masks nearest. For geometry experiments (non-square crops, upscaled sets); writes PNGs.
    """
    from PIL import Image

    src, dst = Path(src_root) / category, Path(dst_root) / category
    files = [p for p in sorted(src.rglob("*")) if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")]
    for path in files:
        rel = path.relative_to(src)
        is_mask = rel.parts[0] == "ground_truth"
        img = Image.open(path)
        img = img.convert("L" if is_mask else "RGB")
        if crop is not None:
            top, left, h, w = crop
            img = img.crop((left, top, left + w, top + h))
        if size is not None:
            img = img.resize((size[1], size[0]), Image.NEAREST if is_mask else Image.BILINEAR)
        out = (dst / rel).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out)
    return dst
