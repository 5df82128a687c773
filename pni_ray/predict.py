"""Prepared images -> canvas maps and image scores with a torch detector: the one scoring path.

`evaluate`, calibration, `predict_images` and `pni-ray score` on a bundle all call
`score_prepared`: images prepared by the bundle's `Geometry` (pni_ray.geometry), features (tiles
stitched), p(c|N), the masked minimum, padded cells filled from their nearest content cell, the
map, the refiner, and the image score as the maximum over the content. The default `resize` is
one case of it (one tile-free canvas, no padding), not a second path. Training reads its features
through the same `features` (`extract_training_features`). This sits above `pni_ray.models` (pure
torch) and `pni_ray.geometry` (images and maps, torch-free): the models never see a file or a canvas.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pni_ray.config import GeometryConfig, ScoringConfig
from pni_ray.data.images import is_grey, to_float
from pni_ray.geometry import Geometry, GeometryError, Prepared

NEEDS_MLP = ("neighbourhood", "pni", "pni_split")


def detector_geometry(detector: Any) -> Geometry:
    """The geometry a detector was trained with (its bundle's config and grid, which `build_detector`
    records on it); plain resize for a detector built by hand."""
    cfg = getattr(detector, "config", None)
    if cfg is not None:
        return Geometry.from_config(cfg, getattr(detector, "grid", None), getattr(detector, "content_extent", None))
    return Geometry(GeometryConfig(), int(detector.image_size),
                    image_window=int(getattr(detector, "image_window", ScoringConfig.image_window)))


def chunks(n: int, geometry: Geometry, batch_size: int) -> Iterable[slice]:
    step = 1 if geometry.tiled else max(1, batch_size)  # a tiled image is already a batch of tiles
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


def model_device(module: Any) -> torch.device:
    """Where a detector's (or extractor's) weights live: inputs go there, results come back to the CPU."""
    for tensor in getattr(module, "parameters", lambda: iter(()))():
        return tensor.device
    return torch.device("cpu")


def canvas_batch(prepared: Sequence[Prepared], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 3, Hc, Wc) float32 in [0, 1] of same-sized canvases."""
    return torch.from_numpy(to_float(np.stack([p.canvas for p in prepared]))).to(device)


@torch.no_grad()
def features(extractor: torch.nn.Module, geometry: Geometry, prepared: Sequence[Prepared], tile_batch: int = 16) -> torch.Tensor:
    """Feature grids (B, D, gh, gw) of prepared images (tiled ones stitched to the whole image)."""
    device = model_device(extractor)
    if not geometry.tiled:
        first = prepared[0]
        for p in prepared[1:]:
            geometry.check(p, first.grid)
        return extractor(canvas_batch(prepared, device))
    out = []
    for p in prepared:
        crops = torch.from_numpy(geometry.tile_stack(p)).to(device)
        feats = torch.cat([extractor(crops[i : i + tile_batch]) for i in range(0, len(crops), tile_batch)])
        out.append(torch.from_numpy(geometry.stitch_tiles(feats.float().cpu().numpy(), p)))
    return torch.stack(out).to(device)


def fill_invalid(patch_scores: torch.Tensor, prepared: Sequence[Prepared]) -> torch.Tensor:
    """Patch scores (B, gh, gw) with padded cells set to their nearest valid cell's score.

    Padding features are far from every memory entry, so their raw scores are high; without this,
    upsampling and the Gaussian blur would spill them into the image content along the border.
    """
    if all(p.valid is None for p in prepared):
        return patch_scores
    index = torch.from_numpy(np.stack([p.fill_index() for p in prepared])).to(patch_scores.device)
    return torch.gather(patch_scores.flatten(1), 1, index).view_as(patch_scores)


@torch.no_grad()
def score_prepared(
    detector: Any, geometry: Geometry, prepared: list[Prepared], names: Sequence[str], batch_size: int = 8,
    t_prep: float = 0.0,
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[float]], dict[str, float]]:
    """Canvas maps, image scores (max over the content) and seconds per mode name ("pni", "pni+refine")."""
    for p in prepared:
        geometry.check(p)
    maps: dict[str, list[np.ndarray]] = {}
    scores: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    if getattr(detector, "extractor", None) is None:  # an ensemble: each mode runs the whole model
        images = canvas_batch(prepared, model_device(detector))
        for name in names:
            t2 = time.perf_counter()
            # refine None: each member as it is deployed, a refined one through its refiner, as the statistics and
            # threshold the ensemble took from it were measured (False dropped the refiner and kept those)
            batch_maps, _ = detector(images, name.removesuffix("+refine"), True if name.endswith("+refine") else None)
            maps[name] = [m.float().cpu().numpy() for m in batch_maps]
            seconds[name] = t_prep + time.perf_counter() - t2
            scores[name] = [geometry.image_score(m, p) for m, p in zip(maps[name], prepared)]
        return maps, scores, seconds
    t0 = time.perf_counter()
    feats = features(detector.extractor, geometry, prepared, tile_batch=batch_size)
    t_feat = t_prep + time.perf_counter() - t0
    modes = [n.removesuffix("+refine") for n in names]
    p_dist, t_mlp = None, 0.0
    if any(m in NEEDS_MLP for m in modes):
        if detector.mlp is None:
            raise ValueError(f"modes {modes} need the neighbourhood model; this bundle is PatchCore-only")
        t1 = time.perf_counter()
        p_dist = detector.mlp.probabilities(feats)
        t_mlp = time.perf_counter() - t1
    canvas = canvas_batch(prepared, feats.device) if any(n.endswith("+refine") for n in names) else None
    for name, mode in zip(names, modes):
        t2 = time.perf_counter()
        patch = fill_invalid(detector.scorer(feats, p_dist, mode), prepared)
        batch_maps = detector.mapper(patch, prepared[0].canvas_hw)
        if name.endswith("+refine"):
            if detector.refiner is None:
                raise ValueError("this bundle has no refiner")
            batch_maps = detector.refiner(canvas, batch_maps)
        maps[name] = [m.float().cpu().numpy() for m in batch_maps]
        scores[name] = [geometry.image_score(m, p) for m, p in zip(maps[name], prepared)]
        seconds[name] = t_feat + (t_mlp if mode in NEEDS_MLP else 0.0) + time.perf_counter() - t2
    return maps, scores, seconds


def default_name(detector: Any, mode: str | None = None, refine: bool | None = None) -> str:
    """The mode name a detector scores with by default: its mode, "+refine" when it has a refiner."""
    mode = mode or detector.mode
    has_refiner = getattr(detector, "refiner", None) is not None
    return f"{mode}+refine" if (refine if refine is not None else has_refiner) and has_refiner else mode


def _maps_in_batches(
    detector: Any, geometry: Geometry, items: Sequence[Any], prepare: Callable[[Any], Prepared],
    finish: Callable[[np.ndarray, Prepared], np.ndarray], names: Sequence[str], batch_size: int,
) -> dict[str, tuple[list[np.ndarray], list[float]]]:
    """Each item prepared, scored in batches under each mode name (the features computed once per batch),
    its canvas map finished (restored to the image's size, or cropped to its content): name -> (maps, scores)."""
    out: dict[str, tuple[list[np.ndarray], list[float]]] = {name: ([], []) for name in names}
    for sl in chunks(len(items), geometry, batch_size):
        prepared = [prepare(item) for item in items[sl]]
        maps, scores, _ = score_prepared(detector, geometry, prepared, list(names), batch_size)
        for name, (out_maps, out_scores) in out.items():
            out_maps.extend(finish(m, p) for m, p in zip(maps[name], prepared))
            out_scores.extend(scores[name])
    return out


@torch.no_grad()
def predict_modes(
    detector: Any, images: Sequence[np.ndarray], names: Sequence[str], batch_size: int = 8,
    geometry: Geometry | None = None, content: bool = False,
) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """uint8 (H, W, 3) images of any size -> per mode name, anomaly maps at each image's own (H, W) (`content`: over
    the image content at the model's resolution, as calibration sees them) and image scores."""
    geometry = geometry or detector_geometry(detector)
    finish = geometry.content_map if content else geometry.restore
    out = _maps_in_batches(detector, geometry, images, geometry.prepare, finish, names, batch_size)
    return {name: (maps, np.asarray(scores, dtype=np.float32)) for name, (maps, scores) in out.items()}


def predict_images(
    detector: Any, images: Sequence[np.ndarray], mode: str | None = None, refine: bool | None = None,
    batch_size: int = 8, geometry: Geometry | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """uint8 (H, W, 3) images of any size -> anomaly maps at each image's own (H, W), and image scores."""
    name = default_name(detector, mode, refine)
    return predict_modes(detector, images, [name], batch_size, geometry)[name]


@torch.no_grad()
def content_maps(
    detector: Any, geometry: Geometry, paths: Sequence[Path], batch_size: int, name: str | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Maps over the image content (canvas resolution, padding cropped) and image scores: calibration.

    `name` is the mode name to score with ("pni", "pni+refine"); default: the detector's own.
    """
    name = name or default_name(detector)
    maps, scores = _maps_in_batches(detector, geometry, paths, lambda path: geometry.prepare(geometry.load(path)),
                                    geometry.content_map, [name], batch_size)[name]
    return maps, np.asarray(scores, dtype=np.float64)


@torch.no_grad()
def extract_training_features(
    extractor: torch.nn.Module,
    geometry: Geometry,
    paths: Sequence[Path],
    batch_size: int,
    progress: bool = True,
    desc: str = "features",
    grey: list[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, D, gh, gw) features (a view of channels-last storage: rows = a free reshape) and (N, gh, gw)
    validity, None when every cell of every image is content (no padding). `grey`, when given, gets each image's
    `is_grey` appended (the bundle records how many were, so scoring can say when its inputs are not alike).

    Every image must give the same grid (short-side and tiling keep the aspect ratio): the first
    image sets it and any other is refused with both shapes in the message.
    """
    feats: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    n_done = 0
    for sl in tqdm(list(chunks(len(paths), geometry, batch_size)), desc=desc, unit="batch", disable=not progress, leave=False):
        prepared = [geometry.prepare(geometry.load(p)) for p in paths[sl]]
        if grey is not None:
            grey.extend(is_grey(p.canvas) for p in prepared)
        if grid is None:
            grid = prepared[0].grid
        for p, path in zip(prepared, paths[sl]):
            if p.grid != grid:  # not geometry.check's message: there is no trained model yet
                h, w = p.original_hw
                raise GeometryError(
                    f"{path}: {w}x{h} gives a {p.grid[0]}x{p.grid[1]} feature grid under '{geometry.describe()}', but "
                    f"{paths[0]} gives {grid[0]}x{grid[1]}: the training images must share one aspect ratio"
                    f"{' and size' if geometry.tiled else ''} under this geometry; "
                    + ("bring them to one size, or train without --tile (--geometry resize or letterbox)"
                       if geometry.tiled else "use --geometry resize or letterbox, or crop them alike"))
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
